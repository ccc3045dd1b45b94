"""One vLLM engine in this process (run as a script by the tests and the capacity benchmark).

``python tests/vllm_engine/engine.py OUT.json [--check]``: builds (once) a tiny random Llama, starts
``vllm.LLM`` on it with whatever ``MINIKV_VLLM`` says, greedy-generates from three prompts and writes
the tokens, vLLM's KV capacity and (``--check``) the worker-side checks of :mod:`worker_checks`.
``python tests/vllm_engine/engine.py passkey OUT.json MODEL_DIR``: five pass-key prompts on a real model.
"""

from __future__ import annotations

import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
MODEL_DIR = os.environ.get(
    "MINIKV_TINY_LLAMA", os.path.join(os.path.expanduser("~"), ".cache", "minikv", "tiny-llama-vllm-v1")
)  # v1: q/k x8
PROMPT_LENGTHS = (300, 45, 129)  # a prompt over two blocks, one inside a group, one a token past a block


def tiny_llama(
    path: str = MODEL_DIR, head_dim: int = 32, dtype: str = "float32", sliding_window: int | None = None
) -> str:
    """A 2-layer Llama (4 query / 2 KV heads) with random weights, saved once; its attention is made
    peaked (query/key weights scaled up) so that keys matter to the output, as in a trained model.
    ``sliding_window``: a Mistral of the same shape whose layers attend within a window instead."""
    if sliding_window is not None:
        path = f"{path}-window{sliding_window}"
    if os.path.exists(os.path.join(path, "config.json")):
        return path
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    kw = dict(
        vocab_size=512,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=head_dim,
        max_position_embeddings=4096,
        torch_dtype=dtype,
    )
    if sliding_window is None:
        model = LlamaForCausalLM(LlamaConfig(**kw))
    else:
        model = MistralForCausalLM(MistralConfig(sliding_window=sliding_window, **kw))
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(8.0)
            layer.self_attn.k_proj.weight.mul_(8.0)
    model.save_pretrained(path)
    return path


def tiny(out: str, check: bool) -> None:
    """Greedy tokens of three prompts on the tiny Llama, vLLM's capacity, the worker-side checks."""
    import torch
    from vllm import LLM, SamplingParams

    sys.path.insert(0, HERE)
    import worker_checks

    start = time.time()
    window = os.environ.get("TINY_SLIDING_WINDOW")
    llm = LLM(
        tiny_llama(sliding_window=int(window) if window else None),
        skip_tokenizer_init=True,
        dtype="float32",
        enforce_eager=True,
        max_model_len=2048,
        kv_cache_memory_bytes=1 << 28,
        block_size=int(os.environ.get("BLOCK_SIZE", "128")),
        seed=0,
        tensor_parallel_size=int(os.environ.get("TP", "1")),
        **({"max_num_batched_tokens": int(os.environ["CHUNK"])} if os.environ.get("CHUNK") else {}),
    )
    init_s = time.time() - start
    if check:
        llm.collective_rpc(worker_checks.install)
    gen = torch.Generator().manual_seed(1)
    prompts = [{"prompt_token_ids": torch.randint(0, 512, (n,), generator=gen).tolist()} for n in PROMPT_LENGTHS]
    outs = llm.generate(prompts, SamplingParams(max_tokens=24, temperature=0, ignore_eos=True), use_tqdm=False)
    _dump(
        out,
        llm,
        init_s,
        tokens=[list(o.outputs[0].token_ids) for o in outs],
        checks=llm.collective_rpc(worker_checks.check) if check else None,
    )  # one per rank


def passkey(out: str, model_dir: str, n: int = 5, tokens: int = 3800) -> None:
    """The pass-key prompts (minikv.prompts) through ``vllm.LLM``: found or not, per seed."""
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams

    from minikv.prompts import passkey_prompt

    tok = AutoTokenizer.from_pretrained(model_dir)
    start = time.time()
    llm = LLM(
        model_dir,
        dtype="bfloat16",
        enforce_eager=True,
        max_model_len=8192,
        kv_cache_memory_bytes=1 << 30,
        block_size=int(os.environ.get("BLOCK_SIZE", "256")),
        seed=0,
        kv_cache_dtype=os.environ.get("KV_CACHE_DTYPE", "auto"),  # vLLM's own KV quantization, side by side
    )
    init_s = time.time() - start
    cases = [passkey_prompt(tok, tokens, seed=seed) for seed in range(n)]
    start = time.time()
    outs = llm.generate(
        [{"prompt_token_ids": tok(text).input_ids} for text, _ in cases],
        SamplingParams(max_tokens=8, temperature=0),
        use_tqdm=False,
    )
    _dump(
        out,
        llm,
        init_s,
        generate_s=round(time.time() - start, 1),
        prompt_tokens=[len(o.prompt_token_ids) for o in outs],
        answers=[o.outputs[0].text for o in outs],
        keys=[key for _, key in cases],
        found=[key in o.outputs[0].text for o, (_, key) in zip(outs, cases)],
    )


def _dump(out: str, llm, init_s: float, **fields) -> None:
    cache = llm.llm_engine.vllm_config.cache_config
    result = {
        "env": os.environ.get("MINIKV_VLLM"),
        "num_blocks": cache.num_gpu_blocks,
        "block_size": cache.block_size,
        "kv_cache_dtype": cache.cache_dtype,
        "capacity_tokens": cache.num_gpu_blocks * cache.block_size,
        "init_s": round(init_s, 1),
        **fields,
    }
    with open(out, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    if sys.argv[1] == "passkey":
        passkey(sys.argv[2], sys.argv[3])
    else:
        tiny(sys.argv[1], "--check" in sys.argv[2:])

"""``vllm.LLM`` throughput with and without minikv's backend (the GPU day's end-to-end number).

    python benchmarks/vllm_throughput.py [--prompts 64] [--prompt-tokens 4096] [--new 256] [--block-size 256]

A random Llama with Llama-3.1-8B's attention geometry (32 query / 8 KV heads, head_dim 128; 4 layers,
so the attention's share of a step is larger than in the real model), random prompts, greedy decoding
with ``ignore_eos``; each setting in its own process (the plugin reads ``MINIKV_VLLM`` once), CUDA
graphs as vLLM resolves them (``enforce_eager`` off). Prints and writes output tokens/s, the KV
capacity and the CUDA-graph mode to ``benchmarks/results/vllm_throughput.json``. Skips (exit 0) without
vLLM or without a GPU: the CPU numbers are in ``benchmarks/vllm_passkey.py``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SETTINGS = [None, "1", "k_bits=2,v_bits=2", "keys=token"]  # None: vLLM's own backend


def _model(path: str) -> str:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=32000,
        hidden_size=4096,
        intermediate_size=1024,
        num_hidden_layers=4,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        max_position_embeddings=32768,
    )
    LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(path)
    return path


def _one(model_dir: str, args) -> None:
    """In the subprocess: one engine, the prompts, tokens per second."""
    import torch
    from vllm import LLM, SamplingParams

    llm = LLM(model_dir, dtype="bfloat16", block_size=args.block_size, max_model_len=args.prompt_tokens + args.new)
    gen = torch.Generator().manual_seed(0)
    prompts = [
        {"prompt_token_ids": torch.randint(0, 32000, (args.prompt_tokens,), generator=gen).tolist()}
        for _ in range(args.prompts)
    ]
    params = SamplingParams(max_tokens=args.new, temperature=0, ignore_eos=True)
    llm.generate(prompts[:2], SamplingParams(max_tokens=4), use_tqdm=False)  # warm up
    start = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    seconds = time.perf_counter() - start
    cache = llm.llm_engine.vllm_config.cache_config
    print(
        "RESULT",
        json.dumps(
            {
                "output_tokens_per_s": sum(len(o.outputs[0].token_ids) for o in outs) / seconds,
                "seconds": seconds,
                "capacity_tokens": cache.num_gpu_blocks * cache.block_size,
                "cudagraph_mode": str(llm.llm_engine.vllm_config.compilation_config.cudagraph_mode),
            }
        ),
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--prompt-tokens", type=int, default=4096)
    ap.add_argument("--new", type=int, default=256)
    ap.add_argument("--block-size", type=int, default=256)
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        _one(args.one, args)
        return 0
    import torch

    if importlib.util.find_spec("vllm") is None or not torch.cuda.is_available():
        print("vllm_throughput: skipped (needs vLLM and a GPU)")
        return 0
    model_dir = _model(os.path.join(tempfile.mkdtemp(), "llama8b-heads"))
    rows = []
    for setting in SETTINGS:
        env = {k: v for k, v in os.environ.items() if k != "MINIKV_VLLM"}
        if setting is not None:
            env["MINIKV_VLLM"] = setting
        cmd = [sys.executable, __file__, "--one", model_dir, "--prompts", str(args.prompts)]
        cmd += [
            "--prompt-tokens",
            str(args.prompt_tokens),
            "--new",
            str(args.new),
            "--block-size",
            str(args.block_size),
        ]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
        row = {"setting": setting or "vLLM's own (bf16)"}
        row.update(json.loads(line[0][7:]) if line else {"error": proc.stderr[-2000:]})
        rows.append(row)
        print(row, flush=True)
    meta = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, **vars(args)}
    meta.pop("one")
    out = os.path.join(ROOT, "benchmarks", "results", "vllm_throughput.json")
    with open(out, "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

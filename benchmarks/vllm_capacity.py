"""How many more tokens vLLM's KV cache holds with minikv's backend, at the same memory.

Run in a venv with vLLM (.ci/vllm sets one up: ``.venv-vllm/bin/python benchmarks/vllm_capacity.py``).
For each model x block size x setting, one engine in a subprocess (the plugin reads ``MINIKV_VLLM`` per
process) with ``kv_cache_memory_bytes`` fixed: vLLM's own count of blocks x block size = tokens. Models:
SmolLM2-135M (its GGUF written as dense bf16 safetensors; head_dim 64) and a random 2-layer Llama with
head_dim 128 (the geometry of Llama 3 / Mistral / Qwen). Writes benchmarks/results/vllm_capacity.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# None: vLLM's own backend; keys=token: keys per token (no residual in the page). At block 16 (vLLM's GPU
# default) the per-channel settings take group_size=16 (a block must hold whole key groups).
SETTINGS = [
    None,
    "k_bits=4,v_bits=2",
    "k_bits=2,v_bits=2",
    "k_bits=4,v_bits=4",
    "keys=token",
    "k_bits=2,v_bits=2,keys=token",
]
BLOCK_SIZES = (64, 256, 16)  # vLLM's own CPU backend refuses 16: its gain is against the same model's own count
MEMORY = 1 << 30


def _one(model_dir: str, block_size: int) -> None:
    """In the subprocess: start the engine, print its capacity as JSON."""
    from vllm import LLM

    llm = LLM(
        model_dir,
        dtype="bfloat16",
        enforce_eager=True,
        max_model_len=4096,
        kv_cache_memory_bytes=MEMORY,
        block_size=block_size,
        skip_tokenizer_init=True,
    )
    cache = llm.llm_engine.vllm_config.cache_config
    print("RESULT", json.dumps({"blocks": cache.num_gpu_blocks, "tokens": cache.num_gpu_blocks * cache.block_size}))


def _llama128(path: str) -> str:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=512,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=128,
        max_position_embeddings=8192,
    )
    LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(path)
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "vllm_capacity"))
    args = ap.parse_args()
    import torch
    import transformers
    import vllm

    sys.path.insert(0, ROOT)
    from minikv.models import save_dense
    from minikv.vllm.layout import PageLayout
    from minikv.vllm.settings import parse

    tmp = tempfile.mkdtemp()
    models = {
        "SmolLM2-135M (head_dim 64)": (save_dense("smollm2", os.path.join(tmp, "smollm2")), 64),
        "random Llama (head_dim 128)": (_llama128(os.path.join(tmp, "llama128")), 128),
    }
    rows = []
    for name, (path, head_dim) in models.items():
        own = None  # vLLM's own tokens (bf16 bytes per token do not depend on the block size)
        for block_size in BLOCK_SIZES:
            for setting in SETTINGS:
                if setting and block_size < 32 and "keys=token" not in setting:
                    setting += ",group_size=16"
                env = {k: v for k, v in os.environ.items() if k != "MINIKV_VLLM"}
                env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
                if setting is not None:
                    env["MINIKV_VLLM"] = setting
                proc = subprocess.run(
                    [sys.executable, __file__, "--one", path, str(block_size)], env=env, capture_output=True, text=True
                )
                line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
                if setting is None and (proc.returncode or not line):  # vLLM's CPU backend: blocks of 32k
                    errors = [x for x in proc.stderr.splitlines() if "Error" in x]
                    print(f"{name} block {block_size}: vLLM's own refused: {errors[-1:]}", flush=True)
                    continue
                if proc.returncode or not line:
                    raise RuntimeError(f"{name} block {block_size} {setting}: {proc.stderr[-3000:]}")
                got = json.loads(line[0][7:])
                own = own or got
                s = parse(setting) if setting else None
                lay = (
                    PageLayout(
                        head_dim, block_size, torch.bfloat16, s.k_bits, s.v_bits, s.group_size, s.keys == "token"
                    )
                    if s
                    else None
                )
                row = {
                    "model": name,
                    "block_size": block_size,
                    "setting": setting or "vLLM's own (bf16)",
                    "bytes_per_token_head": lay.slot_bytes if lay else 4 * head_dim,
                    "tokens": got["tokens"],
                    "gain": round(got["tokens"] / own["tokens"], 3),
                    "predicted": round(lay.dense_slot_bytes / lay.slot_bytes, 3) if lay else 1.0,
                }
                rows.append(row)
                print(row, flush=True)
    meta = {
        "machine": f"{platform.machine()} {os.cpu_count()} cpus",
        "torch": torch.__version__,
        "vllm": vllm.__version__,
        "transformers": transformers.__version__,
        "kv_cache_memory_bytes": MEMORY,
        "group_size": "32 (16 at block 16 for per-channel keys)",
        "note": "clip / rotate change no bytes",
    }
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out + ".json", "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    lines = [
        f"vLLM KV capacity at {MEMORY >> 20} MiB, {meta['machine']}, torch {meta['torch']}, vLLM {meta['vllm']}, "
        f"transformers {meta['transformers']} (`benchmarks/vllm_capacity.py`)",
        "",
        "| model | block | setting | bytes / token / KV head | tokens | gain | predicted |",
        "|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['model']} | {r['block_size']} | {r['setting']} | {r['bytes_per_token_head']} | {r['tokens']:,} | "
        f"{r['gain']:.2f}x | {r['predicted']:.2f}x |"
        for r in rows
    ]
    with open(args.out + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--one":
        _one(sys.argv[2], int(sys.argv[3]))
    else:
        main()

"""SmolLM2-135M served by vLLM: its own backend (bf16, and its own KV quantization), and minikv's backend;
five ~3,600-token pass-key prompts (minikv.prompts, the README's main job), greedy, through ``vllm.LLM``
(tests/vllm_engine/engine.py ``passkey``).

Run in a venv with vLLM (``.venv-vllm/bin/python benchmarks/vllm_passkey.py``, .ci/vllm sets it up).
vLLM 0.32 reads no GGUF, so the embedded GGUF is first written as dense bf16 safetensors
(``minikv.models.save_dense``). Writes benchmarks/results/vllm_passkey.{json,md}.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# (label, environment): vLLM's own backend at bf16 and with its own KV quantization (``--kv-cache-dtype``),
# then minikv's backend (MINIKV_VLLM; 1: the defaults)
SETTINGS = [
    ("vLLM's own (bf16)", {}),
    ("vLLM's own, kv_cache_dtype=fp8", {"KV_CACHE_DTYPE": "fp8"}),
    ("vLLM's own, kv_cache_dtype=int4_per_token_head", {"KV_CACHE_DTYPE": "int4_per_token_head"}),
    ("vLLM's own, kv_cache_dtype=turboquant_k8v4", {"KV_CACHE_DTYPE": "turboquant_k8v4"}),
    ("vLLM's own, kv_cache_dtype=turboquant_4bit_nc", {"KV_CACHE_DTYPE": "turboquant_4bit_nc"}),
    ("MINIKV_VLLM=1 (K4 V2, clip, rotate kv)", {"MINIKV_VLLM": "1"}),
    ("MINIKV_VLLM=k_bits=2,v_bits=2", {"MINIKV_VLLM": "k_bits=2,v_bits=2"}),
    ("MINIKV_VLLM=bits=2,clip=0,rotate=none (plain KIVI-2)", {"MINIKV_VLLM": "bits=2,clip=0,rotate=none"}),
    ("MINIKV_VLLM=keys=token (K4 V2, keys per token: no residual in the page)", {"MINIKV_VLLM": "keys=token"}),
    ("MINIKV_VLLM=keys=token, block 16 (vLLM's GPU default)", {"MINIKV_VLLM": "keys=token", "BLOCK_SIZE": "16"}),
    ("vLLM's own (bf16), block 16", {"BLOCK_SIZE": "16"}),
]


def main() -> None:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--only", nargs="*", help="run the settings whose label contains one of these; keep the other saved rows"
    )
    args = ap.parse_args()
    sys.path.insert(0, ROOT)
    import torch
    import transformers
    import vllm

    from minikv.models import save_dense

    tmp = tempfile.mkdtemp()
    model_dir = save_dense("smollm2", os.path.join(tmp, "smollm2"))
    path = os.path.join(ROOT, "benchmarks", "results", "vllm_passkey")
    saved = {r["setting"]: r for r in json.load(open(path + ".json"))["rows"]} if args.only else {}
    rows = []
    for label, extra in SETTINGS:
        if args.only and not any(part in label for part in args.only):
            if label in saved:
                rows.append(saved[label])
            continue
        env = {k: v for k, v in os.environ.items() if k not in ("MINIKV_VLLM", "KV_CACHE_DTYPE", "BLOCK_SIZE")}
        env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        env.update(extra)
        out = os.path.join(tmp, "run.json")
        proc = subprocess.run(
            [sys.executable, os.path.join(ROOT, "tests", "vllm_engine", "engine.py"), "passkey", out, model_dir],
            env=env,
            capture_output=True,
            text=True,
        )
        if proc.returncode:  # vLLM's CPU build refuses some of its own KV dtypes: the row says so
            errors = [line for line in proc.stderr.splitlines() if "Error" in line]
            rows.append({"setting": label, "found": "refused", "error": (errors or ["?"])[-1][-300:]})
            print(rows[-1], flush=True)
            continue
        run = json.load(open(out))
        row = {
            "setting": label,
            "found": f"{sum(run['found'])}/{len(run['found'])}",
            "prompt_tokens": min(run["prompt_tokens"]),
            "capacity_tokens": run["capacity_tokens"],
            "generate_s": run["generate_s"],
            "answers": run["answers"],
        }
        rows.append(row)
        print(row, flush=True)
    meta = {
        "machine": f"{platform.machine()} {os.cpu_count()} cpus",
        "torch": torch.__version__,
        "vllm": vllm.__version__,
        "transformers": transformers.__version__,
        "block_size": "256 unless the row says",
        "kv_cache_memory_bytes": 1 << 30,
    }
    with open(path + ".json", "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    lines = [
        f"SmolLM2-135M through vllm.LLM, 5 pass-key prompts of {rows[0]['prompt_tokens']:,}+ tokens, block 256 unless "
        f"the row says, 1 GiB of KV; "
        f"{meta['machine']}, torch {meta['torch']}, vLLM {meta['vllm']} (`benchmarks/vllm_passkey.py`)",
        "",
        "| backend | pass keys found | KV capacity (tokens) | generate (s, 5 prompts + 8 tokens each) |",
        "|---|---|---|---|",
    ]
    lines += [
        f"| {r['setting']} | {r['found']} | {r['capacity_tokens']:,} | {r['generate_s']} |"
        if "capacity_tokens" in r
        else f"| {r['setting']} | refused on this machine: `{r['error']}` | | |"
        for r in rows
    ]
    with open(path + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

"""Pass-key retrieval on an embedded model: full cache vs minikv configurations.

    python evals/passkey.py [--model smollm2|gemma3-270m] [--tokens 2000] [--seeds 5] [--out CSV]

Prints a markdown table (found / seeds, KV bytes as % of fp16) and writes a CSV.
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import sys
import time

import torch

import minikv
from minikv.cli import encode
from minikv.compat import cache_key
from minikv.models import load_model, quiet_hub
from minikv.prompts import passkey_prompt

PAPER = dict(preset="paper")  # the old rows are the paper's recipe with one knob changed
CONFIGS = {
    "full cache (fp32)": None,
    "minikv defaults": dict(),
    "snapkv preset (the defaults until issue 20)": dict(preset="snapkv"),
    "MiniKV paper recipe (preset='paper')": PAPER,
    "paper, uniform schedule (old defaults)": dict(**PAPER, schedule="uniform"),
    "paper, uniform, 16-bit": dict(**PAPER, schedule="uniform", bits=16),
    "paper, uniform, 75% kept": dict(**PAPER, schedule="uniform", budget=0.75),
    "paper, uniform, snapkv scorer": dict(**PAPER, schedule="uniform", scorer="snapkv"),
    "paper, uniform, snapkv scorer, 4-bit": dict(**PAPER, schedule="uniform", scorer="snapkv", bits=4),
    "paper, every token kept (2-bit only)": dict(**PAPER, budget=None),
}


def run(model, tok, prompts, knobs):
    found, ratios, seconds = 0, [], 0.0
    if knobs is not None:
        minikv.patch(model, **knobs)
    try:
        for text, key in prompts:
            inputs = encode(tok, text)
            cache = None
            if knobs is not None:
                cache = minikv.MiniKVCache(model._minikv_patch.config, model.config, max_new_tokens=8)
            t = time.perf_counter()
            with torch.inference_mode():
                out = model.generate(
                    **inputs, max_new_tokens=8, do_sample=False, **{cache_key(): cache}, pad_token_id=tok.pad_token_id
                )
            seconds += time.perf_counter() - t
            found += key in tok.decode(out[0, inputs.input_ids.shape[1] :])
            ratios.append(cache.memory().ratio if cache is not None else 1.0)
    finally:
        if knobs is not None:
            minikv.unpatch(model)
    return found, sum(ratios) / len(ratios), seconds / len(prompts)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2", help="smollm2 or gemma3-270m")
    p.add_argument("--tokens", type=int, default=2000)
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--out", default=None, help="default evals/results/passkey_<model>.csv")
    p.add_argument("--only", help="run only the configurations whose name contains this text (their rows replaced)")
    args = p.parse_args()
    quiet_hub()
    model, tok = load_model(args.model)
    args.out = args.out or f"evals/results/passkey_{args.model}.csv"
    prompts = [passkey_prompt(tok, args.tokens, seed=s) for s in range(args.seeds)]
    rows = []
    print("| configuration | pass keys found | KV bytes (% of fp16) | s / prompt |\n|---|---|---|---|")
    for name, knobs in CONFIGS.items():
        if args.only and args.only not in name:
            continue
        found, ratio, sec = run(model, tok, prompts, knobs)
        rows.append(
            dict(
                config=name,
                found=found,
                seeds=len(prompts),
                kv_percent_of_fp16=round(100 * ratio, 2),
                seconds_per_prompt=round(sec, 2),
                tokens=args.tokens,
            )
        )
        print(f"| {name} | {found}/{len(prompts)} | {100 * ratio:.1f}% | {sec:.1f} |", flush=True)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    import transformers

    stamp = dict(
        machine=f"{platform.machine()} {os.cpu_count()} cpus",
        torch=torch.__version__,
        transformers=transformers.__version__,
    )
    rows = [{**r, **stamp} for r in rows]
    if args.only and os.path.exists(args.out):  # keep the other configurations' rows, replace the ones run now
        ran = {r["config"] for r in rows}
        kept = [r for r in csv.DictReader(open(args.out)) if r["config"] not in ran]
        rows = [r for r in kept if r["config"] in CONFIGS] + rows
        rows.sort(key=lambda r: list(CONFIGS).index(r["config"]))
    with open(args.out, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=[*rows[0]], extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Accuracy vs KV memory on the offline long-context suite, minikv configurations vs baselines.

    python evals/sweep.py                       # the full sweep (SmolLM2-135M, CPU; ~1 h on 2 cores)
    python evals/sweep.py --smoke               # 2 configurations, 1 sample, 3 short tasks (CI)
    python evals/sweep.py --groups policies     # only the selection-policy rows

Runs lm-eval (``minikv_hf``, tasks of ``evals/tasks``, tag ``minikv_long``) once per configuration
on one loaded model and writes ``<out>.csv`` (one row per configuration and task, with KV bytes),
``<out>.md`` (a table) and ``<out>.png`` (mean score vs KV bytes, one line per method).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from sweep_configs import GROUPS  # noqa: E402

SCORE_METRICS = {"score", "acc"}


def evaluate(model, tok, method: str, args: dict, tasks: list[str], metadata: dict) -> dict:
    import lm_eval
    from lm_eval.tasks import TaskManager

    import minikv
    from minikv.harness.model import MiniKVLM

    lm = MiniKVLM(pretrained=model, tokenizer=tok, batch_size=1, **args)
    t = time.perf_counter()
    try:
        manager = TaskManager(include_path=str(HERE / "tasks"), metadata=metadata)
        out = lm_eval.simple_evaluate(model=lm, tasks=tasks, task_manager=manager, verbosity="WARNING")
    finally:
        if minikv.is_patched(model):
            minikv.unpatch(model)
    seconds = time.perf_counter() - t
    scores, ppl = {}, None
    for task, res in out["results"].items():
        for key, value in res.items():
            metric = key.split(",")[0]
            if metric in SCORE_METRICS:
                scores[task] = value
            elif metric == "word_perplexity":
                ppl = value
    kv = 100.0 if lm.cache_kind == "full" else 100.0 * lm.kv.ratio
    return dict(method=method, args=json.dumps(args), kv_percent_of_fp16=round(kv, 2),
                mean_score=round(sum(scores.values()) / len(scores), 4), word_perplexity=ppl and round(ppl, 3),
                seconds=round(seconds, 1), **{t: round(v, 4) for t, v in sorted(scores.items())})


def write_outputs(rows: list[dict], out: Path, meta: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = sorted({k for r in rows for k in r if k.startswith("minikv_")})
    fields = ["method", "args", "kv_percent_of_fp16", "mean_score", "word_perplexity", *tasks, "seconds", *meta]
    with open(out.with_suffix(".csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for r in rows:
            w.writerow({**r, **meta})
    full = next((r["mean_score"] for r in rows if json.loads(r["args"]).get("cache") == "full"), None)
    short = [t.removeprefix("minikv_") for t in tasks]
    lines = [f"| method | args | KV % of fp16 | mean score | % of full | ppl | {' | '.join(short)} |",
             "|" + "---|" * (6 + len(tasks))]
    for r in sorted(rows, key=lambda r: (r["method"], -r["kv_percent_of_fp16"])):
        kept = f"{100 * r['mean_score'] / full:.1f}%" if full else "-"
        args = ", ".join(f"{k}={v}" for k, v in json.loads(r["args"]).items() if k != "cache")
        lines.append(f"| {r['method']} | {args} | {r['kv_percent_of_fp16']:.1f} | {r['mean_score']:.3f} | {kept} | "
                     f"{r['word_perplexity']} | " + " | ".join(f"{r.get(t, 0):.2f}" for t in tasks) + " |")
    lines.append(f"\n{meta['prompt_tokens']} tokens, {meta['samples']} samples per task, {meta['machine']}, "
                 f"torch {meta['torch']}, transformers {meta['transformers']}, lm-eval {meta['lm_eval']}.")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    fig, ax = plt.subplots(figsize=(8, 5))
    for method in dict.fromkeys(r["method"] for r in rows):
        pts = sorted((r["kv_percent_of_fp16"], r["mean_score"]) for r in rows if r["method"] == method)
        ax.plot(*zip(*pts), marker="o", label=method)
    ax.set_xscale("log")
    ax.set_xlabel("KV cache bytes, % of an fp16 cache (log)")
    ax.set_ylabel("mean score over the suite")
    ax.set_title(f"SmolLM2-135M, offline long-context suite (~{meta['prompt_tokens']} tokens)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=120)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--groups", default="baselines,minikv", help=f"comma-separated of {sorted(GROUPS)}")
    p.add_argument("--tokens", type=int, default=1000)
    p.add_argument("--samples", type=int, default=5)
    p.add_argument("--tasks", default="minikv_long")
    p.add_argument("--out", default=str(HERE / "results" / "sweep_smollm2"))
    p.add_argument("--smoke", action="store_true", help="2 configurations, 1 sample of 300 tokens, 3 tasks (CI)")
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    configs = [c for g in args.groups.split(",") for c in GROUPS[g]]
    tasks = args.tasks.split(",")
    if args.smoke:
        configs = [GROUPS["baselines"][0], GROUPS["minikv"][1]]
        args.tokens, args.samples, tasks = 300, 1, ["minikv_passkey", "minikv_passkey_choice", "minikv_reference_ppl"]
    import lm_eval
    import torch
    import transformers

    from minikv.models import load_model

    model, tok = load_model(None)
    meta = dict(prompt_tokens=args.tokens, samples=args.samples, machine=f"{platform.machine()} {os.cpu_count()} CPUs",
                torch=torch.__version__, transformers=transformers.__version__, lm_eval=lm_eval.__version__)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = []
    for method, cfg in configs:
        row = evaluate(model, tok, method, cfg, tasks, dict(tokens=args.tokens, samples=args.samples))
        rows.append(row)
        print(json.dumps(row), flush=True)
        write_outputs(rows, out, meta)  # after every row: a long sweep can be read while it runs
    print(out.with_suffix(".md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())

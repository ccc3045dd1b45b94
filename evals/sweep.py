"""Accuracy vs KV memory on the offline long-context suite, minikv configurations vs baselines.

    python evals/sweep.py                            # baselines + minikv groups, SmolLM2-135M (CPU: hours)
    python evals/sweep.py --model gemma3-270m        # the same on Gemma 3 270M
    python evals/sweep.py --smoke                    # 2 configurations, 1 sample, 3 short tasks (CI)
    python evals/sweep.py --configs fidelity         # groups of evals/sweep_configs.py, comma-separated
    python evals/sweep.py --configs my_configs.py    # every group of a file's GROUPS (or FILE.py:GROUP,...)
    python evals/sweep.py ... --resume               # keep the rows <out>.csv holds, run the others

Runs lm-eval (``minikv_hf``, tasks of ``evals/tasks``, tag ``minikv_long``) once per configuration
on one loaded model and writes ``<out>.csv`` (one row per configuration: KV bytes, every task score,
the mean and their 95% Wilson intervals, see ``evals/stats.py``), ``<out>.md`` (a table) and
``<out>.png`` (mean score with its interval vs KV bytes, one line per method). ``<out>`` defaults to
``evals/results/sweep_<model>``. The model args of a configuration go to ``minikv_hf`` unchanged.
"""

from __future__ import annotations

import argparse
import csv
import inspect
import json
import os
import platform
import runpy
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from stats import wilson  # noqa: E402
from sweep_configs import GROUPS  # noqa: E402

SCORE_METRICS = {"score", "acc"}
MODEL_NAMES = {"smollm2": "SmolLM2-135M-Instruct", "gemma3-270m": "Gemma 3 270M"}
SMOKE_TASKS = ["minikv_passkey", "minikv_passkey_choice", "minikv_reference_ppl"]


def load_configs(spec: str) -> list[tuple[str, dict]]:
    """The configurations of ``spec``: ``GROUP[,GROUP...]`` of ``evals/sweep_configs.py``, ``FILE.py``
    (every group of the file's ``GROUPS`` dict) or ``FILE.py:GROUP[,GROUP...]``."""
    path, _, names = spec.rpartition(":")
    if not path.endswith(".py"):  # no FILE.py:GROUP form
        path, names = (spec, "") if spec.endswith(".py") else ("", spec)
    groups = runpy.run_path(path)["GROUPS"] if path else GROUPS
    wanted = names.split(",") if names else list(groups)
    unknown = [g for g in wanted if g not in groups]
    if unknown:
        raise SystemExit(f"unknown config groups {unknown}; {path or 'sweep_configs.py'} has {sorted(groups)}")
    return [c for g in wanted for c in groups[g]]


def check_knobs(configs: list[tuple[str, dict]]) -> None:
    """Refuse model args that ``minikv_hf`` does not know: lm-eval's HFLM, handed a loaded model,
    drops unknown arguments silently, so a row would run a configuration other than its label's."""
    from lm_eval.models.huggingface import HFLM

    from minikv.harness.model import KNOBS, MiniKVLM

    known = {*KNOBS, *inspect.signature(MiniKVLM).parameters, *inspect.signature(HFLM).parameters}
    for method, cfg in configs:
        unknown = sorted(set(cfg) - known)
        if unknown:
            raise SystemExit(f"{method!r}: minikv_hf does not know {unknown} (not MiniKVConfig fields)")


def evaluate(model, tok, method: str, args: dict, tasks: list[str], metadata: dict) -> dict:
    """One configuration on the tasks: a row of KV bytes, mean score, perplexity, seconds and task scores."""
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
    check_sample_counts(out["n-samples"], metadata["samples"])
    scores, ppl = {}, None
    for task, res in out["results"].items():
        for key, value in res.items():
            metric = key.split(",")[0]
            if metric in SCORE_METRICS:
                scores[task] = value
            elif metric == "word_perplexity":
                ppl = value
    kv = 100.0 if lm.cache_kind == "full" else 100.0 * lm.kv.ratio
    return dict(
        method=method,
        args=json.dumps(args),
        kv_percent_of_fp16=round(kv, 2),
        mean_score=round(sum(scores.values()) / len(scores), 4),
        word_perplexity=ppl and round(ppl, 3),
        seconds=round(seconds, 1),
        **{t: round(v, 4) for t, v in sorted(scores.items())},
    )


def done_rows(path: Path, meta: dict) -> list[dict]:
    """The rows of an earlier run's ``path`` (CSV) measured with the same ``meta`` (model, sizes,
    versions), as ``evaluate`` returned them: numbers back to numbers, intervals and meta dropped."""
    if not path.exists():
        return []
    rows = []
    with open(path, newline="") as f:
        for r in csv.DictReader(f):
            if any(str(r.get(k)) != str(v) for k, v in meta.items()):
                continue
            row = {}
            for k, v in r.items():
                if k in meta or k.startswith(("ci_low", "ci_high")):
                    continue
                try:
                    row[k] = float(v) if v else None
                except ValueError:
                    row[k] = v
            rows.append({k: v for k, v in row.items() if v is not None or k == "word_perplexity"})
    return rows


def check_sample_counts(n_samples: dict, samples: int) -> None:
    """The intervals take ``n = samples`` for every task: make sure lm-eval scored that many of each."""
    wrong = {task: n["effective"] for task, n in n_samples.items() if n["effective"] != samples}
    if wrong:
        raise RuntimeError(f"tasks scored on other than {samples} samples: {wrong}")


def with_intervals(row: dict, tasks: list[str], samples: int) -> dict:
    """``row`` with the 95% Wilson interval of its mean score (``n = samples x tasks``) and of every
    task score (``n = samples``), as ``ci_low``/``ci_high`` and ``ci_low_<task>``/``ci_high_<task>``."""
    scored = [t for t in tasks if row.get(t) is not None]
    lo, hi = wilson(row["mean_score"], samples * len(scored))
    out = dict(row, ci_low=round(lo, 4), ci_high=round(hi, 4))
    for t in scored:
        t_lo, t_hi = wilson(row[t], samples)
        out[f"ci_low_{t}"], out[f"ci_high_{t}"] = round(t_lo, 4), round(t_hi, 4)
    return out


def write_outputs(rows: list[dict], out: Path, meta: dict) -> None:
    """``out.csv``, ``out.md`` and ``out.png`` of the rows; ``meta`` names the model, the sizes and versions."""
    tasks = sorted({k for r in rows for k in r if k.startswith("minikv_")})
    rows = [with_intervals(r, tasks, meta["samples"]) for r in rows]
    write_csv(rows, tasks, out.with_suffix(".csv"), meta)
    out.with_suffix(".md").write_text(markdown(rows, tasks, meta))
    plot(rows, out.with_suffix(".png"), meta)


def write_csv(rows: list[dict], tasks: list[str], path: Path, meta: dict) -> None:
    """One line per row, the run's ``meta`` repeated on each."""
    intervals = [f"{side}_{t}" for t in tasks for side in ("ci_low", "ci_high")]
    fields = [
        "method",
        "args",
        "kv_percent_of_fp16",
        "mean_score",
        "ci_low",
        "ci_high",
        "word_perplexity",
        *tasks,
        *intervals,
        "seconds",
        *meta,
    ]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for r in rows:
            w.writerow({**r, **meta})


def markdown(rows: list[dict], tasks: list[str], meta: dict) -> str:
    """The table: mean score with its interval, % of the full cache's mean score, every task score."""
    full = next((r["mean_score"] for r in rows if json.loads(r["args"]).get("cache") == "full"), None)
    short = [t.removeprefix("minikv_") for t in tasks]
    lines = [
        f"| method | args | KV % of fp16 | mean score [95% CI] | % of full | ppl | {' | '.join(short)} |",
        "|" + "---|" * (6 + len(tasks)),
    ]
    for r in sorted(rows, key=lambda r: (r["method"], -r["kv_percent_of_fp16"])):
        kept = f"{100 * r['mean_score'] / full:.1f}%" if full else "-"
        args = ", ".join(f"{k}={v}" for k, v in json.loads(r["args"]).items() if k != "cache")
        mean = f"{r['mean_score']:.3f} [{r['ci_low']:.3f}, {r['ci_high']:.3f}]"
        lines.append(
            f"| {r['method']} | {args} | {r['kv_percent_of_fp16']:.1f} | {mean} | {kept} | "
            f"{r['word_perplexity']} | " + " | ".join(f"{r.get(t, 0):.2f}" for t in tasks) + " |"
        )
    lines.append(
        f"\n{model_name(meta['model'])}, {meta['prompt_tokens']} tokens, {meta['samples']} samples per "
        f"task, {meta['machine']}, torch {meta['torch']}, transformers {meta['transformers']}, "
        f"lm-eval {meta['lm_eval']}. [95% CI]: Wilson interval over samples x tasks "
        f"(`evals/stats.py`); per-task intervals in the CSV."
    )
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path, meta: dict) -> None:
    """Mean score vs KV bytes (log x), one line per method, error bars from the 95% intervals."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for method in dict.fromkeys(r["method"] for r in rows):
        pts = sorted(
            (r["kv_percent_of_fp16"], r["mean_score"], r["ci_low"], r["ci_high"]) for r in rows if r["method"] == method
        )
        x, y, lo, hi = zip(*pts)
        yerr = [[m - a for m, a in zip(y, lo)], [b - m for m, b in zip(y, hi)]]
        ax.errorbar(x, y, yerr=yerr, marker="o", capsize=3, label=method)
    ax.set_xscale("log")
    ax.set_xlabel("KV cache bytes, % of an fp16 cache (log)")
    ax.set_ylabel("mean score over the suite (95% CI)")
    ax.set_title(
        f"{model_name(meta['model'])}, offline long-context suite "
        f"(~{meta['prompt_tokens']} tokens, {meta['samples']} samples per task)"
    )
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def model_name(model: str) -> str:
    """The display name of a ``--model`` short name."""
    return MODEL_NAMES.get(model, model)


def parse_args() -> argparse.Namespace:
    """The command line; ``--smoke`` replaces configurations, sizes and tasks with the CI ones."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2", choices=sorted(MODEL_NAMES), help="minikv.models.load_model name")
    p.add_argument(
        "--configs",
        default="baselines,minikv",
        help=f"GROUP[,GROUP...] of {sorted(GROUPS)}, FILE.py (its GROUPS) or FILE.py:GROUP[,GROUP...]",
    )
    p.add_argument("--tokens", type=int, default=2000)
    p.add_argument("--samples", type=int, default=10)
    p.add_argument("--tasks", default="minikv_long")
    p.add_argument("--out", help="output path without suffix (default evals/results/sweep_<model>)")
    p.add_argument(
        "--resume",
        action="store_true",
        help="keep the rows of <out>.csv measured with the same model, sizes and versions",
    )
    p.add_argument("--smoke", action="store_true", help="2 configurations, 1 sample of 300 tokens, 3 tasks (CI)")
    args = p.parse_args()
    args.out = Path(args.out or HERE / "results" / f"sweep_{args.model}")
    if args.smoke:
        args.configs = [GROUPS["baselines"][0], GROUPS["minikv"][1]]
        args.tokens, args.samples, args.tasks = 300, 1, SMOKE_TASKS
    else:
        args.configs, args.tasks = load_configs(args.configs), args.tasks.split(",")
    return args


def main() -> int:
    args = parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    check_knobs(args.configs)
    import lm_eval
    import torch
    import transformers

    from minikv.models import load_model

    model, tok = load_model(args.model)
    meta = dict(
        model=args.model,
        prompt_tokens=args.tokens,
        samples=args.samples,
        machine=f"{platform.machine()} {os.cpu_count()} CPUs",
        torch=torch.__version__,
        transformers=transformers.__version__,
        lm_eval=lm_eval.__version__,
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    rows = done_rows(args.out.with_suffix(".csv"), meta) if args.resume else []
    done = {(r["method"], r["args"]) for r in rows}
    for method, cfg in args.configs:
        if (method, json.dumps(cfg)) in done:
            print(f"kept from {args.out.with_suffix('.csv')}: {method} {cfg}", flush=True)
            continue
        row = evaluate(model, tok, method, cfg, args.tasks, dict(tokens=args.tokens, samples=args.samples))
        rows.append(row)
        print(json.dumps(row), flush=True)
        write_outputs(rows, args.out, meta)  # after every row: a long sweep can be read while it runs
    print(args.out.with_suffix(".md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())

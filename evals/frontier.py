"""Issue 20's frontier: every shared-context configuration with per-sample records, its bytes against its
share of the full cache's score on the same samples (overall and in its weakest turn).

    python evals/frontier.py --model smollm2       # writes evals/results/frontier_smollm2.md
    python evals/frontier.py --model gemma3-270m

Reads ``evals/results/shared_context_<model>_records.jsonl`` (``evals/shared_context.py --records``) and the
bytes from the rows of ``shared_context_<model>_nll.csv`` of the same name (the largest reported, when a
configuration was run in parts). Every row is compared on the samples all of them ran (the full cache's
score on the same samples is the denominator). A row is on the frontier when no other row costs no more after
the document and keeps more of the full cache's score. The weakest turn is the lowest of the five turns'
ratios (+-0.15 or so at 30 samples, +-0.07 at 100: the paired intervals are ``evals/paired.py``'s).
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

from paired import load

HERE = Path(__file__).resolve().parent
BASE = "full cache"


def _bytes(path: Path) -> dict[str, tuple[float, float]]:
    """``{config: (KV % after the document, KV % after five turns)}``, the largest of its rows."""
    out: dict[str, tuple[float, float]] = {}
    for r in csv.DictReader(open(path)):
        try:
            kv = (float(r["kv_percent_of_fp16"]), float(r["kv_percent_after_turns"]))
        except (KeyError, ValueError):
            continue
        old = out.get(r["config"], (0.0, 0.0))
        out[r["config"]] = (max(old[0], kv[0]), max(old[1], kv[1]))
    return out


def _mean(run, keys, turn=None) -> float:
    vals = [s for key in keys for t, (_, s, _) in enumerate(run[key]) if turn is None or t == turn]
    return sum(vals) / len(vals)


def rows(records: Path, table: Path) -> list[dict]:
    """One row per configuration of ``records``, compared on the samples every configuration ran (the first
    30 here), with its share of full over every sample it shares with the full cache where it ran more;
    bytes from the CSV ``table``."""
    runs = load(str(records))
    kv = _bytes(table)
    base = runs[BASE]
    shared = sorted(set.intersection(*(set(samples) for samples in runs.values())))
    out = []
    for name, samples in runs.items():
        turns = [_mean(samples, shared, t) / _mean(base, shared, t) for t in range(len(base[shared[0]]))]
        every = sorted(set(samples) & set(base))
        doc, after = kv.get(name, (100.0, 100.0) if name == BASE else (float("nan"), float("nan")))
        out.append(
            dict(
                config=name,
                samples=len(shared),
                kv_doc=doc,
                kv_after=after,
                mean=_mean(samples, shared),
                of_full=_mean(samples, shared) / _mean(base, shared),
                weakest_turn=min(turns),
                turns=turns,
                more=(len(every), _mean(samples, every) / _mean(base, every)) if len(every) > len(shared) else None,
            )
        )
    for r in out:
        r["frontier"] = not any(o is not r and o["kv_doc"] <= r["kv_doc"] and o["of_full"] > r["of_full"] for o in out)
    return sorted(out, key=lambda r: (r["kv_doc"], -r["of_full"]))


def render(model: str, table: list[dict]) -> str:
    lines = [
        f"# Issue 20's frontier on {model} (`python evals/frontier.py --model {model}`)",
        "",
        f"Every configuration on the {table[0]['samples']} samples all of them ran; where one ran more, its share of",
        "full over all of them in the last column.",
        "",
        "| configuration | KV % (document / after 5 turns) | mean | % of full | weakest turn | turns 1-5, % of full | frontier | more samples: % of full |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in table:
        turns = " / ".join(f"{100 * t:.0f}" for t in r["turns"])
        more = f"{100 * r['more'][1]:.1f}% over {r['more'][0]}" if r["more"] else ""
        lines.append(
            f"| {r['config']} | {r['kv_doc']:.1f} / {r['kv_after']:.1f} | {r['mean']:.3f} | {100 * r['of_full']:.1f}% | "
            f"{100 * r['weakest_turn']:.0f}% | {turns} | {'yes' if r['frontier'] else ''} | {more} |"
        )
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2")
    args = p.parse_args()
    results = HERE / "results"
    table = rows(
        results / f"shared_context_{args.model}_records.jsonl", results / f"shared_context_{args.model}_nll.csv"
    )
    text = render(args.model, table)
    (HERE / "results" / f"frontier_{args.model}.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

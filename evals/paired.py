"""Paired comparison of shared-context configurations, sample by sample (``evals/shared_context.py --records``).

    python evals/paired.py evals/results/shared_context_smollm2_records.jsonl --base "minikv defaults"

Every configuration of the records ran on the same documents and questions, so its difference from the base,
taken per sample (the mean over the sample's turns) before averaging, leaves out what varies from one
document to the next. Printed per configuration: samples, mean score and each turn's mean as a share of the
base's, each task's mean, mean answer NLL (nats per scored token), and the paired differences (score, NLL) against the base
with a normal 95% interval (1.96 standard errors of the per-sample differences), overall and per turn.
"""

from __future__ import annotations

import argparse
import json
import math
from collections import defaultdict

from stats import Z95, wilson


def load(path: str) -> dict[str, dict[tuple[int, int], list]]:
    """``{config: {(seed, sample): [(task, score, nll), ...]}}``; a later line of the same key replaces an earlier."""
    runs: dict[str, dict[tuple[int, int], list]] = defaultdict(dict)
    with open(path) as f:
        for line in f:
            r = json.loads(line)
            runs[r["config"]][(r["seed"], r["sample"])] = r["turns"]
    return runs


def mean_ci(xs: list[float]) -> tuple[float, float]:
    """Mean and the half-width of its normal 95% interval."""
    m = sum(xs) / len(xs)
    if len(xs) < 2:
        return m, float("nan")
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))
    return m, Z95 * sd / math.sqrt(len(xs))


def compare(runs, base: str) -> list[dict]:
    if base not in runs:
        raise SystemExit(f"--base {base!r} is not a configuration of the records: {sorted(runs)}")
    rows = []
    for name, samples in runs.items():
        keys = sorted(set(samples) & set(runs[base]))
        if not keys:
            continue
        turns = len(samples[keys[0]])
        per_turn = [sum(samples[k][t][1] for k in keys) / len(keys) for t in range(turns)]
        base_turn = [sum(runs[base][k][t][1] for k in keys) / len(keys) for t in range(turns)]
        score = [sum(r[1] for r in samples[k]) / turns for k in keys]
        nll = [sum(r[2] for r in samples[k]) / turns for k in keys]
        d_turn = [[samples[k][t][1] - runs[base][k][t][1] for k in keys] for t in range(turns)]
        d_turn_nll = [[samples[k][t][2] - runs[base][k][t][2] for k in keys] for t in range(turns)]
        d_score = [sum(xs) / turns for xs in zip(*d_turn)]  # per sample: the mean of its turns' differences
        d_nll = [sum(xs) / turns for xs in zip(*d_turn_nll)]
        tasks = sorted({r[0] for k in keys for r in samples[k]})
        per_task = {t: [r[1] for k in keys for r in samples[k] if r[0] == t] for t in tasks}
        mean = sum(score) / len(score)
        rows.append(
            dict(
                config=name,
                samples=len(keys),
                score=round(mean, 3),
                score_ci="[%.3f, %.3f]" % wilson(mean, len(keys) * turns),  # as the suite's rows: answers pooled
                turns=[round(x, 3) for x in per_turn],
                tasks={t: round(sum(xs) / len(xs), 3) for t, xs in per_task.items()},
                turns_vs_base=[round(a / b, 3) if b else None for a, b in zip(per_turn, base_turn)],
                nll=round(sum(nll) / len(nll), 4),
                d_score="%+.3f +- %.3f" % mean_ci(d_score),
                d_nll="%+.4f +- %.4f" % mean_ci(d_nll),
                d_score_turns=["%+.3f +- %.3f" % mean_ci(xs) for xs in d_turn],
                d_nll_turns=["%+.3f +- %.3f" % mean_ci(xs) for xs in d_turn_nll],
            )
        )
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("records", help="JSONL written by evals/shared_context.py --records")
    p.add_argument("--base", default="full cache", help="the configuration the others are compared with")
    args = p.parse_args()
    for row in compare(load(args.records), args.base):
        print(json.dumps(row))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

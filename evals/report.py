"""Side-by-side table and plot of every selection policy (issue 6), from the two sweep CSVs.

    python evals/report.py [--model gemma3-270m]  # reads evals/results/sweep_<model>.csv + sweep_policies_<model>.csv

The policy sweep (``python evals/sweep.py --configs policies --out evals/results/sweep_policies_<model>``)
holds PyramidKV, StreamingLLM, A2SF, key norm and KVCrush; the MiniKV/H2O and SnapKV rows at the same
2-bit budgets and the full cache come from the main sweep. Writes ``evals/results/policies_<model>.{csv,md,png}``
with the main sweep's intervals (``evals/stats.py``), recomputed from the scores and sample counts.
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from sweep import MODEL_NAMES, write_outputs  # noqa: E402

FROM_MAIN = {
    "full cache": "full cache",
    "minikv 2-bit, minikv scorer": "MiniKV / H2O (cumulative)",
    "minikv 2-bit, snapkv scorer": "SnapKV (= KVCrush without its wrapper)",
}
META = ("model", "prompt_tokens", "samples", "machine", "torch", "transformers", "lm_eval")


def load(path: Path) -> list[dict]:
    """The rows of a sweep CSV, numbers as floats and empty cells as None."""
    rows = []
    for r in csv.DictReader(open(path)):
        for k, v in r.items():
            try:
                r[k] = float(v) if v not in ("", "None") else None
            except ValueError:
                pass
        rows.append(r)
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2", choices=sorted(MODEL_NAMES))
    model = p.parse_args().model
    main_rows = load(HERE / "results" / f"sweep_{model}.csv")
    policy_rows = load(HERE / "results" / f"sweep_policies_{model}.csv")
    rows = [dict(r, method=FROM_MAIN[r["method"]]) for r in main_rows if r["method"] in FROM_MAIN] + policy_rows
    meta = {k: policy_rows[0].get(k) for k in META}
    meta["model"], meta["prompt_tokens"], meta["samples"] = model, int(meta["prompt_tokens"]), int(meta["samples"])
    rows = [{k: v for k, v in r.items() if k not in META} for r in rows]
    out = HERE / "results" / f"policies_{model}"
    write_outputs(rows, out, meta)
    print(out.with_suffix(".md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Side-by-side table and plot of every selection policy (issue 6), from the two sweep CSVs.

    python evals/report.py      # reads evals/results/sweep_smollm2.csv + sweep_policies_smollm2.csv

The policy sweep (``python evals/sweep.py --groups policies --out evals/results/sweep_policies_smollm2``)
holds PyramidKV, StreamingLLM, A2SF, key norm and KVCrush; the MiniKV/H2O and SnapKV rows at the same
2-bit budgets and the full cache come from the main sweep. Writes ``evals/results/policies_smollm2.{csv,md,png}``.
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from sweep import write_outputs  # noqa: E402

FROM_MAIN = {"full cache": "full cache", "minikv 2-bit, minikv scorer": "MiniKV / H2O (cumulative)",
             "minikv 2-bit, snapkv scorer": "SnapKV (= KVCrush without its wrapper)"}
META = ("prompt_tokens", "samples", "machine", "torch", "transformers", "lm_eval")


def load(path: Path) -> list[dict]:
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
    main_rows = load(HERE / "results" / "sweep_smollm2.csv")
    policy_rows = load(HERE / "results" / "sweep_policies_smollm2.csv")
    rows = [dict(r, method=FROM_MAIN[r["method"]]) for r in main_rows if r["method"] in FROM_MAIN] + policy_rows
    meta = {k: policy_rows[0][k] for k in META}
    meta["prompt_tokens"], meta["samples"] = int(meta["prompt_tokens"]), int(meta["samples"])
    rows = [{k: v for k, v in r.items() if k not in META} for r in rows]
    write_outputs(rows, HERE / "results" / "policies_smollm2", meta)
    print((HERE / "results" / "policies_smollm2.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Which layers' values need 4 bits: a calibration sweep for a tier by layer (``tier_share`` per layer).

    python evals/value_layers.py --model smollm2 --samples 4

Every token kept with 4-bit keys and values (the base), then each compressed layer alone with 2-bit values
(``evals/shared_context_probes.py --probe vdrop<l>``), on the first ``--samples`` samples of the
shared-context suite. A layer's cost is how much its 2-bit values raise the answers' NLL (teacher-forced,
every turn) over the base; the layers that cost most are the ones to keep at 4 bits. Rows go to
``evals/results/value_layers_<model>.csv`` (one per configuration, the suite's columns); the table printed
at the end ranks the layers and gives the ``tier_share`` sequence that keeps the top ``--top`` at 4 bits.
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
BASE = {"budget": None, "v_bits": 4}


def run(args, label: str, out: Path, probe: str | None = None) -> None:
    script = ["shared_context_probes.py", "--probe", probe] if probe else ["shared_context.py"]
    cmd = [sys.executable, str(HERE / script[0]), *script[1:], "--model", args.model, "--samples", str(args.samples)]
    cmd += ["--tokens", str(args.tokens), "--knobs", json.dumps(BASE), "--label", label, "--out", str(out)]
    subprocess.run(cmd, check=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2")
    p.add_argument("--samples", type=int, default=4)
    p.add_argument("--tokens", type=int, default=2000)
    p.add_argument("--layers", type=int, required=True, help="how many compressed layers the model has")
    p.add_argument("--top", type=int, default=3, help="layers to keep at 4 bits in the printed tier_share")
    p.add_argument("--out", help="CSV path (default evals/results/value_layers_<model>.csv; rows appended)")
    p.add_argument("--report", action="store_true", help="only print the table of an existing CSV")
    args = p.parse_args()
    out = Path(args.out or HERE / "results" / f"value_layers_{args.model}.csv")
    if not args.report:
        run(args, "base: K4V4, every token", out)
        for layer in range(args.layers):
            run(args, f"vdrop{layer}", out, probe=f"vdrop{layer}")
    rows = list(csv.DictReader(out.open()))
    base = next(float(r["nll"]) for r in rows if r["config"].startswith("base"))
    cost = {int(r["config"][5:]): float(r["nll"]) - base for r in rows if r["config"].startswith("vdrop")}
    ranked = sorted(cost, key=cost.get, reverse=True)
    print(f"base NLL {base:.4f}; each layer's NLL increase with 2-bit values, largest first:")
    for layer in ranked:
        print(f"  layer {layer:3d}: {cost[layer]:+.4f}")
    top = set(ranked[: args.top])
    print("tier_share =", [1.0 if layer in top else 0.0 for layer in range(len(cost))])
    return 0


if __name__ == "__main__":
    sys.exit(main())

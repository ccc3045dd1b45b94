"""Loading an embedded model: from its GGUF (dequantize every tensor, rebuild the tokenizer) against
its dense copy in ``$MINIKV_CACHE_DIR/models`` (:func:`minikv.models.dense_copy`).

    python benchmarks/bench_load.py [--models smollm2,gemma3-270m]

Each model: one load from the GGUF (``MINIKV_DENSE_CACHE=0``), the dense copy written if missing
(not timed), then one load from the copy; the first token's logits compared.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import print_table, stamp, write_csv  # noqa: E402

from minikv import models  # noqa: E402


def _timed_load(name: str, dense: bool):
    os.environ["MINIKV_DENSE_CACHE"] = "1" if dense else "0"
    t = time.perf_counter()
    lm, tok = models.load_model(name)
    return lm, tok, time.perf_counter() - t


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="smollm2,gemma3-270m")
    p.add_argument("--out", default="benchmarks/results/load.csv")
    args = p.parse_args()
    rows = []
    for name in args.models.split(","):
        gguf_lm, tok, gguf_s = _timed_load(name, dense=False)
        models.dense_copy(name)  # written once (not timed)
        dense_lm, _, dense_s = _timed_load(name, dense=True)
        ids = tok("The capital of France is", return_tensors="pt").input_ids
        with torch.no_grad():
            same = torch.equal(gguf_lm(ids).logits, dense_lm(ids).logits)
        rows.append(
            dict(model=name, gguf_s=round(gguf_s, 1), dense_copy_s=round(dense_s, 1), same_logits=same)
            | stamp(torch.device("cpu"))
        )
    print_table(rows, ["model", "gguf_s", "dense_copy_s", "same_logits", "device"])
    write_csv(args.out, rows)
    return 0 if all(r["same_logits"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())

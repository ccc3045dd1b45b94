"""Should the prefill be compiled? Eager vs ``torch.compile(dynamic=True)`` prefill of a patched model.

    python benchmarks/bench_prefill_compile.py                 # SmolLM2-135M on CPU
    python benchmarks/bench_prefill_compile.py --device cuda --lengths 4096 8192 16384 32768

For each prompt length (all different, as in real traffic): eager seconds, compiled seconds (after the
first compilation), the one-off compile time, and dynamo's graph and graph-break counts, so the
decision (docs/compile.md) rests on numbers: a prefill is one long call dominated by the
attention and matmul kernels, so what compile can save is small next to what it costs per new shape.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

sys.path.insert(0, __import__("os").path.dirname(__file__))
from common import device_from_args, print_table, stamp, write_csv  # noqa: E402

import minikv  # noqa: E402
from minikv.compat import cache_key  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default=None)
    p.add_argument("--lengths", type=int, nargs="+", default=[1000, 1500, 2000, 2500])
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--out", default="benchmarks/results/prefill_compile.csv")
    args = p.parse_args()
    device = device_from_args(args.device)
    from torch._dynamo.utils import counters

    from minikv.models import load_model

    model, _ = load_model(None, "float32", str(device))
    minikv.patch(model, bits=2, budget=0.5)
    cfg = model._minikv_patch.config

    def prefill(ids):
        cache = minikv.MiniKVCache(cfg, model.config, max_new_tokens=16)
        return model(ids, use_cache=True, **{cache_key(): cache}).logits[:, -1]

    compiled = torch.compile(prefill, dynamic=True)

    def seconds(fn, ids):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        with torch.inference_mode():
            fn(ids)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t

    info, rows = stamp(device), []
    torch._dynamo.reset()
    counters.clear()
    for T in args.lengths:
        ids = torch.randint(100, 1000, (1, T), device=device)
        seconds(prefill, ids)  # warm-up
        eager = min(seconds(prefill, ids) for _ in range(args.reps))
        first = seconds(compiled, ids)  # compiles when this shape is new to dynamo
        comp = min(seconds(compiled, ids) for _ in range(args.reps))
        rows.append(
            {
                "prompt_tokens": T,
                "eager_s": eager,
                "compiled_s": comp,
                "first_compiled_call_s": first,
                "graphs_so_far": int(counters["stats"]["unique_graphs"]),
                "graph_breaks_so_far": sum(counters["graph_break"].values()),
                **info,
            }
        )
        print(f"T={T}: eager {eager:.2f} s, compiled {comp:.2f} s, first compiled call {first:.1f} s", flush=True)
    print_table(
        rows,
        ["prompt_tokens", "eager_s", "compiled_s", "first_compiled_call_s", "graphs_so_far", "graph_breaks_so_far"],
    )
    write_csv(args.out, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())

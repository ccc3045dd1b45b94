"""Prompt attention with importance scores vs plain flash attention, per provider.

    python benchmarks/bench_prefill.py [--device cuda] [--quick]

Providers: minikv-triton (two launches: flash forward with LSE, then the key-block score pass),
reference (PyTorch, query blocks), sdpa_fp16 / sdpa_bf16 (torch SDPA causal, no scores).
"""

from __future__ import annotations

import argparse
import sys

import torch

sys.path.insert(0, __import__("os").path.dirname(__file__))
from common import bench, device_from_args, print_table, stamp, write_csv  # noqa: E402

from minikv.kernels import reference  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default=None)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default="benchmarks/results/prefill.csv")
    p.add_argument("--providers", default="minikv-triton,reference,sdpa_fp16,sdpa_bf16")
    args = p.parse_args()
    device = device_from_args(args.device)
    providers = args.providers.split(",")
    cases = [(1, 8, 2, 512, 64)] if args.quick else [(1, 32, 8, T, 128) for T in (8192, 16384, 32768)]
    info, rows = stamp(device), []
    for B, Hq, Hkv, T, D in cases:
        q = torch.randn(B, Hq, T, D, dtype=torch.float16, device=device)
        k = torch.randn(B, Hkv, T, D, dtype=torch.float16, device=device)
        v = torch.randn(B, Hkv, T, D, dtype=torch.float16, device=device)
        valid = torch.ones(B, T, dtype=torch.bool, device=device)
        w = valid.float()
        fns = {}
        if "minikv-triton" in providers and device.type == "cuda":
            from minikv.kernels.triton_prefill import prefill_attention

            fns["minikv-triton"] = lambda: prefill_attention(q, k, v, valid, w, D**-0.5, 0.0)
        if "reference" in providers and T <= 8192:
            fns["reference"] = lambda: reference.prefill_attention(q, k, v, valid, w, D**-0.5, 0.0)
        for name, dt in (("sdpa_fp16", torch.float16), ("sdpa_bf16", torch.bfloat16)):
            if name in providers:
                qq, kk, vv = q.to(dt), k.to(dt), v.to(dt)
                fns[name] = lambda qq=qq, kk=kk, vv=vv: torch.nn.functional.scaled_dot_product_attention(
                    qq, kk, vv, is_causal=True, scale=D**-0.5, enable_gqa=True
                )
        base = None
        for name, fn in fns.items():
            ms = bench(fn, device, reps=3)
            base = ms if name == "sdpa_fp16" else base
            rows.append({"provider": name, "B": B, "Hq": Hq, "Hkv": Hkv, "T": T, "D": D, "median_ms": ms, **info})
            print(f"{name:14s} T={T}: {ms:.3f} ms", flush=True)
        for r in rows:
            if r["T"] == T:
                r["x_sdpa_fp16"] = r["median_ms"] / base if base else float("nan")
    print_table(rows, ["provider", "T", "median_ms", "x_sdpa_fp16"])
    write_csv(args.out, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())

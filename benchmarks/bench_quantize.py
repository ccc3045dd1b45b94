"""Quantize + pack of a block of keys and values, per provider.

    python benchmarks/bench_quantize.py [--device cuda] [--quick]

Providers: minikv-triton, reference (torchao affine primitives + torch packing). GB/s counts the
bytes read (the fp16 input) and written (codes, scales, minimums).
"""

from __future__ import annotations

import argparse
import sys

import torch

sys.path.insert(0, __import__("os").path.dirname(__file__))
from common import bench, device_from_args, print_table, stamp, write_csv  # noqa: E402

from minikv.kernels import quant  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default=None)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default="benchmarks/results/quantize.csv")
    args = p.parse_args()
    device = device_from_args(args.device)
    cases = (
        [(1, 2, 512, 64, 2, 16)]
        if args.quick
        else [(B, 8, T, 128, bits, G) for B in (1, 8) for T in (4096, 32768) for bits, G in ((2, 16), (2, 32), (4, 32))]
    )
    info, rows = stamp(device), []
    for B, H, T, D, bits, G in cases:
        k = torch.randn(B, H, T, D, dtype=torch.float16, device=device)
        fns = {
            "reference": lambda: (quant.quantize_pack(k.transpose(-1, -2), bits, G), quant.quantize_pack(k, bits, G))
        }
        if device.type == "cuda":
            from minikv.kernels.triton_quant import quantize_pack

            fns["minikv-triton"] = lambda: (quantize_pack(k.transpose(-1, -2), bits, G), quantize_pack(k, bits, G))
        nbytes = 2 * (k.numel() * 2 + k.numel() * bits // 8 + 2 * (k.numel() // G) * 2)
        for name, fn in fns.items():
            ms = bench(fn, device, reps=5)
            rows.append(
                {
                    "provider": name,
                    "B": B,
                    "H": H,
                    "T": T,
                    "D": D,
                    "bits": bits,
                    "G": G,
                    "median_ms": ms,
                    "GB_per_s": nbytes / (ms * 1e-3) / 1e9,
                    **info,
                }
            )
            print(f"{name:14s} B={B} T={T} bits={bits} G={G}: {ms:.3f} ms", flush=True)
    print_table(rows, ["provider", "B", "T", "bits", "G", "median_ms", "GB_per_s"])
    write_csv(args.out, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())

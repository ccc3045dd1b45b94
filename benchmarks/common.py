"""Shared benchmark helpers: timing (``triton.testing.do_bench`` medians on CUDA), hardware and
version stamps, CSV output."""

from __future__ import annotations

import csv
import os
import platform
import statistics
import time

import torch


def stamp(device: torch.device) -> dict:
    import transformers

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "none"
    name = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"{platform.processor() or platform.machine()} ({os.cpu_count()} cpus)"
    )
    return {
        "device": name,
        "torch": torch.__version__,
        "triton": triton_version,
        "transformers": transformers.__version__,
    }


def bench(fn, device: torch.device, reps: int = 20) -> float:
    """Median milliseconds of ``fn()``: ``do_bench`` on CUDA, wall clock elsewhere (smoke runs)."""
    if device.type == "cuda":
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=25, rep=100, return_mode="median"))
    fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def copy_bandwidth(device: torch.device, nbytes: int = 1 << 30) -> float:
    """Measured device-to-device copy bandwidth in GB/s (read + write)."""
    if device.type != "cuda":
        nbytes = 1 << 26
    x = torch.empty(nbytes // 2, dtype=torch.float16, device=device)
    y = torch.empty_like(x)
    ms = bench(lambda: y.copy_(x), device)
    return 2 * nbytes / (ms * 1e-3) / 1e9


def write_csv(path: str, rows: list[dict]) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    print(f"wrote {path}")


def print_table(rows: list[dict], cols: list[str]) -> None:
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(f"{r[c]:.3f}" if isinstance(r[c], float) else str(r[c]) for c in cols) + " |")


def device_from_args(name: str | None) -> torch.device:
    if name:
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")

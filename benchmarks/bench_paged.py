"""Paged decode (vLLM's pages, read in place): minikv's kernel against bf16 attention over the same tokens.

    python benchmarks/bench_paged.py [--device cuda] [--quick]

Llama-3.1-8B heads (32 query / 8 KV heads, head_dim 128), one new token per sequence, contexts of
8k/32k/128k tokens, batch 1/8/32, block size 256. Providers:

- ``minikv-paged``: ``minikv::paged_decode_attention`` over K4 V2 / K2 V2 pages (G 32) through a
  shuffled block table (Triton on CUDA; on CPU the C++ kernel over a copy, for a smoke run);
- ``flash_attn_bf16`` / ``flash_attn_fp8``: ``flash_attn_with_kvcache`` over bf16 (fp8) pages with the
  same block table, when ``flash_attn`` is installed;
- ``sdpa_bf16``: torch SDPA over a contiguous bf16 cache (no pages), always.

Prints and writes microseconds, the bytes each provider must read (minikv: every code, scale, minimum
and the open group's residual; bf16/fp8: K and V), GB/s and the fraction of a measured copy bandwidth
to ``benchmarks/results/paged_<device>.csv``.
"""

from __future__ import annotations

import argparse
import itertools
import sys

import torch

sys.path.insert(0, __import__("os").path.dirname(__file__))
from common import bench, copy_bandwidth, device_from_args, print_table, stamp, write_csv  # noqa: E402

from minikv.kernels import ops  # noqa: E402
from minikv.vllm import paged  # noqa: E402
from minikv.vllm.layout import PageLayout  # noqa: E402

HQ, HKV, D, N, G = 32, 8, 128, 256, 32


def random_pages(lay: PageLayout, blocks: int, device) -> dict:
    """Region views of a cache ``[blocks, Hkv, N, C]`` with random codes and sane scales (timing does not
    depend on the values; writing 128k tokens per sequence through the write path would)."""
    cache = torch.empty(blocks, HKV, N, lay.slot_bytes // 2, dtype=torch.bfloat16, device=device)
    views = lay.views(cache)
    for name in ("k_codes", "v_codes"):
        views[name].copy_(torch.randint(-(2**31), 2**31 - 1, views[name].shape, device=device, dtype=torch.int32))
    for name in ("k_scale", "v_scale", "k_mn", "v_mn"):
        views[name].copy_(torch.rand(views[name].shape, device=device) * 0.1)
    views["k_res"].copy_(torch.randn(views["k_res"].shape, device=device))
    return views


def minikv_bytes(lay: PageLayout, B: int, T: int) -> int:
    """Bytes the kernel must read: per KV head and token, codes and group scales/minimums; per sequence and
    KV head one open group's residual (G x D, model dtype)."""
    per_token = D * (lay.k_bits + lay.v_bits) // 8 + 2 * 2 * D // G + 2 * 2 * (D // G)
    return B * HKV * (T * per_token + G * D * 2) + B * HQ * D * 2


def run(device, contexts, batches, bit_pairs) -> list[dict]:
    info, bw = stamp(device), copy_bandwidth(device)
    rows = []
    for T, B in itertools.product(contexts, batches):
        nb = -(-T // N)
        table = torch.randperm(B * nb, device=device).view(B, nb).int() + 1  # block 0 is vLLM's null block
        lens = torch.full((B,), T, dtype=torch.int32, device=device)
        q = torch.randn(B, HQ, D, dtype=torch.bfloat16, device=device)
        dense_bytes = 2 * B * HKV * T * D * 2
        fns = {}
        for kb, vb in bit_pairs:
            lay = PageLayout(D, N, torch.bfloat16, kb, vb, G)
            views = random_pages(lay, B * nb + 1, device)
            regions = [views[n] for n in paged.REGIONS]
            fns[f"minikv-paged K{kb}V{vb}"] = (
                lambda regions=regions, kb=kb, vb=vb: ops.paged_decode_attention(
                    q, *regions, table, lens, D**-0.5, 0.0, kb, vb, G
                ),
                minikv_bytes(lay, B, T),
            )
        k = torch.randn(B, HKV, T, D, dtype=torch.bfloat16, device=device)
        fns["sdpa_bf16"] = (
            lambda k=k: torch.nn.functional.scaled_dot_product_attention(q[:, :, None], k, k, enable_gqa=True),
            dense_bytes,
        )
        try:
            from flash_attn import flash_attn_with_kvcache

            kc = torch.randn(B * nb + 1, N, HKV, D, dtype=torch.bfloat16, device=device)
            for name, dt in (("flash_attn_bf16", torch.bfloat16), ("flash_attn_fp8", torch.float8_e4m3fn)):
                kp = kc.to(dt)
                fns[name] = (
                    lambda kp=kp: flash_attn_with_kvcache(
                        q[:, None], kp, kp, cache_seqlens=lens, block_table=table, causal=True
                    ),
                    dense_bytes * dt.itemsize // 2,
                )
        except Exception as e:  # noqa: BLE001 - an optional peer
            print(f"flash_attn skipped: {e!r}", file=sys.stderr)
        for name, (fn, nbytes) in fns.items():
            try:
                ms = bench(fn, device)
            except Exception as e:  # noqa: BLE001 - e.g. fp8 pages on a flash_attn without them
                print(f"{name} failed: {e!r}", file=sys.stderr)
                continue
            gbs = nbytes / (ms * 1e-3) / 1e9
            rows.append(
                dict(
                    provider=name,
                    B=B,
                    T=T,
                    us=ms * 1e3,
                    bytes_read=nbytes,
                    bytes_vs_bf16=nbytes / dense_bytes,
                    GB_per_s=gbs,
                    fraction_of_copy_bw=gbs / bw,
                    copy_GB_per_s=bw,
                    **info,
                )
            )
            print(
                f"{name:22s} B={B:3d} T={T:7d}: {ms * 1e3:9.1f} us {gbs:7.0f} GB/s ({gbs / bw:.0%} of copy)", flush=True
            )
        del k, fns
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default=None)
    p.add_argument("--quick", action="store_true", help="one small shape (a CPU smoke run)")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    device = device_from_args(args.device)
    if args.quick:
        rows = run(device, [1024], [2], [(4, 2)])
    else:
        rows = run(device, [8192, 32768, 131072], [1, 8, 32], [(4, 2), (2, 2)])
    print_table(rows, ["provider", "B", "T", "us", "bytes_vs_bf16", "GB_per_s", "fraction_of_copy_bw"])
    write_csv(args.out or f"benchmarks/results/paged_{device.type}.csv", rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())

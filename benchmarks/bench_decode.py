"""Decode attention: one new token over a cache of T tokens, per provider.

    python benchmarks/bench_decode.py [--device cuda] [--quick]

Providers: minikv-triton (fused 2-bit/4-bit kernel), reference (PyTorch: dequantize all, then attend),
sdpa_fp16 / sdpa_bf16 (torch SDPA on the uncompressed cache), hf_quantized (HF QuantizedCache's step:
dequantize the whole cache with quanto, then SDPA; needs optimum-quanto). GB/s counts the bytes each
provider must read (codes, scales, minimums, residual and q; or the fp16 K/V). Next to each timing:
the bytes read as a fraction of SDPA fp16's, and the time and speedup over SDPA fp16 those bytes imply
at 3.0 TB/s (an H100's measured copy bandwidth): the bound a bandwidth-limited kernel can reach.
"""

from __future__ import annotations

import argparse
import sys

import torch

sys.path.insert(0, __import__("os").path.dirname(__file__))
from common import bench, copy_bandwidth, device_from_args, print_table, stamp, write_csv  # noqa: E402

from minikv import MiniKVConfig  # noqa: E402
from minikv.kernels import reference  # noqa: E402
from minikv.store import QuantizedStore  # noqa: E402

HBM_BYTES_PER_S = 3.0e12


def make_store(B, Hkv, D, T, bits, G, R, dtype, device, k_bits=None):
    # the kernel alone: values at `bits`, keys at `k_bits` (default `bits`), no sinks, no rotation
    # (applied outside the kernel)
    cfg = MiniKVConfig(
        bits=bits,
        k_bits=k_bits or bits,
        q_group_size=G,
        residual_length=R,
        sink_tokens=0,
        rotate="none",
        backend="auto",
    )
    store = QuantizedStore(cfg, B, Hkv, D, T, dtype, device)
    k = torch.randn(B, Hkv, T, D, dtype=dtype, device=device)
    v = torch.randn(B, Hkv, T, D, dtype=dtype, device=device)
    store.write_prompt(k, v, torch.full((B,), T, dtype=torch.int64, device=device))
    return store, k, v


def store_bytes(store, q) -> int:
    return store.used_bytes() + q.numel() * q.element_size()


def run(cases, providers, device, bits, G, k_bits=None):
    rows = []
    info = stamp(device)
    bw = copy_bandwidth(device)
    for B, Hq, Hkv, T, D in cases:
        for dtype_name in ("float16",):
            dtype = getattr(torch, dtype_name)
            store, k, v = make_store(B, Hkv, D, T, bits, G, 128, dtype, device, k_bits)
            q = torch.randn(B, Hq, 1, D, dtype=dtype, device=device)
            scale = D**-0.5
            fns = {}
            if "minikv-triton" in providers and device.type == "cuda":
                from minikv.kernels.triton_decode import decode_attention

                fns["minikv-triton"] = (
                    lambda: decode_attention(q, *store.buffers(), scale, 0.0, store.k_bits, store.v_bits, G),
                    store_bytes(store, q),
                )
            if "reference" in providers:
                fns["reference"] = (
                    lambda: reference.decode_attention(q, *store.buffers(), scale, 0.0, store.k_bits, store.v_bits, G),
                    store_bytes(store, q),
                )
            for name, dt in (("sdpa_fp16", torch.float16), ("sdpa_bf16", torch.bfloat16)):
                if name in providers:
                    kk, vv, qq = k.to(dt), v.to(dt), q.to(dt)
                    fns[name] = (
                        lambda kk=kk, vv=vv, qq=qq: torch.nn.functional.scaled_dot_product_attention(
                            qq, kk, vv, scale=scale, enable_gqa=True
                        ),
                        2 * kk.numel() * kk.element_size(),
                    )
            if "hf_quantized" in providers:
                try:
                    from optimum.quanto import MaxOptimizer, qint2, qint4, quantize_weight  # noqa: F401
                    from transformers.cache_utils import QuantoQuantizedLayer

                    layer = QuantoQuantizedLayer(nbits=bits, q_group_size=64, residual_length=128)
                    layer.update(k, v)
                    new_k = torch.randn(B, Hkv, 1, D, dtype=dtype, device=device)
                    fns["hf_quantized"] = (
                        lambda: torch.nn.functional.scaled_dot_product_attention(
                            q, *layer.update(new_k, new_k), scale=scale, enable_gqa=True
                        ),
                        store_bytes(store, q),
                    )
                except Exception as e:  # noqa: BLE001 - an optional peer
                    print(f"hf_quantized skipped: {e!r}", file=sys.stderr)
            sdpa_bytes = 2 * k.numel() * 2  # fp16 K and V (what the sdpa_fp16 row reads)
            for name, (fn, nbytes) in fns.items():
                ms = bench(fn, device)
                gbs = nbytes / (ms * 1e-3) / 1e9
                rows.append(
                    {
                        "provider": name,
                        "B": B,
                        "Hq": Hq,
                        "Hkv": Hkv,
                        "T": T,
                        "D": D,
                        "bits": bits,
                        "k_bits": store.k_bits,
                        "G": G,
                        "dtype": dtype_name,
                        "median_ms": ms,
                        "bytes_read": nbytes,
                        "bytes_vs_sdpa_fp16": nbytes / sdpa_bytes,
                        "ms_at_3TBps": nbytes / HBM_BYTES_PER_S * 1e3,
                        "speedup_at_3TBps": sdpa_bytes / nbytes,
                        "GB_per_s": gbs,
                        "fraction_of_copy_bw": gbs / bw,
                        "copy_GB_per_s": bw,
                        **info,
                    }
                )
                print(
                    f"{name:14s} B={B} Hq={Hq} Hkv={Hkv} T={T} D={D}: {ms:.3f} ms, {gbs:.0f} GB/s; reads "
                    f"{nbytes / sdpa_bytes:.3f} of SDPA fp16's bytes -> {sdpa_bytes / nbytes:.2f}x at 3.0 TB/s",
                    flush=True,
                )
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default=None)
    p.add_argument("--bits", type=int, default=2, help="value bits (and key bits unless --k-bits)")
    p.add_argument("--k-bits", type=int, default=None, help="key bits (default: --bits)")
    p.add_argument("--group", type=int, default=32)
    p.add_argument("--quick", action="store_true", help="small shapes (a CPU smoke run)")
    p.add_argument("--out", default="benchmarks/results/decode.csv")
    p.add_argument("--providers", default="minikv-triton,reference,sdpa_fp16,sdpa_bf16,hf_quantized")
    args = p.parse_args()
    device = device_from_args(args.device)
    if args.quick:
        cases = [(1, 8, 2, 512, 64)]
    else:  # Llama-3.1-8B-like heads (32 q / 8 kv, D 128); batch x KV heads >= 32 at T >= 16k
        cases = [(B, 32, 8, T, 128) for B in (1, 4, 8) for T in (4096, 16384, 32768)]
        cases += [(B, 4, 1, T, 256) for B in (1, 8) for T in (4096, 32768)]  # Gemma 3 270M's global layers: MQA, D 256
    rows = run(cases, args.providers.split(","), device, args.bits, args.group, args.k_bits)
    print_table(
        rows,
        [
            "provider",
            "B",
            "D",
            "T",
            "median_ms",
            "GB_per_s",
            "fraction_of_copy_bw",
            "bytes_vs_sdpa_fp16",
            "speedup_at_3TBps",
        ],
    )
    write_csv(args.out, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())

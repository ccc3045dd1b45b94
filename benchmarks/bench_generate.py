"""End-to-end decode speed: tokens/s per provider, with KV bytes (and peak memory on CUDA).

    python benchmarks/bench_generate.py                       # SmolLM2-135M on CPU
    python benchmarks/bench_generate.py --llama8b --device cuda --batch 1 8 32 --context 4096 32768

Providers: minikv-eager (``minikv.generate``), minikv-compiled (decode step compiled, fullgraph),
minikv-cudagraphs (``mode="reduce-overhead"``, CUDA only), hf-static-compiled (HF ``StaticCache``, SDPA,
the same compiled loop), hf-dynamic (plain ``model.generate``), hf-quantized (HF ``QuantizedCache``,
quanto int2, needs optimum-quanto). Decode tokens/s = batch x (new tokens - 1) / (time of the
generation - time of the prefill alone).
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
from minikv.loop import _compiled_step, _decode_step  # noqa: E402


def load(args, device):
    if args.llama8b:  # Llama-3.1-8B shapes, random weights
        from transformers import LlamaConfig, LlamaForCausalLM

        cfg = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                          num_key_value_heads=8, vocab_size=128256, max_position_embeddings=131072, rope_theta=500000.0)
        with torch.device(device):
            model = LlamaForCausalLM(cfg).to(torch.bfloat16).eval()
        return model, "Llama-3.1-8B-shaped (random weights, bf16)"
    from minikv.models import load_model

    model, _ = load_model(None, args.dtype, str(device))
    return model, f"SmolLM2-135M-Instruct ({args.dtype})"


def timed(fn, device):
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return out, time.perf_counter() - t


def static_loop(model, ids, new, compiled):
    from transformers import StaticCache

    cache = StaticCache(config=model.config, max_cache_len=ids.shape[1] + new)
    with torch.inference_mode():
        logits = model(ids, use_cache=True, **{cache_key(): cache}).logits[:, -1]
        step = _compiled_step(None) if compiled else _decode_step
        tok, pos = logits.argmax(-1, keepdim=True), torch.full((ids.shape[0], 1), ids.shape[1] - 1, device=ids.device)
        for _ in range(new - 1):
            pos = pos + 1
            tok = step(model, cache, tok, pos).argmax(-1, keepdim=True)
    return cache


def providers(model, knobs, device, wanted):
    def mk(compile, mode=None):
        def run(ids, new):
            minikv.patch(model, **knobs)
            try:
                cache = minikv.MiniKVCache(model._minikv_patch.config, model.config, max_new_tokens=new)
                minikv.generate(model, ids, max_new_tokens=new, compile=compile, mode=mode, cache=cache)
                return cache.memory().used_bytes
            finally:
                minikv.unpatch(model)
        return run

    def hf(impl):
        def run(ids, new):
            kw = dict(cache_implementation="quantized", cache_config={"backend": "quanto", "nbits": 2}) if impl == "quantized" else {}
            with torch.inference_mode():
                model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False, **kw)
            return None
        return run

    table = {
        "minikv-eager": mk(False),
        "minikv-compiled": mk(True),
        "minikv-cudagraphs": mk(True, "reduce-overhead") if device.type == "cuda" else None,
        "hf-static-compiled": lambda ids, new: (static_loop(model, ids, new, True), None)[1],
        "hf-dynamic": hf("dynamic"),
        "hf-quantized": hf("quantized"),
    }
    return {k: v for k, v in table.items() if v is not None and k in wanted}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default=None)
    p.add_argument("--llama8b", action="store_true")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--batch", type=int, nargs="+", default=[1])
    p.add_argument("--context", type=int, nargs="+", default=[2048])
    p.add_argument("--new", type=int, default=32)
    p.add_argument("--bits", type=int, default=2)
    p.add_argument("--budget", default="0.5")
    p.add_argument("--providers", default="minikv-eager,minikv-compiled,minikv-cudagraphs,hf-static-compiled,hf-dynamic,hf-quantized")
    p.add_argument("--out", default="benchmarks/results/generate.csv")
    args = p.parse_args()
    device = device_from_args(args.device)
    model, name = load(args, device)
    knobs = dict(bits=args.bits, budget=float(args.budget) if "." in args.budget else int(args.budget), q_group_size=16)
    info, rows = stamp(device), []
    for B in args.batch:
        for T in args.context:
            ids = torch.randint(100, 1000, (B, T), device=device)
            for prov, run in providers(model, knobs, device, args.providers.split(",")).items():
                try:
                    run(ids, args.new)  # warm-up: compilation happens here, for these shapes
                    if device.type == "cuda":
                        torch.cuda.reset_peak_memory_stats()
                    _, t_prefill = timed(lambda: run(ids, 1), device)
                    kv, t_total = timed(lambda: run(ids, args.new), device)
                except Exception as e:  # noqa: BLE001 - a provider may not exist here
                    print(f"{prov}: skipped ({type(e).__name__}: {str(e)[:120]})", file=sys.stderr)
                    continue
                tps = B * (args.new - 1) / max(t_total - t_prefill, 1e-9)
                peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
                rows.append({"provider": prov, "model": name, "batch": B, "context": T, "new_tokens": args.new,
                             "decode_tokens_per_s": tps, "prefill_s": t_prefill,
                             "kv_MiB": kv / 2**20 if kv else float("nan"), "peak_GiB": peak, **info})
                print(f"{prov:20s} B={B} T={T}: {tps:.1f} tokens/s (prefill {t_prefill:.2f} s)", flush=True)
    print_table(rows, ["provider", "batch", "context", "decode_tokens_per_s", "prefill_s", "kv_MiB", "peak_GiB"])
    write_csv(args.out, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""End-to-end generation speed: decode tokens/s timed between tokens, prefill tokens/s, KV bytes and
peak memory, per provider, side by side in one run.

    python benchmarks/bench_generate.py --context 1000 4000 8000 --batch 1 4          # SmolLM2 on CPU
    python benchmarks/bench_generate.py --model gemma3-270m --context 8000 32000
    python benchmarks/bench_generate.py --llama8b --device cuda --batch 1 8 32 --context 4096 32768

Providers: minikv-eager (``model.generate`` on a patched model: what a user runs), minikv-compiled
(the decode step compiled, fullgraph), minikv-cudagraphs (``mode="reduce-overhead"``, CUDA only),
hf-dynamic (``model.generate``, transformers' DynamicCache), hf-static-compiled (StaticCache, the
same compiled loop), hf-quantized (QuantizedCache, quanto int2). minikv runs its defaults unless
``--bits`` / ``--budget`` say otherwise.

Each provider runs in its own process (``--no-isolate``: in this one), so its peak resident memory
is its own. Timing: a stamp when each token's logits are ready; prefill = start to the first stamp
(selection, quantization and any scoring pass included); decode tokens/s = batch x tokens / time
between the stamps after the first ``WARM`` decode steps (a compiled step compiles on its first).
``vs_dynamic`` is the decode rate over hf-dynamic's in the same cell.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch
from transformers import LogitsProcessor

sys.path.insert(0, __import__("os").path.dirname(__file__))
from common import device_from_args, print_table, stamp, write_csv  # noqa: E402

import minikv  # noqa: E402
from minikv.compat import cache_key  # noqa: E402
from minikv.loop import _compiled_step  # noqa: E402

PROVIDERS = ("minikv-eager", "minikv-compiled", "minikv-cudagraphs", "hf-dynamic", "hf-static-compiled", "hf-quantized")
WARM = 2  # decode steps not timed


def load(args, device):
    if args.llama8b:  # Llama-3.1-8B shapes, random weights
        from transformers import LlamaConfig, LlamaForCausalLM

        cfg = LlamaConfig(
            hidden_size=4096,
            intermediate_size=14336,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=8,
            vocab_size=128256,
            max_position_embeddings=131072,
            rope_theta=500000.0,
        )
        with torch.device(device):
            model = LlamaForCausalLM(cfg).to(torch.bfloat16).eval()
        return model, "Llama-3.1-8B-shaped (random weights, bf16)"
    from minikv.models import load_model

    model, _ = load_model(args.model, args.dtype, str(device))
    return model, f"{args.model} ({args.dtype})"


class Stamps(LogitsProcessor):
    """Wall-clock stamps: one when each token's logits are ready (a logits processor for ``generate``)."""

    def __init__(self, device):
        self.device, self.times = device, []

    def mark(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        self.times.append(time.perf_counter())

    def __call__(self, input_ids, scores):
        self.mark()
        return scores


def _generate(model, ids, new, stamps, **kw):
    with torch.inference_mode():
        out = model.generate(
            ids,
            max_new_tokens=new,
            min_new_tokens=new,
            do_sample=False,
            logits_processor=[stamps],
            return_dict_in_generate=True,
            **kw,
        )
    return out.past_key_values


def _loop(model, ids, new, stamps, cache, step):
    with torch.inference_mode():
        logits = model(ids, use_cache=True, **{cache_key(): cache}, logits_to_keep=1).logits[:, -1]
        stamps.mark()
        tok, pos = logits.argmax(-1, keepdim=True), torch.full((ids.shape[0], 1), ids.shape[1] - 1, device=ids.device)
        for _ in range(new - 1):
            pos = pos + 1
            tok = step(model, cache, tok, pos).argmax(-1, keepdim=True)
            stamps.mark()
    return cache


def run_provider(prov, model, ids, new, knobs, device):
    """Generate ``new`` tokens after ``ids`` with one provider -> (stamps, start time, KV bytes or None)."""
    stamps = Stamps(device)
    start = time.perf_counter()
    if prov.startswith("minikv"):
        minikv.patch(model, **knobs)
        try:
            if prov == "minikv-eager":
                cache = _generate(model, ids, new, stamps)
            else:
                cache = minikv.MiniKVCache(model._minikv_patch.config, model.config, max_new_tokens=new)
                mode = "reduce-overhead" if prov == "minikv-cudagraphs" else None
                _loop(model, ids, new, stamps, cache, _compiled_step(mode))
            return stamps.times, start, cache.memory("all").used_bytes  # sliding-window layers too
        finally:
            minikv.unpatch(model)
    if prov == "hf-dynamic":
        cache = _generate(model, ids, new, stamps)
        return stamps.times, start, _dense_bytes(cache)
    if prov == "hf-quantized":
        _generate(
            model, ids, new, stamps, cache_implementation="quantized", cache_config={"backend": "quanto", "nbits": 2}
        )
        return stamps.times, start, None
    if prov == "hf-static-compiled":
        from transformers import StaticCache

        cache = StaticCache(config=model.config, max_cache_len=ids.shape[1] + new)
        _loop(model, ids, new, stamps, cache, _compiled_step(None))
        return stamps.times, start, _dense_bytes(cache)
    raise ValueError(f"unknown provider {prov!r}; choose from {PROVIDERS}")


def _dense_bytes(cache) -> int | None:
    try:
        return sum(
            t.numel() * t.element_size()
            for layer in cache.layers
            for t in (layer.keys, layer.values)
            if isinstance(t, torch.Tensor)
        )
    except AttributeError:
        return None


def measure(prov, model, B, T, new, knobs, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(100, 1000, (B, T), generator=g).to(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times, start, kv = run_provider(prov, model, ids, new, knobs, device)
    warm = min(WARM, max(len(times) - 2, 0))
    decode = B * (len(times) - 1 - warm) / max(times[-1] - times[warm], 1e-9)
    prefill = times[0] - start
    peak = (
        torch.cuda.max_memory_allocated()
        if device.type == "cuda"
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    )
    return {
        "provider": prov,
        "batch": B,
        "context": T,
        "new_tokens": new,
        "decode_tokens_per_s": decode,
        "prefill_tokens_per_s": B * T / prefill,
        "prefill_s": prefill,
        "kv_MiB": kv / 2**20 if kv else float("nan"),
        "peak_MiB": peak / 2**20,
    }


def worker(args) -> int:
    """One provider in this process: print its row as JSON on the last line."""
    device = device_from_args(args.device)
    model, _ = load(args, device)
    row = measure(args.worker, model, args.batch[0], args.context[0], args.new, knobs_of(args), device)
    print(json.dumps(row))
    return 0


def knobs_of(args) -> dict:
    knobs = {}
    if args.bits is not None:
        knobs["bits"] = args.bits
    if args.backend is not None:
        knobs["backend"] = args.backend
    if args.budget is not None:
        knobs["budget"] = (
            None if args.budget == "none" else float(args.budget) if "." in args.budget else int(args.budget)
        )
    return knobs


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default=None)
    p.add_argument("--model", default="smollm2", help="an embedded model: smollm2 or gemma3-270m")
    p.add_argument("--llama8b", action="store_true", help="Llama-3.1-8B shapes with random weights (for a GPU)")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--batch", type=int, nargs="+", default=[1])
    p.add_argument("--context", type=int, nargs="+", default=[2048])
    p.add_argument("--new", type=int, default=32)
    p.add_argument("--bits", type=int, default=None, help="minikv's bits (default: the library's)")
    p.add_argument("--budget", default=None, help="minikv's budget (default: the library's)")
    p.add_argument("--backend", default=None, help="minikv's backend: auto (default) or reference (PyTorch)")
    p.add_argument("--providers", default="minikv-eager,minikv-compiled,hf-dynamic,hf-static-compiled")
    p.add_argument("--no-isolate", dest="isolate", action="store_false", help="every provider in this process")
    p.add_argument("--out", default="benchmarks/results/generate.csv")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.new < 2:
        p.error(f"--new must be >= 2 (decode is timed between tokens), got {args.new}")
    wanted = args.providers.split(",")
    if unknown := set(wanted) - set(PROVIDERS):
        p.error(f"--providers: unknown {sorted(unknown)}; choose from {', '.join(PROVIDERS)}")
    if args.worker:
        return worker(args)
    device = device_from_args(args.device)
    if device.type != "cuda":
        wanted = [w for w in wanted if w != "minikv-cudagraphs"]
    model, name = (None, None) if args.isolate else load(args, device)
    info, rows = stamp(device), []
    for B in args.batch:
        for T in args.context:
            cell = []
            for prov in wanted:
                try:
                    row = (
                        isolated(args, prov, B, T)
                        if args.isolate
                        else measure(prov, model, B, T, args.new, knobs_of(args), device)
                    )
                except Exception as e:  # noqa: BLE001 - a provider may not exist here (quanto, CUDA graphs)
                    print(f"{prov}: skipped ({type(e).__name__}: {str(e)[:200]})", file=sys.stderr)
                    continue
                cell.append(row)
                print(
                    f"{prov:20s} B={B} T={T}: decode {row['decode_tokens_per_s']:.1f} tokens/s, prefill "
                    f"{row['prefill_tokens_per_s']:.0f} tokens/s, peak {row['peak_MiB']:.0f} MiB",
                    flush=True,
                )
            base = next((r["decode_tokens_per_s"] for r in cell if r["provider"] == "hf-dynamic"), float("nan"))
            base_pre = next((r["prefill_tokens_per_s"] for r in cell if r["provider"] == "hf-dynamic"), float("nan"))
            label = "Llama-3.1-8B-shaped" if args.llama8b else name or args.model
            for r in cell:
                r.update(
                    vs_dynamic=r["decode_tokens_per_s"] / base,
                    prefill_vs_dynamic=r["prefill_tokens_per_s"] / base_pre,
                    model=label,
                    **info,
                )
            rows += cell
    print_table(
        rows,
        [
            "provider",
            "batch",
            "context",
            "decode_tokens_per_s",
            "vs_dynamic",
            "prefill_tokens_per_s",
            "prefill_vs_dynamic",
            "kv_MiB",
            "peak_MiB",
        ],
    )
    write_csv(args.out, rows)
    return 0


def isolated(args, prov, B, T) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--worker",
        prov,
        "--batch",
        str(B),
        "--context",
        str(T),
        "--new",
        str(args.new),
        "--model",
        args.model,
        "--dtype",
        args.dtype,
    ]
    cmd += ["--device", args.device] if args.device else []
    cmd += ["--llama8b"] if args.llama8b else []
    cmd += ["--bits", str(args.bits)] if args.bits is not None else []
    cmd += ["--budget", args.budget] if args.budget is not None else []
    cmd += ["--backend", args.backend] if args.backend is not None else []
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    sys.exit(main())

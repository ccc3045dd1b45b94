"""What the kvzip scorer's reconstruction pass costs: seconds per 1k prompt tokens and FLOPs vs the prefill.

    python benchmarks/bench_reconstruct.py                     # SmolLM2, ~2k and ~4k-token prompts, CPU
    python benchmarks/bench_reconstruct.py --model gemma3-270m --tokens 2000,8000

One forward of the prompt into a fresh cache (what ``generate`` does first), timed end to end (best of
``--reps``): the unpatched model (HF's DynamicCache), minikv with ``preset="snapkv"`` (SnapKV scores from
the prefill kernel: no pass), minikv with ``scorer="kvzip"`` (the defaults: the prompt, then the pass, the
prompt re-read in chunks of ``reconstruct_chunk`` through the whole decoder) and with ``scorer="expected"``
(Expected Attention: query statistics per layer, no pass). The pass's own seconds are the kvzip row
less the snapkv row; Expected Attention's, its row less the snapkv row. FLOPs are counted, not measured: per token, 2 x the decoder's matmul parameters,
plus attention (4 x head_dim x keys attended, per query head and layer: causal T/2 on average for the
prompt, T + chunk/2 for a re-read token over the prompt and its chunk; a sliding layer at most its
window), for T prompt tokens and T re-read ones plus the chunks' overlaps.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import print_table, stamp, write_csv  # noqa: E402


def flops(model, T: int, chunk: int | None) -> float:
    """Counted forward FLOPs of ``T`` prompt tokens (``chunk=None``) or of their reconstruction pass."""
    from minikv.reconstruct import OVERLAP

    cfg = model.config.get_text_config(decoder=True)
    embed = model.get_input_embeddings().weight.numel()
    params = sum(p.numel() for p in model.get_decoder().parameters()) - embed  # the matmuls of the layers
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    kinds = getattr(cfg, "layer_types", None) or ["full_attention"] * cfg.num_hidden_layers
    window = getattr(cfg, "sliding_window", None) or T
    per_query = 0.0
    n = T if chunk is None else T + (T // chunk + 1) * OVERLAP
    for kind in kinds:
        keys = T / 2 if chunk is None else T + min(chunk, T) / 2  # causal prompt; or the prompt + half a chunk
        if kind != "full_attention":
            keys = min(keys, window)  # a sliding layer reads at most its window
        per_query += 4 * head_dim * keys * cfg.num_attention_heads
    return n * (2 * params + per_query)


def _row(model: str, tokens: int, run: str, seconds: float, info: dict, **extra) -> dict:
    per_s = round(tokens / seconds, 1) if seconds > 0 else float("nan")
    return dict(model=model, tokens=tokens, run=run, seconds=round(seconds, 2), tokens_per_s=per_s, **info, **extra)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2")
    p.add_argument("--tokens", default="2000,4000")
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import minikv
    from minikv.cache import MiniKVCache
    from minikv.compat import cache_key
    from minikv.models import load_model
    from minikv.prompts import passkey_prompt

    model, tok = load_model(args.model)
    info, rows = stamp(torch.device("cpu")), []
    for n in (int(t) for t in args.tokens.split(",")):
        text, _ = passkey_prompt(tok, n, seed=0)
        ids = tok(text, return_tensors="pt").input_ids
        T = ids.shape[1]
        seconds = {}
        runs = (
            ("unpatched", None),
            ("minikv snapkv (no pass)", dict(preset="snapkv")),
            ("minikv kvzip", dict(scorer="kvzip")),
            ("minikv expected", dict(scorer="expected")),
        )
        for label, knobs in runs:
            if knobs is not None:
                minikv.patch(model, **knobs)
            best = float("inf")
            for _ in range(args.reps):
                cache = (
                    None if knobs is None else MiniKVCache(model._minikv_patch.config, model.config, max_new_tokens=8)
                )
                kw = {} if cache is None else {cache_key(): cache}
                t = time.perf_counter()
                with torch.inference_mode():
                    model(ids, use_cache=True, logits_to_keep=1, **kw)
                best = min(best, time.perf_counter() - t)
            if knobs is not None:
                chunk = model._minikv_patch.config.reconstruct_chunk
                minikv.unpatch(model)
            seconds[label] = best
            rows.append(_row(args.model, T, label, best, info))
            print(rows[-1], flush=True)
        base = seconds["minikv snapkv (no pass)"]
        for run, label in (
            ("minikv kvzip", "the pass alone (kvzip - snapkv)"),
            ("minikv expected", "Expected Attention's scoring (expected - snapkv)"),
        ):
            extra = seconds[run] - base
            rows.append(_row(args.model, T, label, extra, info, s_per_1k_tokens=round(1000 * extra / T, 2)))
            if run == "minikv kvzip":  # FLOPs counted for the pass only
                rows[-1]["flops_vs_prefill"] = round(flops(model, T, chunk) / flops(model, T, None), 2)
            print(rows[-1], flush=True)
    for r in rows:
        r.setdefault("s_per_1k_tokens", "")
        r.setdefault("flops_vs_prefill", "")
    print_table(rows, ["model", "tokens", "run", "seconds", "tokens_per_s", "s_per_1k_tokens", "flops_vs_prefill"])
    write_csv(args.out or f"benchmarks/results/reconstruct_{args.model}.csv", rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())

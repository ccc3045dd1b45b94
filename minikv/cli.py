"""minikv generate / python -m minikv: long-context generation with a compressed KV cache.

With no prompt, a pass key is hidden in ~4k tokens of filler and the model (by default the embedded
SmolLM2-135M-Instruct; --model gemma3-270m for the embedded Gemma 3 270M base) is asked for it.
Prints the answer, prompt tokens, KV bytes (fp16 vs minikv), compression and speed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time

from .compat import cache_key
from .config import (
    BACKENDS,
    CRUSH_ANCHORS,
    HEAD_BUDGETS,
    POOLS,
    PRESETS,
    RESIDUAL_DTYPES,
    ROTATIONS,
    SCHEDULES,
    SCORERS,
    SUPPORTED_BITS,
    MiniKVConfig,
    build_config,
)
from .models import DEFAULT_MODEL, EMBEDDED_MODELS, MissingModelPackage

BUDGET_WORDS = {"none": None, "auto": "auto"}  # --budget values that are not numbers


def parse_budget(text: str):
    try:
        if text.lower() in BUDGET_WORDS:
            return BUDGET_WORDS[text.lower()]
        return float(text) if any(c in text for c in ".eE") else int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"budget must be an int >= 1 (tokens), a float in (0, 1] (fraction of the prompt), 'none' or 'auto', got {text!r}"
        ) from None


def parse_recent(text: str):
    try:
        return float(text) if any(c in text for c in ".eE") else int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"recent must be an int >= 0 (tokens) or a float in [0, 1] (fraction of the budget), got {text!r}"
        ) from None


def _token_ids(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"reconstruct_prefix must be comma-separated token ids, got {text!r}"
        ) from None


def _tier_share(text: str):
    """``0.6`` (every layer), ``1,0,0.5`` (one per compressed layer) or ``auto`` (the model's calibration)."""
    try:
        if text.lower() in ("auto", "none"):
            return None
        shares = tuple(float(t) for t in text.split(",") if t.strip())
        return shares[0] if len(shares) == 1 and "," not in text else shares
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"tier_share must be a share in [0, 1], comma-separated shares (one per compressed layer) or 'auto', got {text!r}"
        ) from None


def _tier_bits(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(t) for t in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"tier_bits must be 'key bits,value bits' (each 2 or 4), got {text!r}"
        ) from None


def _optional_bits(text: str):
    return None if text.lower() == "none" else int(text)


# every MiniKVConfig field but max_new_tokens (the CLI's own flag): (type or action, choices, help)
KNOB_FLAGS = {
    "bits": (int, SUPPORTED_BITS, "bit width of keys and values: 2, 4, or 16 (no quantization)"),
    "k_bits": (_optional_bits, None, "bit width of the keys when it differs (2 or 4)"),
    "v_bits": (_optional_bits, None, "bit width of the values when it differs (2 or 4)"),
    "sink_tokens": (int, None, "first tokens of the prompt kept, in full precision"),
    "clip": (argparse.BooleanOptionalAction, None, "MSE-optimal clipped quantization scales"),
    "rotate": (str, ROTATIONS, "Hadamard rotation of values (v), keys (k) or both before quantization"),
    "budget": (parse_budget, None, "tokens per KV head per layer (int), fraction of the prompt (float), none or auto"),
    "recent": (parse_recent, None, "recent window: tokens (int) or fraction of the budget (float)"),
    "scorer": (str, SCORERS, "token importance scorer"),
    "snap_window": (int, None, "SnapKV observation window (queries)"),
    "reconstruct_chunk": (int, None, "kvzip: prompt tokens re-read per chunk of the reconstruction pass"),
    "reconstruct_prefix": (_token_ids, None, "kvzip: token ids (comma-separated) read before each re-read chunk"),
    "pool_kernel": (int, None, "SnapKV 1-D pooling kernel (odd)"),
    "pool": (str, POOLS, "SnapKV pooling"),
    "schedule": (str, SCHEDULES, "budget over layers"),
    "head_budgets": (str, HEAD_BUDGETS, "uniform (every KV head the same count) or adaptive (heads ranked together)"),
    "head_floor": (float, None, "head_budgets=adaptive: a head's least share of the uniform count"),
    "pyramid_delta": (float, None, "MiniKV pyramid: last layer keeps h/delta"),
    "pyramid_beta": (float, None, "PyramidKV: smallest layer budget h/beta"),
    "a2sf_decay": (float, None, "A2SF forgetting factor per query of age"),
    "sinks": (int, None, "StreamingLLM's sink tokens (scorer=streaming)"),
    "crush": (float, None, "KVCrush share of the scored budget (0 = off)"),
    "crush_anchor": (str, CRUSH_ANCHORS, "KVCrush Hamming anchor"),
    "crush_seed": (int, None, "KVCrush seed (crush_anchor=random)"),
    "q_group_size": (int, None, "quantization group G"),
    "residual_length": (int, None, "full-precision decode tokens before a flush (R)"),
    "residual_dtype": (str, RESIDUAL_DTYPES, "the full-precision residual's dtype"),
    "tier_share": (_tier_share, None, "precision tier: share of the kept tokens (or one per layer, comma-separated)"),
    "tier_bits": (_tier_bits, None, "precision tier's key,value bits"),
    "backend": (str, BACKENDS, "kernels: auto (Triton on CUDA), reference or triton"),
}


# knobs whose default (None) is resolved per model: what the help shows for it
AUTO_DEFAULTS = {
    "tier_share": "auto: the model's calibration, else 0",
    "residual_dtype": "auto: float16 for a float32 model, else the model's",
}


def _knob_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per knob; a flag not given takes the preset's or MiniKVConfig's default (shown)."""
    d = MiniKVConfig()
    g = parser.add_argument_group("minikv knobs (MiniKVConfig; defaults in brackets)")
    g.add_argument(
        "--preset",
        choices=list(PRESETS),
        default=argparse.SUPPRESS,
        help="a named recipe (paper: MiniKV as published); the flags given override it",
    )
    for name, (kind, choices, text) in KNOB_FLAGS.items():
        flag = "--" + name.replace("_", "-")
        shown = AUTO_DEFAULTS.get(name, getattr(d, name))
        help_text = f"{text} [{shown}]"
        if kind is argparse.BooleanOptionalAction:
            g.add_argument(flag, action=kind, default=argparse.SUPPRESS, help=help_text)
        else:
            g.add_argument(
                flag, type=kind, choices=choices and list(choices), default=argparse.SUPPRESS, help=help_text
            )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="minikv",
        description=__doc__.splitlines()[0],
        epilog="every flag: minikv generate --help (or python -m minikv --help)",
    )
    sub = parser.add_subparsers(dest="command")
    gen = sub.add_parser(
        "generate",
        help="generate with a MiniKV cache (the default command)",
        description=__doc__.split("\n\n")[1].replace("\n", " "),
    )
    gen.add_argument(
        "--model",
        default=None,
        help=f"short name of an embedded model ({', '.join(EMBEDDED_MODELS)}; default "
        f"{DEFAULT_MODEL}), a .gguf file, a local directory or a hub id (owner/name)",
    )
    src = gen.add_mutually_exclusive_group()
    src.add_argument("--prompt", default=None, help="prompt text (default: a generated pass-key prompt)")
    src.add_argument("--prompt-file", default=None, help="read the prompt from this file")
    gen.add_argument("--prompt-tokens", type=int, default=4000, help="length of the generated pass-key prompt")
    gen.add_argument("--seed", type=int, default=0, help="seed of the generated pass-key prompt")
    gen.add_argument("--max-new-tokens", type=int, default=12)
    gen.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    gen.add_argument("--device", default="cpu")
    gen.add_argument("--json", default=None, help="also write the results to this JSON file")
    gen.add_argument(
        "--baseline",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also time the same generation with the model's own uncompressed cache, for comparison",
    )
    _knob_flags(gen)
    return parser


def config_from_args(args) -> MiniKVConfig:
    """The configuration the flags give (``--preset`` first, then every knob flag given)."""
    knobs = {k: v for k, v in vars(args).items() if k in KNOB_FLAGS}
    return build_config(preset=getattr(args, "preset", None), **knobs)


def encode(tokenizer, text: str):
    """Tokenize ``text`` with the tokenizer's own special tokens (Gemma's ``<bos>``; nothing for
    SmolLM2), unless the text already starts with the BOS token (a rendered chat template)."""
    bos = getattr(tokenizer, "bos_token", None)
    add = not (bos and text.startswith(bos))
    return tokenizer(text, return_tensors="pt", add_special_tokens=add)


class _Clock:
    """A generate streamer that timestamps the prompt and every new token."""

    def __init__(self):
        self.times: list[float] = []

    def put(self, value) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def run_generate(args) -> dict:
    import torch

    import minikv

    from .models import load_model, quiet_hub
    from .prompts import passkey_prompt

    cfg = config_from_args(args)  # validate the knobs before loading anything
    quiet_hub()
    model, tokenizer = load_model(args.model, args.dtype, args.device)
    key = None
    if args.prompt_file:
        with open(args.prompt_file) as f:
            text = f.read()
    elif args.prompt is not None:
        text = args.prompt
    else:
        text, key = passkey_prompt(tokenizer, args.prompt_tokens, seed=args.seed)
    inputs = encode(tokenizer, text).to(args.device)
    T = inputs.input_ids.shape[1]
    minikv.patch(model, config=cfg)
    cache = minikv.MiniKVCache(cfg, model.config, max_new_tokens=args.max_new_tokens)
    clock = _Clock()
    with torch.inference_mode():
        out = model.generate(
            **inputs,
            **{cache_key(): cache},
            max_new_tokens=args.max_new_tokens,
            do_sample=False,
            streamer=clock,
            pad_token_id=tokenizer.pad_token_id,
        )
    answer = tokenizer.decode(out[0, T:], skip_special_tokens=True)
    mem, every = cache.memory(), cache.memory("all")  # compressed layers; every layer
    new = out.shape[1] - T
    t = clock.times
    minikv.unpatch(model)
    base = _timed(model, inputs, args.max_new_tokens, tokenizer) if args.baseline else []
    result = {
        "model": args.model or DEFAULT_MODEL,
        "config": dataclasses.asdict(cfg),
        "prompt_tokens": T,
        "new_tokens": new,
        "answer": answer,
        "pass_key": key,
        "pass_key_found": None if key is None else key in answer,
        "kv_bytes_fp16": mem.fp16_bytes,
        "kv_bytes_minikv": mem.used_bytes,
        "kv_bytes_allocated": mem.allocated_bytes,
        "kv_ratio": mem.ratio,
        "compression": mem.compression,
        "kv_ratio_all_layers": every.ratio,
        "prefill_s": t[1] - t[0] if len(t) > 1 else None,
        "decode_tokens_per_s": _rate(t),
        "uncompressed_prefill_s": base[1] - base[0] if len(base) > 1 else None,
        "uncompressed_decode_tokens_per_s": _rate(base),
        "device": args.device,
        "torch": torch.__version__,
    }
    return result


def _rate(times: list[float]) -> float | None:
    """Decode tokens per second from a clock's timestamps (prompt, first token, then one per token)."""
    return (len(times) - 2) / (times[-1] - times[1]) if len(times) > 2 else None


def _timed(model, inputs, max_new_tokens: int, tokenizer) -> list[float]:
    """The clock's timestamps of the same greedy generation with the model's own (uncompressed) cache."""
    import torch

    clock = _Clock()
    with torch.inference_mode():
        model.generate(
            **inputs,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            streamer=clock,
            pad_token_id=tokenizer.pad_token_id,
        )
    return clock.times


def print_result(r: dict) -> None:
    mib = 2**20
    print(f"answer            : {r['answer']!r}")
    if r["pass_key"] is not None:
        print(f"pass key          : {r['pass_key']} ({'found' if r['pass_key_found'] else 'NOT found'})")
    print(f"prompt tokens     : {r['prompt_tokens']}  (+{r['new_tokens']} generated)")
    print(f"KV bytes fp16     : {r['kv_bytes_fp16']:>12,d}  ({r['kv_bytes_fp16'] / mib:.2f} MiB)")
    print(
        f"KV bytes minikv   : {r['kv_bytes_minikv']:>12,d}  ({r['kv_bytes_minikv'] / mib:.2f} MiB, "
        f"{100 * r['kv_ratio']:.1f}% of fp16)"
    )
    print(f"compression       : {100 * r['compression']:.1f}% saved")
    if abs(r["kv_ratio_all_layers"] - r["kv_ratio"]) > 1e-9:  # layers left to transformers (sliding windows)
        print(
            f"all layers        : {100 * r['kv_ratio_all_layers']:.1f}% of fp16 (uncompressed sliding-window "
            f"layers included)"
        )
    if r["prefill_s"] is not None:
        print(f"prefill           : {r['prefill_s']:.2f} s ({r['prompt_tokens'] / r['prefill_s']:.0f} tokens/s)")
    if r["decode_tokens_per_s"] is not None:
        print(f"decode            : {r['decode_tokens_per_s']:.1f} tokens/s on {r['device']}")
    if r.get("uncompressed_decode_tokens_per_s") is not None:
        print(
            f"uncompressed cache: prefill {r['uncompressed_prefill_s']:.2f} s, decode "
            f"{r['uncompressed_decode_tokens_per_s']:.1f} tokens/s (the model's own cache, same prompt, for comparison)"
        )


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0].startswith("-"):  # generate is the default command, --help included
        argv = ["generate", *argv]
    args = build_parser().parse_args(argv)
    if args.command != "generate":
        build_parser().print_help()
        return 2
    try:
        result = run_generate(args)
    except (ValueError, MissingModelPackage) as e:
        print(f"minikv: error: {e}", file=sys.stderr)
        return 2
    print_result(result)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0

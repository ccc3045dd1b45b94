"""``minikv generate`` / ``python -m minikv``: long-context generation with a compressed KV cache.

With no prompt, a pass key is hidden in ~4k tokens of filler and the embedded SmolLM2-135M-Instruct
is asked for it. Prints the answer, prompt tokens, KV bytes (fp16 vs minikv), compression and speed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time

from .compat import cache_key
from .config import MiniKVConfig


def parse_budget(text: str):
    if text.lower() == "none":
        return None
    return float(text) if any(c in text for c in ".eE") else int(text)


def parse_recent(text: str):
    return float(text) if any(c in text for c in ".eE") else int(text)


def _knob_flags(parser: argparse.ArgumentParser) -> None:
    d = MiniKVConfig()
    g = parser.add_argument_group("minikv knobs (see MiniKVConfig)")
    g.add_argument("--bits", type=int, default=d.bits, help="2, 4, or 16 (no quantization)")
    g.add_argument("--budget", type=parse_budget, default=d.budget,
                   help="tokens kept per KV head per layer (int), fraction of the prompt (float), or none")
    g.add_argument("--recent", type=parse_recent, default=d.recent, help="recent window: tokens (int) or fraction of the budget")
    g.add_argument("--scorer", default=d.scorer, choices=["minikv", "snapkv"])
    g.add_argument("--snap-window", type=int, default=d.snap_window)
    g.add_argument("--pool-kernel", type=int, default=d.pool_kernel)
    g.add_argument("--pool", default=d.pool, choices=["max", "avg"])
    g.add_argument("--schedule", default=d.schedule, choices=["uniform", "pyramid"])
    g.add_argument("--pyramid-delta", type=float, default=d.pyramid_delta)
    g.add_argument("--q-group-size", type=int, default=d.q_group_size)
    g.add_argument("--residual-length", type=int, default=d.residual_length)
    g.add_argument("--backend", default=d.backend, choices=["auto", "reference", "triton"])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="minikv", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command")
    gen = sub.add_parser("generate", help="generate with a MiniKV cache (the default command)")
    gen.add_argument("--model", default=None, help="hub id, local directory or .gguf file (default: embedded SmolLM2)")
    src = gen.add_mutually_exclusive_group()
    src.add_argument("--prompt", default=None, help="prompt text (default: a generated pass-key prompt)")
    src.add_argument("--prompt-file", default=None, help="read the prompt from this file")
    gen.add_argument("--prompt-tokens", type=int, default=4000, help="length of the generated pass-key prompt")
    gen.add_argument("--seed", type=int, default=0, help="seed of the generated pass-key prompt")
    gen.add_argument("--max-new-tokens", type=int, default=12)
    gen.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    gen.add_argument("--device", default="cpu")
    gen.add_argument("--json", default=None, help="also write the results to this JSON file")
    _knob_flags(gen)
    return parser


def config_from_args(args) -> MiniKVConfig:
    names = {f.name for f in dataclasses.fields(MiniKVConfig)}
    return MiniKVConfig(**{k: v for k, v in vars(args).items() if k in names})


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
    inputs = tokenizer(text, return_tensors="pt", add_special_tokens=False).to(args.device)
    T = inputs.input_ids.shape[1]
    minikv.patch(model, config=cfg)
    cache = minikv.MiniKVCache(cfg, model.config, max_new_tokens=args.max_new_tokens)
    clock = _Clock()
    with torch.inference_mode():
        out = model.generate(**inputs, **{cache_key(): cache}, max_new_tokens=args.max_new_tokens,
                             do_sample=False, streamer=clock, pad_token_id=tokenizer.pad_token_id)
    answer = tokenizer.decode(out[0, T:], skip_special_tokens=True)
    mem = cache.memory()
    new = out.shape[1] - T
    t = clock.times
    result = {
        "model": args.model or "SmolLM2-135M-Instruct (embedded GGUF)",
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
        "prefill_s": t[1] - t[0] if len(t) > 1 else None,
        "decode_tokens_per_s": (len(t) - 2) / (t[-1] - t[1]) if len(t) > 2 else None,
        "device": args.device,
        "torch": torch.__version__,
    }
    return result


def print_result(r: dict) -> None:
    mib = 2**20
    print(f"answer            : {r['answer']!r}")
    if r["pass_key"] is not None:
        print(f"pass key          : {r['pass_key']} ({'found' if r['pass_key_found'] else 'NOT found'})")
    print(f"prompt tokens     : {r['prompt_tokens']}  (+{r['new_tokens']} generated)")
    print(f"KV bytes fp16     : {r['kv_bytes_fp16']:>12,d}  ({r['kv_bytes_fp16'] / mib:.2f} MiB)")
    print(f"KV bytes minikv   : {r['kv_bytes_minikv']:>12,d}  ({r['kv_bytes_minikv'] / mib:.2f} MiB, "
          f"{100 * r['kv_ratio']:.1f}% of fp16)")
    print(f"compression       : {100 * r['compression']:.1f}% saved")
    if r["prefill_s"] is not None:
        print(f"prefill           : {r['prefill_s']:.2f} s ({r['prompt_tokens'] / r['prefill_s']:.0f} tokens/s)")
    if r["decode_tokens_per_s"] is not None:
        print(f"decode            : {r['decode_tokens_per_s']:.1f} tokens/s on {r['device']}")


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0].startswith("-") and argv[0] not in ("-h", "--help"):
        argv = ["generate", *argv]
    args = build_parser().parse_args(argv)
    if args.command != "generate":
        build_parser().print_help()
        return 2
    try:
        result = run_generate(args)
    except ValueError as e:
        print(f"minikv: error: {e}", file=sys.stderr)
        return 2
    print_result(result)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0

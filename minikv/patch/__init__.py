"""Patching a transformers model through its own extension points (no model code copied).

The functions here load transformers on first call, so ``import minikv`` stays light.
"""

from __future__ import annotations

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3")


def patch(model, bits=None, budget=..., **knobs):
    """Make ``model.generate`` store its KV cache the MiniKV way and return ``model``.

    ``bits``: 2 or 4 (quantized) or 16 (not quantized); ``budget``: tokens kept per KV head per
    layer on average (int), a fraction of each prompt (float in (0, 1]), None (keep all) or "auto"
    (the default: half of each prompt; 66% in groups of 64 on a model with one KV head per layer);
    ``knobs``: any other field of :class:`minikv.MiniKVConfig`, ``preset="paper"`` (a named recipe,
    :data:`minikv.config.PRESETS`, the knobs given override it), or ``config=MiniKVConfig(...)``.
    Knobs not given take the preset's or :class:`MiniKVConfig`'s defaults. Everything is validated
    before the model is touched.

    >>> model = minikv.patch(model, bits=2, budget=0.5)          # doctest: +SKIP
    >>> out = model.generate(input_ids, max_new_tokens=32)       # doctest: +SKIP
    >>> minikv.unpatch(model)                                    # doctest: +SKIP
    """
    from ..config import UNSET
    from .patcher import patch as _patch

    return _patch(model, bits=bits, budget=UNSET if budget is ... else budget, **knobs)


def unpatch(model):
    """Undo :func:`patch`: the original attention implementation and ``generate`` come back."""
    from .patcher import unpatch as _unpatch

    return _unpatch(model)


def is_patched(model) -> bool:
    return getattr(model, "_minikv_patch", None) is not None


__all__ = ["SUPPORTED_MODEL_TYPES", "is_patched", "patch", "unpatch"]

"""The ``minikv`` attention and mask functions registered with transformers' interfaces.

Two names are registered, differing only in how uncompressed layers are computed (the model's
original implementation): ``"minikv"`` falls back to SDPA, ``"minikv_eager"`` to the model's
own eager function (needed for logit soft-capping, which SDPA does not support).
"""

from __future__ import annotations

import functools

from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, eager_mask, sdpa_mask

from ..dense import dense_attention
from ..view import MiniKVView

IMPLEMENTATIONS = {"sdpa": "minikv", "eager": "minikv_eager"}


def minikv_attention(
    module, query, key, value, attention_mask, scaling=None, dropout=0.0, softcap=None, *, fallback: str, **kwargs
):
    """``fn(module, q [B, Hq, Lq, D], k, v, mask, ...) -> (out [B, Lq, Hq, D], weights)``.

    ``key`` is a :class:`MiniKVView` for layers stored by a MiniKV cache, a dense tensor otherwise.
    """
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    if isinstance(key, MiniKVView):
        return key.layer.attend(module, query, key, attention_mask, scaling, softcap, fallback, **kwargs)
    return dense_attention(module, query, key, value, attention_mask, scaling, softcap, fallback, **kwargs)


def _mask_function(base):
    def mask(*args, **kwargs):
        # a compressed layer reports kv_length 0 after its prompt: its attention reads lengths itself
        if kwargs.get("kv_length") == 0:
            return None
        return base(*args, **kwargs)

    return mask


_MASKS = {"sdpa": sdpa_mask, "eager": eager_mask}


@functools.cache
def register() -> None:
    """Register the attention and mask functions (idempotent; called by ``patch``, not on import)."""
    for fallback, name in IMPLEMENTATIONS.items():
        AttentionInterface.register(name, functools.partial(minikv_attention, fallback=fallback))
        AttentionMaskInterface.register(name, _mask_function(_MASKS[fallback]))

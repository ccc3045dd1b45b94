"""Uncompressed attention the way the unpatched model computes it (HF's own functions).

Used for layers minikv leaves to HF (sliding-window layers), for calls without a cache, for the
prompt when nothing is evicted, and by the ``bits=16`` store. ``fallback`` is the attention
implementation the model had before ``patch``: ``"sdpa"`` or ``"eager"`` (softcapped models).
"""

from __future__ import annotations

import sys

import torch


def attention_function(module: torch.nn.Module, fallback: str):
    if fallback == "eager":
        return sys.modules[type(module).__module__].eager_attention_forward
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward


def dense_attention(module, query, key, value, mask, scaling, softcap, fallback: str, **kwargs):
    """HF's attention call; returns ``(out [B, Lq, Hq, D], weights or None)``."""
    if softcap is not None:
        kwargs["softcap"] = softcap
    fn = attention_function(module, fallback)
    return fn(module, query, key, value, mask, dropout=0.0, scaling=scaling, **kwargs)


def mask_for(allowed: torch.Tensor, fallback: str, dtype: torch.dtype) -> torch.Tensor:
    """A boolean "may attend" mask in the format the fallback expects (eager: additive floats)."""
    if fallback == "eager":
        zero = torch.zeros((), dtype=dtype, device=allowed.device)
        return torch.where(allowed, zero, torch.finfo(dtype).min)
    return allowed


def valid_tokens(mask, batch: int, length: int, device) -> torch.Tensor:
    """``[B, T]`` bool, False for padding, read from the prompt's 4-D mask (its last query row)."""
    if mask is None:
        return torch.ones(batch, length, dtype=torch.bool, device=device)
    row = mask[:, 0, -1, -length:]
    if row.dtype != torch.bool:
        row = row == 0
    return row.expand(batch, length)

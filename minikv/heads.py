"""Per-KV-head masks: attention over tokens held when each KV head of a sequence holds its own set.

With per-head budgets (``head_budgets="adaptive"``) a store's slots are valid per head
(``valid [B, Hkv, S]``). The attention ops take one mask per sequence (``[B, S]``), so a call over such
a context folds the KV heads into the batch: sequence ``b``, KV head ``h`` becomes row ``b * Hkv + h``
with one KV head and its query group (a view of the same memory for q, a reshape for the rest).
"""

from __future__ import annotations

import torch


def shared(valid: torch.Tensor) -> torch.Tensor | None:
    """``valid [B, Hkv, S]`` -> ``[B, S]`` when every head holds the same slots, else ``None``
    (reads the mask: prefill-time code)."""
    first = valid[:, :1]
    return valid[:, 0] if bool((valid == first).all()) else None


def fold_q(x: torch.Tensor, Hkv: int) -> torch.Tensor:
    """Queries ``[B, Hq, L, D]`` -> ``[B * Hkv, Hq / Hkv, L, D]`` (each KV head's query group)."""
    B, Hq = x.shape[:2]
    return x.reshape(B * Hkv, Hq // Hkv, *x.shape[2:])


def fold_kv(x: torch.Tensor) -> torch.Tensor:
    """Keys or values ``[B, Hkv, S, D]`` (or scores ``[B, Hkv, S]``) -> ``[B * Hkv, 1, ...]``."""
    B, Hkv = x.shape[:2]
    return x.reshape(B * Hkv, 1, *x.shape[2:])


def fold_rows(x: torch.Tensor, Hkv: int) -> torch.Tensor:
    """A per-sequence tensor ``[B, ...]`` (a query mask or weight) repeated for each KV head: ``[B * Hkv, ...]``."""
    return x.repeat_interleave(Hkv, 0)


def unfold(x: torch.Tensor, B: int) -> torch.Tensor:
    """``[B * Hkv, heads, ...]`` -> ``[B, Hkv * heads, ...]``."""
    return x.reshape(B, -1, *x.shape[2:])

"""A compressed layer's rotary position tables, from its attention module alone.

transformers applies RoPE before the attention function is called, so the queries and keys minikv
sees are already rotated, and the tables (``cos``, ``sin``) live in a model-level module minikv is not
handed. A scorer that must move a query to another position (:mod:`minikv.selection.expected`) builds
the model's own rotary module from the attention module's config, so every rope type and partial
rotary factor is the model's, and asks it for the positions it needs.

Every supported family rotates with ``x * cos + rotate_half(x) * sin`` over the first ``rot`` channels
of a head (``rot = head_dim`` unless the model rotates part of it); the tables returned here are
divided by their norm (some rope types scale both ``cos`` and ``sin`` by an attention factor, which
is already in the queries), so they are exact rotations.
"""

from __future__ import annotations

import inspect
import sys

import torch


def rotary_module(attention: torch.nn.Module) -> torch.nn.Module:
    """The rotary embedding of ``attention``'s model family (``LlamaAttention`` -> ``LlamaRotaryEmbedding``),
    built from the attention module's config."""
    family = type(attention).__name__.removesuffix("Attention")
    namespace = sys.modules[type(attention).__module__]
    cls = getattr(namespace, f"{family}RotaryEmbedding", None)
    if cls is None:
        raise ValueError(
            f"no rotary embedding found next to {type(attention).__name__} (looked for {family}RotaryEmbedding)"
        )
    return cls(config=attention.config)


def layer_type(attention: torch.nn.Module) -> str:
    kind = getattr(attention, "layer_type", None)
    types = getattr(attention.config, "layer_types", None)
    if kind is None and types is not None:
        kind = types[attention.layer_idx]
    return kind or "full_attention"


def tables(attention: torch.nn.Module, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Unit ``(cos, sin)`` ``[B, N, rot]`` float64 at integer ``positions [B, N]`` for ``attention``'s layer."""
    rotary = rotary_module(attention).to(positions.device)
    probe = torch.zeros((), dtype=torch.float32, device=positions.device)
    kwargs = (
        {"layer_type": layer_type(attention)} if "layer_type" in inspect.signature(rotary.forward).parameters else {}
    )
    with torch.no_grad():
        cos, sin = rotary(probe, positions.to(torch.int64), **kwargs)
    cos, sin = cos.double(), sin.double()
    norm = torch.sqrt(cos * cos + sin * sin)
    return cos / norm, sin / norm


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], -1)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x [..., D]`` rotated by ``cos/sin [..., rot]`` (broadcast) on its first ``rot`` channels."""
    rot = cos.shape[-1]
    head, tail = x[..., :rot], x[..., rot:]
    return torch.cat([head * cos + rotate_half(head) * sin, tail], -1)


def unrotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`rotate` (a rotation by the opposite angles)."""
    return rotate(x, cos, -sin)


def positions(position_ids: torch.Tensor | None, valid: torch.Tensor, start: int) -> torch.Tensor:
    """``[B, N]`` positions of a forward's ``N`` tokens: its ``position_ids`` where the attention function
    was handed them, else each real token's rank (``valid [B, N]``) after ``start`` tokens, as ``generate``
    numbers a left-padded batch."""
    B, N = valid.shape
    if position_ids is not None and position_ids.shape[-1] == N:
        return position_ids.reshape(-1, N)[:B].expand(B, N)
    return start + (valid.long().cumsum(-1) - 1).clamp_min(0)

"""How many tokens each layer keeps per KV head: the budget, the recent window, the schedule.

All counts are computed per sequence from its real (unpadded) prompt length, on tensors, so a
batch of prompts of different lengths needs no host synchronisation. The capacity of a layer's
static buffers is the same formula evaluated at the padded prompt length (a Python int).
"""

from __future__ import annotations

import torch

from .config import MiniKVConfig


def keep_counts(cfg: MiniKVConfig, rank: int, num_layers: int, lengths: torch.Tensor):
    """Tokens kept and recent-window tokens for the compressed layer ``rank`` of ``num_layers``.

    lengths ``[B]`` int64 real prompt lengths. Returns ``(n_keep, n_recent)``, both ``[B]`` int64,
    with ``n_recent <= n_keep <= lengths``. With ``budget=None`` every token is kept.
    """
    L = lengths.to(torch.float64)
    if cfg.budget is None:
        return lengths.clone(), lengths.clone()
    if isinstance(cfg.budget, int):
        n = torch.clamp(L, max=float(cfg.budget))
    else:
        n = torch.floor(cfg.budget * L).clamp_min(1.0)
    if cfg.scorer == "streaming":  # StreamingLLM: the sinks, the rest of the budget is the window
        r = (n - cfg.sinks).clamp_min(0.0)
    elif isinstance(cfg.recent, int):
        r = torch.clamp(n, max=float(cfg.recent))
    else:
        r = torch.floor(cfg.recent * n)
    if cfg.scorer == "snapkv":  # SnapKV always keeps its observation window (short prompts: the question)
        r = torch.maximum(r, torch.clamp(n, max=float(cfg.snap_window)))
    heavy = schedule(cfg, rank, num_layers, n - r, L - r)
    if cfg.sink_tokens:  # the sinks are never evicted: the scored part holds at least them
        heavy = torch.maximum(heavy, torch.clamp(L - r, max=float(cfg.sink_tokens)))
    keep = torch.minimum(heavy + r, L)
    if cfg.scorer == "snapkv":  # a prompt no longer than the observation window is kept whole
        keep = torch.where(L <= cfg.snap_window, L, keep)
    keep = keep.to(torch.int64)
    return keep, torch.minimum(r.to(torch.int64), keep)


def schedule(cfg: MiniKVConfig, rank: int, num_layers: int, heavy: torch.Tensor, room: torch.Tensor):
    """Scored tokens at layer ``rank`` for an average of ``heavy`` per layer (``room`` = tokens available).

    - ``uniform``: ``heavy`` everywhere;
    - ``pyramid`` (MiniKV): linear from ``2h - h/delta`` (first layer) to ``h/delta`` (last), rounded;
    - ``pyramidkv`` (PyramidKV): ``min = h // beta``, ``max = 2h - min`` (clipped to ``room``, and then
      ``min = 2h - max``), layer ``l`` gets ``max - l * (max - min) / (L - 1)``, rounded. PyramidKV's code
      floors the step to an integer, which overshoots the average budget by up to ``(L - 1) / 2`` tokens
      per layer; the real-valued step keeps the average, so policies compare at equal memory.
    """
    if num_layers <= 1 or cfg.schedule == "uniform" or cfg.scorer == "streaming":
        return heavy
    if cfg.schedule == "pyramid":
        last = heavy / cfg.pyramid_delta
        first = 2 * heavy - last
        return torch.floor(first + (last - first) * (rank / (num_layers - 1)) + 0.5)
    low = torch.floor(heavy / cfg.pyramid_beta)
    high = torch.minimum(2 * heavy - low, room)
    low = 2 * heavy - high
    return torch.floor(high - rank * (high - low) / (num_layers - 1) + 0.5)


def capacity(cfg: MiniKVConfig, rank: int, num_layers: int, prompt_len: int) -> int:
    """Most tokens any sequence of a batch padded to ``prompt_len`` keeps at this layer."""
    keep, _ = keep_counts(cfg, rank, num_layers, torch.tensor([prompt_len]))
    return int(keep[0])


def check_prompt(cfg: MiniKVConfig, prompt_len: int) -> None:
    """Raise if an int budget cannot be met by a prompt of ``prompt_len`` tokens."""
    if isinstance(cfg.budget, int) and cfg.budget > prompt_len:
        raise ValueError(
            f"budget={cfg.budget} tokens is larger than the prompt ({prompt_len} tokens): "
            f"use an int budget in [1, {prompt_len}], a float in (0, 1], or budget=None"
        )

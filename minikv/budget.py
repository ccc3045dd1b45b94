"""How many tokens each layer keeps per KV head: the budget, the recent window, the schedule.

All counts are computed per sequence from its real (unpadded) prompt length, on tensors, so a
batch of prompts of different lengths needs no host synchronisation. The capacity of a layer's
static buffers is the same formula evaluated at the padded prompt length (a Python int).
"""

from __future__ import annotations

import torch

from .config import MiniKVConfig

# scorers that always keep the last ``snap_window`` tokens and keep a prompt no longer than it whole:
# SnapKV's observation window, and the reconstruction scorers (without it a short chat prompt loses its
# question: the README's usage snippet answered "Theassistant" at the kvzip defaults)
WINDOWED = ("snapkv", "kvzip", "kvzip_window")


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
    if cfg.scorer in WINDOWED:  # the last snap_window tokens always stay (a short prompt: the question itself)
        r = torch.maximum(r, torch.clamp(n, max=float(cfg.snap_window)))
    heavy = schedule(cfg, rank, num_layers, n - r, L - r)
    if cfg.sink_tokens:  # the sinks are never evicted: the scored part holds at least them
        heavy = torch.maximum(heavy, torch.clamp(L - r, max=float(cfg.sink_tokens)))
    keep = torch.minimum(heavy + r, L)
    if cfg.scorer in WINDOWED:  # a prompt no longer than the observation window is kept whole
        keep = torch.where(L <= cfg.snap_window, L, keep)
    keep = keep.to(torch.int64)
    return keep, torch.minimum(r.to(torch.int64), keep)


GLOBAL_SPAN = (0.25, 2.0)  # schedule="global": a layer's scored tokens stay in this range of the uniform count


def across_layers(cfg: MiniKVConfig, scores: list[torch.Tensor], valid: torch.Tensor, group: int | None = None):
    """One ranking of the scored tokens of several layers (KVzip's ``layerwise=False``), or of one
    layer's heads (AdaKV).

    scores ``[B, H, T]`` per layer (comparable across layers and heads: the reconstruction pass's
    attention maxima), valid ``[B, T]``. Each sequence keeps, over all layers, as many scored tokens as
    the uniform schedule does (equal bytes), given to the units whose tokens rank highest: the largest
    prefix of the joint ranking (every head of every layer) whose per-unit counts, clamped to a range of
    the uniform count, fit the total. A unit is a layer (its count averaged over its heads, clamped to
    ``GLOBAL_SPAN``) or, with ``head_budgets="adaptive"``, a (layer, KV head) pair (clamped to
    ``[head_floor, GLOBAL_SPAN[1]]``). The recent window and the sinks are every unit's, as in the uniform
    schedule. With ``group`` (a quantized store's G), each unit's tokens after the sinks are a whole
    number of groups: none waits in the full-precision residual, whose bytes go to more packed tokens
    elsewhere (at most the total). Returns ``(n_keep, n_recent)`` per layer: ``n_keep [B]`` per layer, or
    ``[B, H]`` per head; ``n_recent [B]``. Prefill-time code (a host loop over the batch).
    """
    from .selection import protect_sinks
    from .selection.positions import rank_from_end

    L, (B, H, _) = len(scores), scores[0].shape
    per_head = cfg.head_budgets == "adaptive"
    U = L * H if per_head else L  # ranked units
    lengths = valid.sum(-1)
    keep, recent = keep_counts(cfg.replace(schedule="uniform"), 0, L, lengths)
    heavy = (keep - recent).tolist()
    candidate = valid & (rank_from_end(valid) > recent[:, None])  # [B, T]
    least = cfg.head_floor if per_head else GLOBAL_SPAN[0]
    per_unit = 1 if per_head else H  # tokens of a unit per counted token: a layer's heads share its count
    unit_of = torch.arange(L * H).repeat_interleave(valid.shape[1]) // per_unit  # of each flattened score
    out = torch.zeros(L, B, H if per_head else 1, dtype=torch.int64)
    for b in range(B):
        per_layer = []
        for s in scores:
            s = protect_sinks(s[b : b + 1], valid[b : b + 1], cfg.sink_tokens)[0] if cfg.sink_tokens else s[b]
            per_layer.append(s.float().masked_fill(~candidate[b], float("-inf")))  # [H, T]
        room = int(candidate[b].sum())
        low = min(room, max(int(least * heavy[b]), min(cfg.sink_tokens, heavy[b])))
        high = min(room, int(GLOBAL_SPAN[1] * heavy[b]))
        flat = torch.cat([s.reshape(-1) for s in per_layer])
        order = torch.sort(flat, descending=True, stable=True).indices
        order = order[torch.isfinite(flat[order]) | (flat[order] > 0)]  # candidates only (sinks are +inf)
        ranked = unit_of[order]

        def counts(k: int) -> torch.Tensor:
            return torch.bincount(ranked[:k], minlength=U).float().div(per_unit).clamp(low, high)

        lo, hi = 0, ranked.numel()
        while lo < hi:  # the longest prefix of the ranking whose clamped counts fit the total
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if counts(mid).floor().sum() <= U * heavy[b] else (lo, mid - 1)
        best = counts(lo)
        n = best.floor().long()
        step = group or 1
        if group:  # whole groups after the sinks: round each unit down, then hand out groups again
            sinks = min(cfg.sink_tokens, int(lengths[b]))
            rest = (n + int(recent[b]) - sinks) % group
            if bool((n >= rest).all()):  # nothing of the prompt waits in the residual but the sinks
                n = n - rest
            else:  # a short prompt: the sinks and whole groups of the rest, the same remainder in every unit
                held = min(sinks, heavy[b])  # every unit holds them (low >= them)
                n = held + (n - held) - (n - held) % group
        spare = U * heavy[b] - int(n.sum())
        for unit in torch.argsort(best - n, descending=True).tolist():  # rounding: largest remainders
            if spare < step:
                break
            if n[unit] + step <= high:
                n[unit] += step
                spare -= step
        out[:, b] = n.view(L, -1) + int(recent[b])
    device = lengths.device
    return [((k if per_head else k[:, 0]).to(device), recent.clone()) for k in out]


def shared_scores(cfg: MiniKVConfig, scores: list[torch.Tensor]) -> list[torch.Tensor]:
    """One set of tokens for every layer and KV head (``schedule="shared"``): each token's score is its
    best over the layers and heads (``scores [B, H, T]`` per layer, comparable: the reconstruction pass's
    attention maxima), pooled along the tokens as SnapKV's (``pool``, ``pool_kernel``), so the words
    around a token any layer needs are kept by all (a fact is read through every layer, and a question
    matches the words around it). Returns the shared scores, one ``[B, H, T]`` per layer."""
    from .selection import snapkv

    best = snapkv.finish(torch.stack([s.amax(1) for s in scores]).amax(0)[:, None], cfg)[:, 0]  # [B, T]
    return [best[:, None].expand_as(s).contiguous() for s in scores]


def shared_counts(cfg: MiniKVConfig, valid: torch.Tensor, num_layers: int, group: int | None = None):
    """``(n_keep [B], n_recent [B])`` for each of ``num_layers`` layers under ``schedule="shared"``: the
    uniform count with the tokens after the sinks rounded to the nearest whole number of quantization
    groups ``group`` (none of the prompt waits in the full-precision residual; at most half a group more
    or less than the uniform count)."""
    lengths = valid.sum(-1)
    keep, recent = keep_counts(cfg.replace(schedule="uniform"), 0, num_layers, lengths)
    if group:
        sinks = torch.clamp(lengths, max=cfg.sink_tokens)
        whole = sinks + torch.div(keep - sinks + group // 2, group, rounding_mode="floor") * group
        whole = torch.where(whole > lengths, whole - group, whole)  # never more than the prompt
        keep = torch.where(whole >= recent, whole, keep)  # a prompt too short for a group stays as counted
    return [(keep.clone(), recent.clone()) for _ in range(num_layers)]


def schedule(cfg: MiniKVConfig, rank: int, num_layers: int, heavy: torch.Tensor, room: torch.Tensor):
    """Scored tokens at layer ``rank`` for an average of ``heavy`` per layer (``room`` = tokens available).

    - ``uniform``: ``heavy`` everywhere;
    - ``pyramid`` (MiniKV): linear from ``2h - h/delta`` (first layer) to ``h/delta`` (last), rounded;
    - ``global``: ``heavy`` here; :func:`across_layers` moves tokens between layers once all are scored;
    - ``shared``: ``heavy`` here; :func:`shared_counts` rounds it to whole groups once all are scored;
    - ``pyramidkv`` (PyramidKV): ``min = h // beta``, ``max = 2h - min`` (clipped to ``room``, and then
      ``min = 2h - max``), layer ``l`` gets ``max - l * (max - min) / (L - 1)``, rounded. PyramidKV's code
      floors the step to an integer, which overshoots the average budget by up to ``(L - 1) / 2`` tokens
      per layer; the real-valued step keeps the average, so policies compare at equal memory.
    """
    if num_layers <= 1 or cfg.schedule in ("uniform", "global", "shared") or cfg.scorer == "streaming":
        return heavy  # "global" / "shared": decided once every layer is scored (across_layers, shared_counts)
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
    keep, recent = keep_counts(cfg, rank, num_layers, torch.tensor([prompt_len]))
    if cfg.schedule == "global" or cfg.head_budgets == "adaptive":  # up to GLOBAL_SPAN[1] x the uniform count
        keep = torch.clamp(recent + torch.ceil(GLOBAL_SPAN[1] * (keep - recent)), max=prompt_len)
    elif cfg.schedule == "shared":  # rounded to the nearest whole group (at most half a group more)
        keep = torch.clamp(keep + (cfg.q_group_size or 0), max=prompt_len)
    return int(keep[0])


def check_prompt(cfg: MiniKVConfig, prompt_len: int) -> None:
    """Raise if an int budget cannot be met by a prompt of ``prompt_len`` tokens."""
    if isinstance(cfg.budget, int) and cfg.budget > prompt_len:
        raise ValueError(
            f"budget={cfg.budget} tokens is larger than the prompt ({prompt_len} tokens): "
            f"use an int budget in [1, {prompt_len}], a float in (0, 1], or budget=None"
        )

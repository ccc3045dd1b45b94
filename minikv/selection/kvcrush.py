"""KVCrush (arXiv 2503.00022) around any scorer: importance tokens plus representatives of the rest.

Per sequence and layer, of the ``n_sel = n_keep - n_recent`` scored slots:

1. ``n_crush = floor(crush * n_sel)`` go to representatives, ``n_imp = n_sel - n_crush`` to the base
   scorer's best tokens (per KV head, as without the wrapper).
2. Head-behaviour bits: ``b[t, h] = 1`` iff KV head ``h`` would keep token ``t`` with the *whole*
   scored budget ``n_sel`` (the base method alone). Choice: the paper leaves the threshold open; the
   base budget is the natural "would the head keep it".
3. Hamming distance of ``b[t]`` to an anchor (``crush_anchor``): ``alternate`` 0101... (default, as in
   OpenVINO GenAI's KVCrush tests), ``zeros``, ``ones``, ``mean`` (per-head majority over the
   candidates) or ``random`` (``crush_seed``).
4. Per KV head, the tokens its importance part evicted (non-recent, not in its top ``n_imp``) are
   sorted by distance (ties: older first) and ``n_crush`` of them are kept, uniformly spaced along
   that order (``i * n_evicted // n_crush``), one per bucket of equal size.

Returned as scores for the base selection: 2 = importance, 1 = representative, 0 = evicted. Tensor
ops only (no host sync), so batches with different prompt lengths run in one call.
"""

from __future__ import annotations

import torch

from .positions import rank_from_end

ANCHORS = ("alternate", "zeros", "ones", "mean", "random")


def anchor(kind: str, bits: torch.Tensor, candidate: torch.Tensor, seed: int) -> torch.Tensor:
    """``[B, H]`` bool anchor for head-behaviour bits ``[B, H, T]`` over ``candidate [B, T]``."""
    B, H, _ = bits.shape
    dev = bits.device
    if kind == "alternate":
        a = torch.arange(H, device=dev) % 2 == 1
    elif kind == "zeros":
        a = torch.zeros(H, dtype=torch.bool, device=dev)
    elif kind == "ones":
        a = torch.ones(H, dtype=torch.bool, device=dev)
    elif kind == "random":
        g = torch.Generator().manual_seed(seed)
        a = (torch.rand(H, generator=g) < 0.5).to(dev)
    else:  # mean: per-head majority over the candidates
        n = candidate.sum(-1, keepdim=True).clamp_min(1)  # [B, 1]
        return (bits & candidate[:, None]).sum(-1) * 2 > n
    return a[None].expand(B, H)


def rescore(scores, valid, n_keep, n_recent, cfg) -> torch.Tensor:
    """Scores ``[B, H, T]`` -> KVCrush scores (2 importance / 1 representative / 0), same shape."""
    B, H, T = scores.shape
    dev = scores.device
    candidate = valid & (rank_from_end(valid) > n_recent[:, None])  # [B, T]
    n_sel = (n_keep - n_recent)[:, None, None]  # [B, 1, 1]
    n_crush = torch.floor(cfg.crush * n_sel.double()).long()
    n_imp = n_sel - n_crush
    s = torch.nan_to_num(scores.float(), nan=float("-inf")).masked_fill(~candidate[:, None], float("-inf"))
    order = torch.sort(s, dim=-1, descending=True, stable=True).indices  # [B, H, T], best first
    rank = torch.empty_like(order).scatter_(-1, order, torch.arange(T, device=dev).expand(B, H, T))
    cand = candidate[:, None]  # [B, 1, T]
    bits = cand & (rank < n_sel)  # what each head keeps with the whole budget
    imp = cand & (rank < n_imp)
    a = anchor(cfg.crush_anchor, bits, candidate, cfg.crush_seed)  # [B, H]
    distance = (bits != a[..., None]).sum(1)  # [B, T] Hamming distance over the heads
    evicted = cand & ~imp  # [B, H, T]
    key = torch.where(evicted, distance[:, None] * T + torch.arange(T, device=dev), torch.iinfo(torch.long).max)
    by_distance = key.argsort(-1)  # evicted tokens first, nearest to the anchor first
    n_evicted = evicted.sum(-1, keepdim=True)  # [B, H, 1]
    j = torch.arange(T, device=dev)
    pick = (j * n_evicted) // n_crush.clamp_min(1)  # uniformly spaced positions in that order
    take = j < n_crush  # [B, 1, T] -> [B, H, T]
    chosen = by_distance.gather(-1, pick.clamp_max(T - 1))
    rep = torch.zeros(B, H, T, dtype=torch.long, device=dev).scatter_add_(-1, chosen, take.expand(B, H, T).long()) > 0
    return imp.float() * 2 + (rep & evicted).float()

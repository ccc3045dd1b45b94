"""Pure-PyTorch reference implementations of the MiniKV custom ops (any device, fp32 math).

Shapes: ``B`` batch, ``Hq`` query heads, ``Hkv`` KV heads (``g = Hq // Hkv``), ``T`` prompt
tokens, ``Lq`` new query tokens, ``D`` head_dim, ``G`` group size, ``C`` store capacity in tokens,
``R`` residual length. Store layout (KIVI): keys ``codes [B, Hkv, D, C*bits/32]`` and
``scale/mn [B, Hkv, D, C/G]`` (per channel, grouped along tokens); values
``codes [B, Hkv, C, D*bits/32]`` and ``scale/mn [B, Hkv, C, D/G]`` (per token, grouped along
channels).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .quant import quantize_pack, unpack_dequantize

QUERY_BLOCK = 128  # prefill queries processed at once: memory O(QUERY_BLOCK * T), never T x T


def _logits(q, k, scale: float, softcap: float):
    s = torch.einsum("bhgmd,bhnd->bhgmn", q, k) * scale
    if softcap > 0:
        s = softcap * torch.tanh(s / softcap)
    return s


def _softmax(s, allowed):
    """Softmax over the last axis where ``allowed``; rows with nothing allowed give zeros."""
    s = s.masked_fill(~allowed, float("-inf"))
    m = s.amax(-1, keepdim=True).clamp_min(torch.finfo(s.dtype).min)  # finite for empty rows
    p = torch.exp(s - m)
    return p / p.sum(-1, keepdim=True).clamp_min(torch.finfo(s.dtype).tiny)


def prefill_attention(q, k, v, valid, query_weight, scale: float, softcap: float):
    """Causal attention over the prompt plus importance scores.

    q ``[B, Hq, T, D]``, k/v ``[B, Hkv, T, D]``, valid ``[B, T]`` bool (False = padding),
    query_weight ``[B, T]`` fp32. Returns ``out [B, Hq, T, D]`` (dtype of q) and
    ``scores [B, Hkv, T]`` fp32: ``scores[b, h, j] = sum_{i, heads of group h} w[b, i] * A[b, head, i, j]``.
    The queries before the first weighted one (SnapKV's early queries) are only attended, with one
    fused causal SDPA call when none of them is padding; the rest go in query blocks of
    ``QUERY_BLOCK`` rows, each against keys ``[0, block_end)`` only, a block without weights also
    fused (host reads of the weights decide: prefill only, never the decode step).
    """
    B, Hq, T, D = q.shape
    Hkv = k.shape[1]
    qf = q.float().view(B, Hkv, Hq // Hkv, T, D)  # [B, Hkv, g, T, D]
    # padding positions may hold anything (even NaN): zero them so 0-weights stay 0
    kf = torch.where(valid[:, None, :, None], k.float(), 0.0)
    vf = torch.where(valid[:, None, :, None], v.float(), 0.0)
    out = torch.empty(B, Hkv, Hq // Hkv, T, D, dtype=torch.float32, device=q.device)
    scores = torch.zeros(B, Hkv, T, dtype=torch.float32, device=q.device)
    pos = torch.arange(T, device=q.device)
    g = Hq // Hkv
    weighted = (query_weight.float() * valid).ne(0).any(0)  # [T]
    first = int(weighted.float().argmax()) if bool(weighted.any()) else T  # the first query that scores
    start = 0
    if softcap == 0 and first > 0 and bool(valid[:, :first].all()):  # SnapKV's early queries: one fused call
        qb = qf[:, :, :, :first].reshape(B, Hq, first, D)
        o = F.scaled_dot_product_attention(
            qb, kf[:, :, :first], vf[:, :, :first], is_causal=True, scale=scale, enable_gqa=True
        )
        out[:, :, :, :first] = o.view(B, Hkv, g, first, D)
        start = first
    for start in range(start, T, QUERY_BLOCK):
        end = min(start + QUERY_BLOCK, T)
        causal = pos[start:end, None] >= pos[None, :end]  # [M, end]
        allowed = causal & valid[:, None, None, None, :end]  # [B, 1, 1, M, end]
        w = query_weight[:, start:end].float() * valid[:, start:end]  # [B, M]
        if softcap == 0 and not bool(w.any()):  # no score from this block (padded early queries): fused
            qb = qf[:, :, :, start:end].reshape(B, Hq, end - start, D)
            o = F.scaled_dot_product_attention(
                qb,
                kf[:, :, :end].repeat_interleave(g, 1),
                vf[:, :, :end].repeat_interleave(g, 1),
                attn_mask=allowed[:, :, 0],
                scale=scale,
            )
            out[:, :, :, start:end] = torch.nan_to_num(o, nan=0.0).view(B, Hkv, g, end - start, D)  # padded rows: 0
            continue
        s = _logits(qf[:, :, :, start:end], kf[:, :, :end], scale, softcap)  # [B, Hkv, g, M, end]
        p = _softmax(s, allowed)
        out[:, :, :, start:end] = torch.einsum("bhgmn,bhnd->bhgmd", p, vf[:, :, :end])
        scores[:, :, :end] += torch.einsum("bhgmn,bm->bhn", p, w)
    return out.view(B, Hq, T, D).to(q.dtype), scores


def reconstruct_attention(q, k_ctx, v_ctx, ctx_valid, k_new, v_new, q_valid, scale: float, softcap: float):
    """Attention of ``M`` new queries over a held context and themselves, plus the most attention each
    context token receives (the reconstruction score of :mod:`minikv.selection.reconstruction`).

    q ``[B, Hq, M, D]``; k_ctx/v_ctx ``[B, Hkv, S, D]`` with ctx_valid ``[B, S]`` (False = padding);
    k_new/v_new ``[B, Hkv, M, D]``, attended causally; q_valid ``[B, M]`` marks the queries whose
    attention counts. Returns ``out [B, Hq, M, D]`` (dtype of q) and ``scores [B, Hkv, S]`` fp32:
    ``scores[b, h, j] = max over counted queries i and the query heads of KV head h of A[b, head, i, j]``
    (0 where nothing counts). Query blocks of ``QUERY_BLOCK`` rows: memory O(QUERY_BLOCK * (S + M)).
    """
    B, Hq, M, D = q.shape
    Hkv, S = k_ctx.shape[1], k_ctx.shape[2]
    g = Hq // Hkv
    qf = q.float().view(B, Hkv, g, M, D)
    keys = torch.cat([torch.where(ctx_valid[:, None, :, None], k_ctx.float(), 0.0), k_new.float()], 2)
    vals = torch.cat([torch.where(ctx_valid[:, None, :, None], v_ctx.float(), 0.0), v_new.float()], 2)
    out = torch.empty(B, Hkv, g, M, D, dtype=torch.float32, device=q.device)
    scores = torch.zeros(B, Hkv, S, dtype=torch.float32, device=q.device)
    pos = torch.arange(M, device=q.device)
    for start in range(0, M, QUERY_BLOCK):
        end = min(start + QUERY_BLOCK, M)
        causal = pos[start:end, None] >= pos[None, :end]  # [m, end] among the new tokens
        allowed = torch.cat([ctx_valid[:, None, :].expand(B, end - start, S), causal.expand(B, -1, -1)], -1)
        s = _logits(qf[:, :, :, start:end], keys[:, :, : S + end], scale, softcap)  # [B, Hkv, g, m, S + end]
        p = _softmax(s, allowed[:, None, None])
        out[:, :, :, start:end] = torch.einsum("bhgmn,bhnd->bhgmd", p, vals[:, :, : S + end])
        counted = p[..., :S] * q_valid[:, None, None, start:end, None]  # probabilities are >= 0
        scores = torch.maximum(scores, counted.amax(dim=(2, 3)))
    return out.view(B, Hq, M, D).to(q.dtype), scores


def select_tokens(scores, valid, n_keep, n_recent, n_max: int):
    """Per (sequence, KV head): the ``n_recent`` newest valid tokens plus the top scored older ones.

    scores ``[B, Hkv, T]``, valid ``[B, T]``, n_keep ``[B]`` (or ``[B, Hkv]``: per-head budgets) and
    n_recent ``[B]`` int64 with ``n_recent <= n_keep <= valid.sum(-1)`` and ``n_keep <= n_max``. Returns
    ``idx [B, Hkv, n_max]`` int64: each head's first ``n_keep`` entries are the kept positions in increasing (temporal) order;
    the rest are unspecified positions that the caller masks by count.
    """
    B, H, T = scores.shape
    rank_from_end = valid.flip(-1).cumsum(-1).flip(-1)  # [B, T], 1 for the newest valid token
    recent = valid & (rank_from_end <= n_recent[:, None])  # [B, T]
    candidate = (valid & ~recent)[:, None, :]  # [B, 1, T]
    s = torch.nan_to_num(scores.float(), nan=float("-inf")).masked_fill(~candidate, float("-inf"))
    k = min(n_max, T)
    # best first; equal scores (plateaus of SnapKV's max pool) in time order, so that a left-padded
    # sequence keeps what it keeps alone (topk breaks ties by raw position, which padding shifts)
    top = torch.sort(s, dim=-1, descending=True, stable=True).indices[..., :k]  # [B, H, k]
    take = torch.arange(k, device=scores.device) < (n_keep.view(B, -1) - n_recent[:, None])[..., None]
    keep = recent[:, None, :].expand(B, H, T).clone()
    keep.scatter_(-1, top, take | keep.gather(-1, top))
    order = torch.argsort((~keep).to(torch.int8), dim=-1, stable=True)  # kept first, in time order
    idx = order[..., :k]
    if k < n_max:
        idx = torch.cat([idx, idx[..., -1:].expand(B, H, n_max - k)], -1)
    return idx.contiguous()


def _store_keys(k_codes, k_scale, k_mn, bits, group, dtype):
    return unpack_dequantize(k_codes, k_scale, k_mn, bits, group, dtype).transpose(-1, -2)  # [B, H, C, D]


def decode_attention(
    q,
    k_codes,
    k_scale,
    k_mn,
    v_codes,
    v_scale,
    v_mn,
    n_packed,
    res_k,
    res_v,
    res_len,
    scale: float,
    softcap: float,
    k_bits: int,
    v_bits: int,
    group_size: int,
    tier_k_codes=None,
    tier_k_scale=None,
    tier_k_mn=None,
    tier_v_codes=None,
    tier_v_scale=None,
    tier_v_mn=None,
    n_tier=None,
    tier_k_bits: int = 4,
    tier_v_bits: int = 4,
):
    """Attention of ``Lq`` new queries over ``[tier ; packed store ; residual]`` with one softmax.

    q ``[B, Hq, Lq, D]`` (the new tokens are already appended); n_packed ``[B, Hkv]`` int64 (each
    KV head's packed tokens: per-head budgets), res_len ``[B]`` int64 (the residual, shared by the
    heads). The cached tokens are in temporal order, store first: query ``i`` sees the first
    ``n_packed + res_len - (Lq - 1 - i)`` of them. (The residual may begin with full-precision sink
    tokens: attention is order-free but for that mask, which only ever hides new tokens, so the
    sinks may sit there.) Keys hold ``k_bits``-bit codes, values ``v_bits``-bit ones.

    A precision tier (optional, all seven ``tier_*``/``n_tier`` given or none): a second packed
    store in the same layout, ``tier_k_bits``-bit keys and ``tier_v_bits``-bit values, of capacity
    ``Ct`` (``tier_v_codes.shape[2]``, whole groups), holding ``n_tier [B, Hkv]`` prompt tokens per
    KV head; every query sees all of them (they are older than any new token). Returns
    ``[B, Hq, Lq, D]`` in q's dtype.
    """
    B, Hq, Lq, D = q.shape
    Hkv = res_k.shape[1]
    keys = [_store_keys(k_codes, k_scale, k_mn, k_bits, group_size, torch.float32), res_k.float()]
    vals = [unpack_dequantize(v_codes, v_scale, v_mn, v_bits, group_size, torch.float32), res_v.float()]
    C, R = k_scale.shape[-1] * group_size, res_k.shape[2]
    slot = torch.arange(C + R, device=q.device)
    npk, rl = n_packed[:, :, None], res_len[:, None, None]  # [B, Hkv, 1], [B, 1, 1]
    # logical index of each slot (in temporal order) and whether it holds a token
    logical = torch.where(slot < C, slot, npk + slot - C)  # [B, Hkv, C+R]
    filled = torch.where(slot < C, slot < npk, slot - C < rl)
    limit = (npk + rl) - (Lq - 1 - torch.arange(Lq, device=q.device))  # [B, Hkv, Lq]
    allowed = filled[:, :, None, :] & (logical[:, :, None, :] < limit[..., None])  # [B, Hkv, Lq, C+R]
    if n_tier is not None:
        keys.insert(0, _store_keys(tier_k_codes, tier_k_scale, tier_k_mn, tier_k_bits, group_size, torch.float32))
        vals.insert(0, unpack_dequantize(tier_v_codes, tier_v_scale, tier_v_mn, tier_v_bits, group_size, torch.float32))
        in_tier = torch.arange(keys[0].shape[2], device=q.device) < n_tier[:, :, None]  # [B, Hkv, Ct]
        filled = torch.cat([in_tier, filled], -1)
        allowed = torch.cat([in_tier[:, :, None, :].expand(-1, -1, Lq, -1), allowed], -1)
    keys, vals = torch.cat(keys, 2), torch.cat(vals, 2)
    vals = torch.where(filled[..., None], vals, 0.0)  # empty slots may hold anything
    qf = q.float().view(B, Hkv, Hq // Hkv, Lq, D)
    p = _softmax(_logits(qf, keys, scale, softcap), allowed[:, :, None])
    out = torch.einsum("bhgmn,bhnd->bhgmd", p, vals)
    return out.reshape(B, Hq, Lq, D).to(q.dtype)


def _masked_write(buf, dim: int, start, block, mask):
    """``buf.narrow(dim, start[b], n)[b] = block[b]`` for the sequences where ``mask[b]``, in place.

    start ``[B]`` or ``[B, H]`` int64 (element offsets along ``dim`` >= 2, per sequence or per sequence
    and head), block shaped like ``buf`` with ``n`` along ``dim``. Static shapes: every sequence is
    gathered and rewritten; unmasked ones get their old values back (indices are clamped to stay in bounds).
    """
    n, size = block.shape[dim], buf.shape[dim]
    shape = [1] * buf.dim()
    shape[: start.dim()] = start.shape
    shape[dim] = n
    index = (start[..., None] + torch.arange(n, device=buf.device)).clamp_max(size - 1).view(shape)
    index = index.expand(*[block.shape[i] if i != dim else n for i in range(buf.dim())])
    old = buf.gather(dim, index)
    keep = mask.view([-1] + [1] * (buf.dim() - 1))
    buf.scatter_(dim, index, torch.where(keep, block.to(buf.dtype), old))


def append_kv(
    k_new,
    v_new,
    k_codes,
    k_scale,
    k_mn,
    v_codes,
    v_scale,
    v_mn,
    n_packed,
    res_k,
    res_v,
    res_len,
    n_sink,
    k_bits: int,
    v_bits: int,
    group_size: int,
    residual_length: int,
    clip: bool = False,
) -> None:
    """Append ``Lq`` tokens ``k_new/v_new [B, Hkv, Lq, D]`` to the residual, flushing at ``R``.

    The residual buffer ``[B, Hkv, S + R, D]`` holds, per sequence, ``n_sink[b]`` full-precision sink
    tokens (never flushed) followed by up to ``R = residual_length`` new tokens. A sequence whose
    residual holds ``n_sink + R`` tokens after a write has its last ``R`` quantized (keys with
    ``k_bits``, values with ``v_bits``, clipped scales if ``clip``) and appended to its packed store at
    token ``n_packed[b, h]`` of each KV head (a multiple of G), and keeps only its sinks. Mutates every buffer argument
    and ``n_packed``/``res_len`` in place; no host synchronisation.
    """
    R = residual_length
    every = torch.ones_like(res_len, dtype=torch.bool)
    slots = (n_sink[:, None] + torch.arange(R, device=res_k.device)[None]).clamp_max(res_k.shape[2] - 1)  # [B, R]
    index = slots[:, None, :, None].expand(-1, res_k.shape[1], -1, res_k.shape[3])  # [B, H, R, D]
    for i in range(k_new.shape[2]):
        _masked_write(res_k, 2, res_len, k_new[:, :, i : i + 1], every)
        _masked_write(res_v, 2, res_len, v_new[:, :, i : i + 1], every)
        res_len.add_(1)
        full = res_len == n_sink + R  # [B]
        rk, rv = res_k.gather(2, index), res_v.gather(2, index)  # the R tokens after the sinks
        kc, ks, km = quantize_pack(
            rk.transpose(-1, -2), k_bits, group_size, clip
        )  # [B, H, D, R*bits/32], [B, H, D, R/G]
        vc, vs, vm = quantize_pack(rv, v_bits, group_size, clip)  # [B, H, R, D*bits/32], [B, H, R, D/G]
        _masked_write(k_codes, 3, n_packed // (32 // k_bits), kc, full)
        _masked_write(k_scale, 3, n_packed // group_size, ks, full)
        _masked_write(k_mn, 3, n_packed // group_size, km, full)
        _masked_write(v_codes, 2, n_packed, vc, full)
        _masked_write(v_scale, 2, n_packed, vs, full)
        _masked_write(v_mn, 2, n_packed, vm, full)
        n_packed.add_(full[:, None].to(n_packed.dtype) * R)
        res_len.copy_(torch.where(full, n_sink, res_len))

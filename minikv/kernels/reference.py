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
    Query blocks of ``QUERY_BLOCK`` rows, each against keys ``[0, block_end)`` only.
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
    for start in range(0, T, QUERY_BLOCK):
        end = min(start + QUERY_BLOCK, T)
        s = _logits(qf[:, :, :, start:end], kf[:, :, :end], scale, softcap)  # [B, Hkv, g, M, end]
        causal = pos[start:end, None] >= pos[None, :end]  # [M, end]
        allowed = causal & valid[:, None, None, None, :end]  # [B, 1, 1, M, end]
        p = _softmax(s, allowed)
        out[:, :, :, start:end] = torch.einsum("bhgmn,bhnd->bhgmd", p, vf[:, :, :end])
        w = query_weight[:, start:end].float() * valid[:, start:end]  # [B, M]
        scores[:, :, :end] += torch.einsum("bhgmn,bm->bhn", p, w)
    return out.view(B, Hq, T, D).to(q.dtype), scores


def select_tokens(scores, valid, n_keep, n_recent, n_max: int):
    """Per (sequence, KV head): the ``n_recent`` newest valid tokens plus the top scored older ones.

    scores ``[B, Hkv, T]``, valid ``[B, T]``, n_keep / n_recent ``[B]`` int64 with
    ``n_recent <= n_keep <= valid.sum(-1)`` and ``n_keep <= n_max``. Returns ``idx [B, Hkv, n_max]``
    int64: the first ``n_keep[b]`` entries are the kept positions in increasing (temporal) order;
    the rest are unspecified positions that the caller masks by count.
    """
    B, H, T = scores.shape
    rank_from_end = valid.flip(-1).cumsum(-1).flip(-1)  # [B, T], 1 for the newest valid token
    recent = valid & (rank_from_end <= n_recent[:, None])  # [B, T]
    candidate = (valid & ~recent)[:, None, :]  # [B, 1, T]
    s = torch.nan_to_num(scores.float(), nan=float("-inf")).masked_fill(~candidate, float("-inf"))
    k = min(n_max, T)
    top = s.topk(k, dim=-1).indices  # [B, H, k], best first
    take = torch.arange(k, device=scores.device) < (n_keep - n_recent)[:, None, None]
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
    q, k_codes, k_scale, k_mn, v_codes, v_scale, v_mn, n_packed, res_k, res_v, res_len,
    scale: float, softcap: float, bits: int, group_size: int,
):
    """Attention of ``Lq`` new queries over ``[packed store ; residual]`` with one softmax.

    q ``[B, Hq, Lq, D]`` (the new tokens are already appended); n_packed / res_len ``[B]`` int64.
    The cached tokens are in temporal order, store first: query ``i`` sees the first
    ``n_packed + res_len - (Lq - 1 - i)`` of them. Returns ``[B, Hq, Lq, D]`` in q's dtype.
    """
    B, Hq, Lq, D = q.shape
    Hkv = res_k.shape[1]
    keys = torch.cat([_store_keys(k_codes, k_scale, k_mn, bits, group_size, torch.float32), res_k.float()], 2)
    vals = torch.cat([unpack_dequantize(v_codes, v_scale, v_mn, bits, group_size, torch.float32), res_v.float()], 2)
    C, R = keys.shape[2] - res_k.shape[2], res_k.shape[2]
    slot = torch.arange(C + R, device=q.device)
    # logical index of each slot (in temporal order) and whether it holds a token
    logical = torch.where(slot[None] < C, slot[None], n_packed[:, None] + slot[None] - C)  # [B, C+R]
    filled = torch.where(slot[None] < C, slot[None] < n_packed[:, None], slot[None] - C < res_len[:, None])
    limit = (n_packed + res_len)[:, None] - (Lq - 1 - torch.arange(Lq, device=q.device))[None]  # [B, Lq]
    allowed = filled[:, None, :] & (logical[:, None, :] < limit[:, :, None])  # [B, Lq, C+R]
    vals = torch.where(filled[:, None, :, None], vals, 0.0)  # empty slots may hold anything
    qf = q.float().view(B, Hkv, Hq // Hkv, Lq, D)
    p = _softmax(_logits(qf, keys, scale, softcap), allowed[:, None, None])
    out = torch.einsum("bhgmn,bhnd->bhgmd", p, vals)
    return out.reshape(B, Hq, Lq, D).to(q.dtype)


def _masked_write(buf, dim: int, start, block, mask):
    """``buf.narrow(dim, start[b], n)[b] = block[b]`` for the sequences where ``mask[b]``, in place.

    start ``[B]`` int64 (element offsets along ``dim``), block shaped like ``buf`` with ``n`` along
    ``dim``. Static shapes: every sequence is gathered and rewritten; unmasked ones get their old
    values back (indices are clamped to stay in bounds).
    """
    n, size = block.shape[dim], buf.shape[dim]
    shape = [1] * buf.dim()
    shape[0], shape[dim] = -1, n
    index = (start[:, None] + torch.arange(n, device=buf.device)[None]).clamp_max(size - 1).view(shape)
    index = index.expand(*[block.shape[i] if i != dim else n for i in range(buf.dim())])
    old = buf.gather(dim, index)
    keep = mask.view([-1] + [1] * (buf.dim() - 1))
    buf.scatter_(dim, index, torch.where(keep, block.to(buf.dtype), old))


def append_kv(
    k_new, v_new, k_codes, k_scale, k_mn, v_codes, v_scale, v_mn, n_packed, res_k, res_v, res_len,
    bits: int, group_size: int,
) -> None:
    """Append ``Lq`` tokens ``k_new/v_new [B, Hkv, Lq, D]`` to the residual, flushing at ``R``.

    A sequence whose residual holds ``R`` tokens after a write has them quantized and appended to
    its packed store at token ``n_packed[b]`` (a multiple of G), and its residual emptied. Mutates
    every buffer argument and ``n_packed``/``res_len`` in place; no host synchronisation.
    """
    R = res_k.shape[2]
    per_word = 32 // bits
    every = torch.ones_like(res_len, dtype=torch.bool)
    for i in range(k_new.shape[2]):
        _masked_write(res_k, 2, res_len, k_new[:, :, i : i + 1], every)
        _masked_write(res_v, 2, res_len, v_new[:, :, i : i + 1], every)
        res_len.add_(1)
        full = res_len == R  # [B]
        kc, ks, km = quantize_pack(res_k.transpose(-1, -2), bits, group_size)  # [B, H, D, R*bits/32], [B, H, D, R/G]
        vc, vs, vm = quantize_pack(res_v, bits, group_size)  # [B, H, R, D*bits/32], [B, H, R, D/G]
        _masked_write(k_codes, 3, n_packed // per_word, kc, full)
        _masked_write(k_scale, 3, n_packed // group_size, ks, full)
        _masked_write(k_mn, 3, n_packed // group_size, km, full)
        _masked_write(v_codes, 2, n_packed, vc, full)
        _masked_write(v_scale, 2, n_packed, vs, full)
        _masked_write(v_mn, 2, n_packed, vm, full)
        n_packed.add_(full.to(n_packed.dtype) * R)
        res_len.masked_fill_(full, 0)

"""Triton decode attention over ``[2/4-bit packed store ; full-precision residual]`` (flash-decoding).

Grid ``(B * Hkv, S)``: program ``(b, h, s)`` reads split ``s`` of KV head ``h``'s packed tokens once
for the whole query group (``g = Hq / Hkv`` heads x ``Lq`` new queries as the rows of one tile),
dequantizes each tile in registers, multiplies with ``tl.dot`` and keeps an online softmax; the last
split also reads the residual. Splits are merged by their log-sum-exp in PyTorch (a few small ops).
All buffers are the contiguous ones ``QuantizedStore`` allocates.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl


@triton.jit
def _softcapped(s, softcap, SOFTCAP: tl.constexpr):
    if SOFTCAP:  # softcap * tanh(s / softcap), tanh from exp (no libdevice needed)
        x = s / softcap
        e = tl.exp(-2.0 * tl.abs(x))
        t = (1.0 - e) / (1.0 + e)
        s = softcap * tl.where(x < 0, -t, t)
    return s


@triton.jit
def _online_update(s, allowed, m, l):
    s = tl.where(allowed, s, float("-inf"))
    m_new = tl.maximum(m, tl.max(s, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp(s - m_safe[:, None])
    alpha = tl.exp(m - m_safe)
    l = l * alpha + tl.sum(p, axis=1)
    return p, alpha, m_new, l


@triton.jit
def _decode_attention_kernel(
    q_ptr,
    kc_ptr,
    ks_ptr,
    km_ptr,
    vc_ptr,
    vs_ptr,
    vm_ptr,
    npk_ptr,
    rk_ptr,
    rv_ptr,
    rl_ptr,
    acc_ptr,
    m_ptr,
    l_ptr,
    scale,
    softcap,
    Hkv,
    C,
    R,
    Lq,
    split_tokens,
    K_BITS: tl.constexpr,
    V_BITS: tl.constexpr,
    G: tl.constexpr,
    D: tl.constexpr,
    GQ: tl.constexpr,
    BQ: tl.constexpr,
    BT: tl.constexpr,
    SOFTCAP: tl.constexpr,
    DOT_FP32: tl.constexpr,
    TIER: tl.constexpr = False,
):
    # TIER: the buffers are a precision tier's (every query sees all its tokens; no residual)
    # constexpr: tile sizes (BQ query rows, BT tokens, D channels) and the bit layout fix the code
    KPW: tl.constexpr = 32 // K_BITS  # codes per int32 word
    VPW: tl.constexpr = 32 // V_BITS
    KMAX: tl.constexpr = (1 << K_BITS) - 1
    VMAX: tl.constexpr = (1 << V_BITS) - 1
    pid = tl.program_id(0)
    split = tl.program_id(1)
    n_splits = tl.num_programs(1)
    b = pid // Hkv
    n_packed = tl.load(npk_ptr + pid)  # [B, Hkv]: this KV head's packed tokens
    res_len = tl.load(rl_ptr + b)
    total = n_packed + res_len
    rows = tl.arange(0, BQ)
    row_ok = rows < GQ
    qi = rows % Lq  # rows are (head of the group, new query) pairs
    limit = total - (Lq - 1 - qi)  # query qi sees the first `limit` cached tokens
    d = tl.arange(0, D)
    tok = tl.arange(0, BT)
    q = tl.load(q_ptr + (pid * GQ + rows[:, None]) * D + d[None, :], mask=row_ok[:, None], other=0.0)
    dot_dtype = tl.float32 if DOT_FP32 else q_ptr.dtype.element_ty
    q = q.to(dot_dtype)
    m = tl.full([BQ], float("-inf"), tl.float32)
    l = tl.zeros([BQ], tl.float32)
    acc = tl.zeros([BQ, D], tl.float32)

    kc_base = kc_ptr + pid * D * (C // KPW)
    ks_base = ks_ptr + pid * D * (C // G)
    km_base = km_ptr + pid * D * (C // G)
    vc_base = vc_ptr + pid * C * (D // VPW)
    vs_base = vs_ptr + pid * C * (D // G)
    vm_base = vm_ptr + pid * C * (D // G)
    # a tile is BT tokens = TG whole groups; every packed word and every scale/min is loaded once
    TG: tl.constexpr = BT // G  # key groups per tile (per channel)
    DG: tl.constexpr = D // G  # value groups per token
    KW: tl.constexpr = BT // KPW  # key words per channel per tile
    VW: tl.constexpr = D // VPW  # value words per token
    kword = tl.arange(0, KW)
    vword = tl.arange(0, VW)
    tgrp = tl.arange(0, TG)
    dgrp = tl.arange(0, DG)
    kshift = tl.arange(0, KPW) * K_BITS
    vshift = tl.arange(0, VPW) * V_BITS
    start = split * split_tokens
    end = tl.minimum(start + split_tokens, n_packed)  # n_packed and the split bounds are multiples of G
    for t0 in range(start, end, BT):
        t = t0 + tok
        t_ok = t < end
        # keys [D, BT]: per channel, KPW tokens per word, a scale and min per G tokens
        kw_ok = (t0 + kword * KPW) < end
        kw = tl.load(kc_base + d[:, None] * (C // KPW) + (t0 // KPW + kword)[None, :], mask=kw_ok[None, :], other=0)
        kq = tl.reshape((kw[:, :, None] >> kshift[None, None, :]) & KMAX, [D, TG, G])
        kg_ok = (t0 + tgrp * G) < end
        kg = d[:, None] * (C // G) + (t0 // G + tgrp)[None, :]
        ksc = tl.load(ks_base + kg, mask=kg_ok[None, :], other=0.0).to(tl.float32)
        kmn = tl.load(km_base + kg, mask=kg_ok[None, :], other=0.0).to(tl.float32)
        k = tl.reshape(kq.to(tl.float32) * ksc[:, :, None] + kmn[:, :, None], [D, BT])
        s = tl.dot(q, k.to(dot_dtype), input_precision="ieee") * scale
        s = _softcapped(s, softcap, SOFTCAP)
        if TIER:
            allowed = row_ok[:, None] & t_ok[None, :]
        else:
            allowed = row_ok[:, None] & t_ok[None, :] & (t[None, :] < limit[:, None])
        p, alpha, m, l = _online_update(s, allowed, m, l)
        # values [BT, D]: per token, VPW channels per word, a scale and min per G channels
        vw = tl.load(vc_base + t[:, None] * VW + vword[None, :], mask=t_ok[:, None], other=0)
        vq = tl.reshape((vw[:, :, None] >> vshift[None, None, :]) & VMAX, [BT, DG, G])
        vg = t[:, None] * DG + dgrp[None, :]
        vsc = tl.load(vs_base + vg, mask=t_ok[:, None], other=0.0).to(tl.float32)
        vmn = tl.load(vm_base + vg, mask=t_ok[:, None], other=0.0).to(tl.float32)
        v = tl.reshape(vq.to(tl.float32) * vsc[:, :, None] + vmn[:, :, None], [BT, D])
        v = tl.where(t_ok[:, None], v, 0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(dot_dtype), v.to(dot_dtype), input_precision="ieee")
    if not TIER and split == n_splits - 1:  # the residual, full precision, after the packed tokens
        rk_base = rk_ptr + pid * R * D
        rv_base = rv_ptr + pid * R * D
        for r0 in range(0, res_len, BT):
            r = r0 + tok
            r_ok = r < res_len
            k = tl.load(rk_base + r[None, :] * D + d[:, None], mask=r_ok[None, :], other=0.0)
            s = tl.dot(q, k.to(dot_dtype), input_precision="ieee") * scale
            s = _softcapped(s, softcap, SOFTCAP)
            allowed = row_ok[:, None] & r_ok[None, :] & ((n_packed + r)[None, :] < limit[:, None])
            p, alpha, m, l = _online_update(s, allowed, m, l)
            v = tl.load(rv_base + r[:, None] * D + d[None, :], mask=r_ok[:, None], other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(dot_dtype), v.to(dot_dtype), input_precision="ieee")
    out = (pid * n_splits + split) * BQ
    tl.store(acc_ptr + (out + rows[:, None]) * D + d[None, :], acc)
    tl.store(m_ptr + out + rows, m)
    tl.store(l_ptr + out + rows, l)


# head_dim -> (tokens per tile, warps), from `python benchmarks/aot_check.py` (sm_90): the largest
# tile with no spills in fp16/bf16 at G 16/32 and every packed byte requested once (a tile too small
# for its warps makes threads load the same words); G 64 takes 64-token tiles (and 2 warps at D 64)
TILES = {64: (64, 4), 128: (32, 4), 256: (32, 8)}


def tile(head_dim: int, group_size: int) -> tuple[int, int]:
    """(tokens per tile, warps) of the decode kernel; a tile holds whole groups (BT >= G)."""
    bt, warps = next((TILES[d] for d in sorted(TILES) if head_dim <= d), TILES[max(TILES)])
    if group_size > bt:
        bt, warps = group_size, (2 if head_dim <= 64 else warps)
    elif group_size == bt and head_dim <= 64 and group_size >= 64:
        warps = 2
    return bt, warps


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _num_splits(bh: int, capacity: int, block: int, device: torch.device) -> int:
    """Enough programs to fill the GPU (2 per SM); at most two splits on the interpreter."""
    blocks = max(1, triton.cdiv(capacity, block))
    if device.type != "cuda":
        return min(blocks, 2)
    sms = _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return max(1, min(blocks, triton.cdiv(2 * sms, bh)))


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
    """Triton launcher of ``minikv::decode_attention`` (same contract as the reference): the packed store
    and residual in one launch, a precision tier (if any) in a second one, their splits merged together."""
    B, Hq, Lq, D = q.shape
    Hkv = res_k.shape[1]
    qg = q.reshape(B, Hkv, Hq // Hkv, Lq, D).contiguous()  # rows of a KV head: (head, query)
    rest = (res_k, res_v, res_len, scale, softcap)
    store = (k_codes, k_scale, k_mn, v_codes, v_scale, v_mn)
    acc, m, l = _partials(qg, store, n_packed, *rest, k_bits, v_bits, group_size, tier=False)
    if n_tier is not None:  # the tier's splits join the store's
        tier = (tier_k_codes, tier_k_scale, tier_k_mn, tier_v_codes, tier_v_scale, tier_v_mn)
        parts = zip((acc, m, l), _partials(qg, tier, n_tier, *rest, tier_k_bits, tier_v_bits, group_size, tier=True))
        acc, m, l = (torch.cat(x, 1) for x in parts)
    # merge the splits: out = sum_s e^(m_s - M) acc_s / sum_s e^(m_s - M) l_s
    M = m.amax(1, keepdim=True)
    w = torch.exp(m - torch.where(M == float("-inf"), 0.0, M))  # [B*Hkv, S, BQ]
    out = (w[..., None] * acc).sum(1) / (w * l).sum(1).clamp_min(1e-30)[..., None]  # [B*Hkv, BQ, D]
    return out[:, : Hq // Hkv * Lq].reshape(B, Hq, Lq, D).to(q.dtype)


def _partials(qg, packed, n_packed, res_k, res_v, res_len, scale, softcap, k_bits, v_bits, group_size, tier):
    """One launch over a packed store (``tier``: a precision tier, no residual): every split's unnormalised
    ``acc [B*Hkv, S, BQ, D]``, running max ``m`` and sum ``l [B*Hkv, S, BQ]``."""
    B, Hkv, g, Lq, D = qg.shape
    GQ = g * Lq
    BQ = max(16, triton.next_power_of_2(GQ))
    R = res_k.shape[2]
    C = packed[3].shape[2]
    BT, warps = tile(D, group_size)
    S = _num_splits(B * Hkv, C, BT, qg.device)
    split_tokens = triton.cdiv(triton.cdiv(max(C, 1), S), BT) * BT
    acc = torch.empty(B * Hkv, S, BQ, D, dtype=torch.float32, device=qg.device)
    m = torch.empty(B * Hkv, S, BQ, dtype=torch.float32, device=qg.device)
    l = torch.empty_like(m)
    dot_fp32 = qg.dtype == torch.float32 or os.environ.get("TRITON_INTERPRET") == "1"
    with torch.device(qg.device):
        _decode_attention_kernel[(B * Hkv, S)](
            qg,
            *packed,
            n_packed,
            res_k,
            res_v,
            res_len,
            acc,
            m,
            l,
            scale,
            softcap,
            Hkv,
            C,
            R,
            Lq,
            split_tokens,
            K_BITS=k_bits,
            V_BITS=v_bits,
            G=group_size,
            D=D,
            GQ=GQ,
            BQ=BQ,
            BT=BT,
            SOFTCAP=softcap > 0,
            DOT_FP32=dot_fp32,
            TIER=tier,
            num_warps=warps,
        )
    return acc, m, l

"""Triton paged decode attention: one new query per sequence over its 2/4-bit vLLM pages, read in place.

Grid ``(B, Hkv, S)``: program ``(b, h, s)`` takes split ``s`` of sequence ``b``'s packed tiles of ``BT``
tokens (a tile never straddles a page: ``N % BT == 0``), looks each tile's page up in the block table
(one scalar load), and reads KV head ``h``'s words once for the whole query group (the ``g = Hq / Hkv``
query heads are the rows of one ``tl.dot`` tile). Keys are word-major (``[N*kb/32, D]`` per page:
a tile's words are contiguous rows), dequantized in registers. The last split also reads the open
group (fewer than G tokens): keys from the page's full-precision residual, values from their codes.
Splits hold partial ``(acc, m, l)``, merged by their log-sum-exp.

Capture-safe: the split count depends only on ``B * Hkv`` and the device (never on a sequence
length), every bound is read on the device (``seq_lens``), a padded row (``seq_len == 0``) reads
nothing and gives zeros, and nothing is read back to the host.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .triton_decode import _online_update, _sm_count, _softcapped, tile

MAX_SPLITS = 16  # the scratch per call is [B, Hkv, S, BQ, D] fp32


@triton.jit
def _paged_decode_kernel(
    q_ptr,
    kc_ptr,
    ks_ptr,
    km_ptr,
    vc_ptr,
    vs_ptr,
    vm_ptr,
    kr_ptr,
    bt_ptr,
    sl_ptr,
    acc_ptr,
    m_ptr,
    l_ptr,
    scale,
    softcap,
    bt_stride,
    w_block,  # int32 regions: strides of a block and of a KV head (elements)
    w_head,
    h_block,  # fp16 regions
    h_head,
    r_block,  # the residual (model dtype)
    r_head,
    K_BITS: tl.constexpr,
    V_BITS: tl.constexpr,
    G: tl.constexpr,
    D: tl.constexpr,
    N: tl.constexpr,
    GQ: tl.constexpr,
    BQ: tl.constexpr,
    BT: tl.constexpr,
    SOFTCAP: tl.constexpr,
    DOT_FP32: tl.constexpr,
):
    KPW: tl.constexpr = 32 // K_BITS  # codes per int32 word
    VPW: tl.constexpr = 32 // V_BITS
    KMAX: tl.constexpr = (1 << K_BITS) - 1
    VMAX: tl.constexpr = (1 << V_BITS) - 1
    TG: tl.constexpr = BT // G  # key groups per tile
    DG: tl.constexpr = D // G  # value groups per token
    KW: tl.constexpr = BT // KPW  # key word rows per tile
    VW: tl.constexpr = D // VPW  # value words per token
    b = tl.program_id(0)
    h = tl.program_id(1)
    split = tl.program_id(2)
    n_splits = tl.num_programs(2)
    Hkv = tl.num_programs(1)
    L = tl.load(sl_ptr + b)
    n_packed = L // G * G  # tokens in complete key groups; the open group's keys are in its page's residual
    tiles = tl.cdiv(n_packed, BT)
    per_split = tl.cdiv(tiles, n_splits)
    lo = split * per_split
    hi = tl.minimum(lo + per_split, tiles)

    rows = tl.arange(0, BQ)
    row_ok = rows < GQ
    d = tl.arange(0, D)
    tok = tl.arange(0, BT)
    q = tl.load(q_ptr + ((b * Hkv + h) * GQ + rows[:, None]) * D + d[None, :], mask=row_ok[:, None], other=0.0)
    dot_dtype = tl.float32 if DOT_FP32 else q_ptr.dtype.element_ty
    q = q.to(dot_dtype)
    m = tl.full([BQ], float("-inf"), tl.float32)
    l = tl.zeros([BQ], tl.float32)
    acc = tl.zeros([BQ, D], tl.float32)

    kword = tl.arange(0, KW)
    vword = tl.arange(0, VW)
    tgrp = tl.arange(0, TG)
    dgrp = tl.arange(0, DG)
    kshift = tl.arange(0, KPW) * K_BITS
    vshift = tl.arange(0, VPW) * V_BITS
    for ti in range(lo, hi):  # packed tiles: every word, scale and minimum of the tile loaded once, unmasked
        t0 = ti * BT
        page = tl.load(bt_ptr + b * bt_stride + t0 // N).to(tl.int64)
        o = t0 % N  # the tile's first slot in its page
        t = t0 + tok
        t_ok = t < n_packed  # a page's slots past the sequence hold anything: masked after the loads
        w_page = page * w_block + h * w_head
        h_page = page * h_block + h * h_head
        # keys [D, BT]: word rows (o / KPW + kword) of D channels; a scale and minimum per G tokens per channel
        kw = tl.load(kc_ptr + w_page + (o // KPW + kword)[None, :] * D + d[:, None])
        kq = tl.reshape((kw[:, :, None] >> kshift[None, None, :]) & KMAX, [D, TG, G])
        kg = h_page + (o // G + tgrp)[None, :] * D + d[:, None]
        ksc = tl.load(ks_ptr + kg).to(tl.float32)
        kmn = tl.load(km_ptr + kg).to(tl.float32)
        k = tl.reshape(kq.to(tl.float32) * ksc[:, :, None] + kmn[:, :, None], [D, BT])
        s = tl.dot(q, k.to(dot_dtype), input_precision="ieee") * scale
        s = _softcapped(s, softcap, SOFTCAP)
        p, alpha, m, l = _online_update(s, row_ok[:, None] & t_ok[None, :], m, l)
        # values [BT, D]: per token, VPW channels per word, a scale and minimum per G channels
        slot = o + tok
        vw = tl.load(vc_ptr + w_page + slot[:, None] * VW + vword[None, :])
        vq = tl.reshape((vw[:, :, None] >> vshift[None, None, :]) & VMAX, [BT, DG, G])
        vg = h_page + slot[:, None] * DG + dgrp[None, :]
        vsc = tl.load(vs_ptr + vg).to(tl.float32)
        vmn = tl.load(vm_ptr + vg).to(tl.float32)
        v = tl.reshape(vq.to(tl.float32) * vsc[:, :, None] + vmn[:, :, None], [BT, D])
        v = tl.where(t_ok[:, None], v, 0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(dot_dtype), v.to(dot_dtype), input_precision="ieee")
    if split == n_splits - 1:  # the open group (< G tokens): keys from the page's residual, values from codes
        r = tl.arange(0, G)
        r_ok = r < L - n_packed
        page = tl.load(bt_ptr + b * bt_stride + n_packed // N, mask=L > n_packed, other=0).to(tl.int64)
        slot = n_packed % N + r
        k = tl.load(kr_ptr + page * r_block + h * r_head + r[None, :] * D + d[:, None], mask=r_ok[None, :], other=0.0)
        s = tl.dot(q, k.to(dot_dtype), input_precision="ieee") * scale
        s = _softcapped(s, softcap, SOFTCAP)
        p, alpha, m, l = _online_update(s, row_ok[:, None] & r_ok[None, :], m, l)
        w_page = page * w_block + h * w_head
        h_page = page * h_block + h * h_head
        vw = tl.load(vc_ptr + w_page + slot[:, None] * VW + vword[None, :], mask=r_ok[:, None], other=0)
        vq = tl.reshape((vw[:, :, None] >> vshift[None, None, :]) & VMAX, [G, DG, G])
        vg = h_page + slot[:, None] * DG + dgrp[None, :]
        vsc = tl.load(vs_ptr + vg, mask=r_ok[:, None], other=0.0).to(tl.float32)
        vmn = tl.load(vm_ptr + vg, mask=r_ok[:, None], other=0.0).to(tl.float32)
        v = tl.reshape(vq.to(tl.float32) * vsc[:, :, None] + vmn[:, :, None], [G, D])
        acc = acc * alpha[:, None] + tl.dot(p.to(dot_dtype), v.to(dot_dtype), input_precision="ieee")
    out = ((b * Hkv + h) * n_splits + split) * BQ
    tl.store(acc_ptr + (out + rows[:, None]) * D + d[None, :], acc)
    tl.store(m_ptr + out + rows, m)
    tl.store(l_ptr + out + rows, l)


def page_tile(head_dim: int, group_size: int, block_size: int) -> tuple[int, int]:
    """(tokens per tile, warps): the decode kernel's tile, halved until it divides the block size."""
    bt, warps = tile(head_dim, group_size)
    while block_size % bt:
        bt //= 2
    return bt, warps


def num_splits(rows: int, device: torch.device) -> int:
    """Splits per (sequence, KV head): enough programs to fill the GPU (2 per SM), from the batch shape
    alone (fixed per captured batch size); two on the interpreter (the merge is exercised)."""
    if device.type != "cuda":
        return 2
    sms = _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return max(1, min(MAX_SPLITS, triton.cdiv(2 * sms, rows)))


def _strides(x: torch.Tensor) -> tuple[int, int]:
    """(block, KV head) strides; a single head's stride is never used (and a view may give it any value)."""
    return x.stride(0), x.stride(1) if x.shape[1] > 1 else 0


def paged_decode_attention(
    q,
    k_codes,
    k_scale,
    k_mn,
    v_codes,
    v_scale,
    v_mn,
    k_res,
    block_table,
    seq_lens,
    scale: float,
    softcap: float,
    k_bits: int,
    v_bits: int,
    group_size: int,
):
    """Triton launcher of ``minikv::paged_decode_attention`` (same contract as the reference)."""
    B, Hq, D = q.shape
    Hkv, N = v_codes.shape[1], v_codes.shape[2]
    G = group_size
    GQ = Hq // Hkv
    BQ = max(16, triton.next_power_of_2(GQ))
    BT, warps = page_tile(D, G, N)
    S = num_splits(B * Hkv, q.device)
    # the regions are views of one cache tensor: the same page strides in elements of their own dtype
    if _strides(k_codes) != _strides(v_codes) or not (
        _strides(k_scale) == _strides(k_mn) == _strides(v_scale) == _strides(v_mn)
    ):
        raise ValueError("paged_decode_attention: the regions must be views of one paged cache tensor")
    acc = torch.empty(B, Hkv, S, BQ, D, dtype=torch.float32, device=q.device)
    m = torch.empty(B, Hkv, S, BQ, dtype=torch.float32, device=q.device)
    l = torch.empty_like(m)
    dot_fp32 = q.dtype == torch.float32 or os.environ.get("TRITON_INTERPRET") == "1"
    with torch.device(q.device):
        _paged_decode_kernel[(B, Hkv, S)](
            q.contiguous(),
            k_codes,
            k_scale,
            k_mn,
            v_codes,
            v_scale,
            v_mn,
            k_res,
            block_table,
            seq_lens,
            acc,
            m,
            l,
            scale,
            softcap,
            block_table.stride(0),
            *_strides(k_codes),
            *_strides(k_scale),
            *_strides(k_res),
            K_BITS=k_bits,
            V_BITS=v_bits,
            G=G,
            D=D,
            N=N,
            GQ=GQ,
            BQ=BQ,
            BT=BT,
            SOFTCAP=softcap > 0,
            DOT_FP32=dot_fp32,
            num_warps=warps,
        )
    # merge the splits: out = sum_s e^(m_s - M) acc_s / sum_s e^(m_s - M) l_s (an empty row gives zeros)
    M = m.amax(2, keepdim=True)
    w = torch.exp(m - torch.where(M == float("-inf"), 0.0, M))  # [B, Hkv, S, BQ]
    out = (w[..., None] * acc).sum(2) / (w * l).sum(2).clamp_min(1e-30)[..., None]  # [B, Hkv, BQ, D]
    return out[:, :, :GQ].reshape(B, Hq, D).to(q.dtype)

"""Triton paged attention: new queries over the 2/4-bit tokens stored in vLLM's pages, read in place.

Grid ``(B * QB, Hkv, S)``: program ``(b, qb, h, s)`` takes split ``s`` of sequence ``b``'s packed tiles of
``BT`` tokens (a tile never straddles a page: ``N % BT == 0``), looks each tile's page up in the block
table (one scalar load), and reads KV head ``h``'s words once for a block of ``BQ`` query rows (the
``g = Hq / Hkv`` query heads x ``M`` new queries of the KV head are the rows of one ``tl.dot`` tile;
decode has ``M = 1`` and one block). Every row sees the first ``ctx_lens[b]`` stored tokens. Keys are word-major (``[N*kb/32, D]`` per page:
a tile's words are contiguous rows), dequantized in registers. The last split also reads the open
group (fewer than G tokens): keys from the page's full-precision residual, values from their codes.
Splits hold partial ``(acc, m, l)``, merged by their log-sum-exp, which is returned with the output
(a prefill chunk merges it with its own tokens' attention).

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

MAX_SPLITS = 16  # the scratch per call is [B, Hkv, S, rows, D] fp32
ACC_ELEMENTS = 4096  # query rows per program x head_dim: 64 rows at D 64 ... 16 at D 256 (a chunk's rows take
# several programs; `python benchmarks/aot_check.py`: 64 rows at D 128 spill on sm_80)


@triton.jit
def _paged_attention_kernel(
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
    cl_ptr,
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
    QB: tl.constexpr,
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
    pid = tl.program_id(0)
    b = pid // QB
    qb = pid % QB
    h = tl.program_id(1)
    split = tl.program_id(2)
    n_splits = tl.num_programs(2)
    Hkv = tl.num_programs(1)
    L = tl.load(sl_ptr + b)
    ctx = tl.minimum(tl.load(cl_ptr + b), L)  # the rows see tokens [0, ctx)
    n_packed = L // G * G  # tokens in complete key groups; the open group's keys are in its page's residual
    packed_seen = tl.minimum(n_packed, ctx)
    tiles = tl.cdiv(packed_seen, BT)
    per_split = tl.cdiv(tiles, n_splits)
    lo = split * per_split
    hi = tl.minimum(lo + per_split, tiles)

    rows = qb * BQ + tl.arange(0, BQ)  # (query head of the group, new query) pairs of KV head h
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
        t_ok = t < packed_seen  # a page's slots past the sequence hold anything: masked after the loads
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
        r_ok = r < ctx - n_packed
        page = tl.load(bt_ptr + b * bt_stride + n_packed // N, mask=ctx > n_packed, other=0).to(tl.int64)
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
    out = ((b * Hkv + h) * n_splits + split) * (QB * BQ)  # rows already count the block's offset
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


def paged_attention(
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
    ctx_lens,
    scale: float,
    softcap: float,
    k_bits: int,
    v_bits: int,
    group_size: int,
):
    """Triton launcher of ``minikv::paged_attention`` (same contract as the reference)."""
    B, Hq, M, D = q.shape
    Hkv, N = v_codes.shape[1], v_codes.shape[2]
    G = group_size
    GQ = Hq // Hkv * M  # rows per KV head
    BQ = max(16, min(ACC_ELEMENTS // D, triton.next_power_of_2(GQ)))
    QB = triton.cdiv(GQ, BQ)
    BT, warps = page_tile(D, G, N)
    S = num_splits(B * Hkv * QB, q.device)
    # the regions are views of one cache tensor: the same page strides in elements of their own dtype
    if _strides(k_codes) != _strides(v_codes) or not (
        _strides(k_scale) == _strides(k_mn) == _strides(v_scale) == _strides(v_mn)
    ):
        raise ValueError("paged_attention: the regions must be views of one paged cache tensor")
    acc = torch.empty(B, Hkv, S, QB * BQ, D, dtype=torch.float32, device=q.device)
    m = torch.empty(B, Hkv, S, QB * BQ, dtype=torch.float32, device=q.device)
    l = torch.empty_like(m)
    dot_fp32 = q.dtype == torch.float32 or os.environ.get("TRITON_INTERPRET") == "1"
    with torch.device(q.device):
        _paged_attention_kernel[(B * QB, Hkv, S)](
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
            ctx_lens,
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
            QB=QB,
            BT=BT,
            SOFTCAP=softcap > 0,
            DOT_FP32=dot_fp32,
            num_warps=warps,
        )
    # merge the splits: out = sum_s e^(m_s - M) acc_s / sum_s e^(m_s - M) l_s; an empty row gives 0, lse -inf
    mx = m.amax(2, keepdim=True)
    safe = torch.where(mx == float("-inf"), 0.0, mx)
    w = torch.exp(m - safe)  # [B, Hkv, S, rows]
    total = (w * l).sum(2)  # [B, Hkv, rows]
    out = (w[..., None] * acc).sum(2) / total.clamp_min(1e-30)[..., None]
    lse = safe[:, :, 0] + torch.log(total)
    shape = (B, Hq, M)
    return out[:, :, :GQ].reshape(*shape, D).to(q.dtype), lse[:, :, :GQ].reshape(shape)


def paged_decode_attention(q, *regions_and_rest):
    """Triton launcher of ``minikv::paged_decode_attention``: :func:`paged_attention` with ``M = 1``."""
    *regions, block_table, seq_lens, scale, softcap, k_bits, v_bits, group_size = regions_and_rest
    out, _ = paged_attention(
        q[:, :, None], *regions, block_table, seq_lens, seq_lens, scale, softcap, k_bits, v_bits, group_size
    )
    return out[:, :, 0]

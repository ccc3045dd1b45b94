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

from . import paged_reference
from .triton_decode import _online_update, _sm_count, _softcapped, tile

MAX_SPLITS = 16  # the scratch per call is [B, Hkv, S, rows, D] fp32
ACC_ELEMENTS = 4096  # query rows per program x head_dim: 64 rows at D 64 ... 16 at D 256 (a chunk's rows take
# several programs; `python benchmarks/aot_check.py`: 64 rows at D 128 spill on sm_80)


@triton.jit
def _per_token(
    codes_ptr,
    sc_ptr,
    mn_ptr,
    w_page,
    h_page,
    slot,
    ok,
    BITS: tl.constexpr,
    G: tl.constexpr,
    D: tl.constexpr,
    MASKED: tl.constexpr,
):
    """Tokens ``slot [BT]`` of a page quantized per token (values; keys with ``keys_per_token``): ``[BT, D]``
    fp32 from ``D * BITS / 32`` words and ``D / G`` scales and minimums per token."""
    PW: tl.constexpr = 32 // BITS
    W: tl.constexpr = D // PW
    DG: tl.constexpr = D // G
    word = tl.arange(0, W)
    grp = tl.arange(0, DG)
    shift = tl.arange(0, PW) * BITS
    off = h_page + slot[:, None] * DG + grp[None, :]
    if MASKED:
        w = tl.load(codes_ptr + w_page + slot[:, None] * W + word[None, :], mask=ok[:, None], other=0)
        sc = tl.load(sc_ptr + off, mask=ok[:, None], other=0.0).to(tl.float32)
        mn = tl.load(mn_ptr + off, mask=ok[:, None], other=0.0).to(tl.float32)
    else:  # whole tiles of a page: in bounds; slots past the sequence are masked by the caller
        w = tl.load(codes_ptr + w_page + slot[:, None] * W + word[None, :])
        sc = tl.load(sc_ptr + off).to(tl.float32)
        mn = tl.load(mn_ptr + off).to(tl.float32)
    BT: tl.constexpr = slot.shape[0]
    x = tl.reshape((w[:, :, None] >> shift[None, None, :]) & ((1 << BITS) - 1), [BT, DG, G])
    return tl.reshape(x.to(tl.float32) * sc[:, :, None] + mn[:, :, None], [BT, D])


@triton.jit
def _per_channel_keys(
    kc_ptr, ks_ptr, km_ptr, w_page, h_page, o, K_BITS: tl.constexpr, G: tl.constexpr, D: tl.constexpr, BT: tl.constexpr
):
    """Keys of slots ``o .. o + BT`` quantized per channel over G tokens (word-major): ``[D, BT]`` fp32 from
    word rows ``o / KPW ..`` of D channels and a scale and minimum per G tokens per channel."""
    KPW: tl.constexpr = 32 // K_BITS
    KW: tl.constexpr = BT // KPW
    TG: tl.constexpr = BT // G
    d = tl.arange(0, D)
    kword = tl.arange(0, KW)
    tgrp = tl.arange(0, TG)
    kshift = tl.arange(0, KPW) * K_BITS
    kw = tl.load(kc_ptr + w_page + (o // KPW + kword)[None, :] * D + d[:, None])
    kq = tl.reshape((kw[:, :, None] >> kshift[None, None, :]) & ((1 << K_BITS) - 1), [D, TG, G])
    kg = h_page + (o // G + tgrp)[None, :] * D + d[:, None]
    ksc = tl.load(ks_ptr + kg).to(tl.float32)
    kmn = tl.load(km_ptr + kg).to(tl.float32)
    return tl.reshape(kq.to(tl.float32) * ksc[:, :, None] + kmn[:, :, None], [D, BT])


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
    KEYS_PER_TOKEN: tl.constexpr,
):
    pid = tl.program_id(0)
    b = pid // QB
    qb = pid % QB
    h = tl.program_id(1)
    split = tl.program_id(2)
    n_splits = tl.num_programs(2)
    Hkv = tl.num_programs(1)
    L = tl.load(sl_ptr + b)
    ctx = tl.minimum(tl.load(cl_ptr + b), L)  # the rows see tokens [0, ctx)
    if KEYS_PER_TOKEN:  # every stored token is coded
        n_packed = L
    else:  # tokens in complete key groups; the open group's keys are in its page's residual
        n_packed = L // G * G
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

    for ti in range(lo, hi):  # packed tiles: every word, scale and minimum of the tile loaded once, unmasked
        t0 = ti * BT
        page = tl.load(bt_ptr + b * bt_stride + t0 // N).to(tl.int64)
        o = t0 % N  # the tile's first slot in its page
        t = t0 + tok
        t_ok = t < packed_seen  # a page's slots past the sequence hold anything: masked after the loads
        w_page = page * w_block + h * w_head
        h_page = page * h_block + h * h_head
        slot = o + tok
        if KEYS_PER_TOKEN:
            k = tl.trans(_per_token(kc_ptr, ks_ptr, km_ptr, w_page, h_page, slot, t_ok, K_BITS, G, D, False))
        else:
            k = _per_channel_keys(kc_ptr, ks_ptr, km_ptr, w_page, h_page, o, K_BITS, G, D, BT)
        s = tl.dot(q, k.to(dot_dtype), input_precision="ieee") * scale
        s = _softcapped(s, softcap, SOFTCAP)
        p, alpha, m, l = _online_update(s, row_ok[:, None] & t_ok[None, :], m, l)
        v = _per_token(vc_ptr, vs_ptr, vm_ptr, w_page, h_page, slot, t_ok, V_BITS, G, D, False)
        v = tl.where(t_ok[:, None], v, 0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(dot_dtype), v.to(dot_dtype), input_precision="ieee")
    if not KEYS_PER_TOKEN:
        if split == n_splits - 1:  # the open group (< G tokens): keys from the page's residual, values from codes
            r = tl.arange(0, G)
            r_ok = r < ctx - n_packed
            page = tl.load(bt_ptr + b * bt_stride + n_packed // N, mask=ctx > n_packed, other=0).to(tl.int64)
            k = tl.load(
                kr_ptr + page * r_block + h * r_head + r[None, :] * D + d[:, None], mask=r_ok[None, :], other=0.0
            )
            s = tl.dot(q, k.to(dot_dtype), input_precision="ieee") * scale
            s = _softcapped(s, softcap, SOFTCAP)
            p, alpha, m, l = _online_update(s, row_ok[:, None] & r_ok[None, :], m, l)
            w_page = page * w_block + h * w_head
            h_page = page * h_block + h * h_head
            v = _per_token(vc_ptr, vs_ptr, vm_ptr, w_page, h_page, n_packed % N + r, r_ok, V_BITS, G, D, True)
            acc = acc * alpha[:, None] + tl.dot(p.to(dot_dtype), v.to(dot_dtype), input_precision="ieee")
    out = ((b * Hkv + h) * n_splits + split) * (QB * BQ)  # rows already count the block's offset
    tl.store(acc_ptr + (out + rows[:, None]) * D + d[None, :], acc)
    tl.store(m_ptr + out + rows, m)
    tl.store(l_ptr + out + rows, l)


def page_tile(head_dim: int, group_size: int, block_size: int) -> tuple[int, int]:
    """(tokens per tile, warps): the decode kernel's tile, halved until it divides the block size (per-token
    keys: down to 16 tokens, below a group; per-channel keys: a multiple of G, since G divides the block)."""
    bt, warps = tile(head_dim, group_size)
    while block_size % bt and bt > 16:
        bt //= 2
    if block_size % bt:
        raise ValueError(f"paged attention: block size {block_size} must be a multiple of 16")
    return bt, warps


@triton.jit
def _merge_splits_kernel(acc_ptr, m_ptr, l_ptr, out_ptr, lse_ptr, S, ROWS, GQ, D: tl.constexpr, BS: tl.constexpr):
    """One (sequence, KV head, row): ``out = sum_s e^(m_s - M) acc_s / sum_s e^(m_s - M) l_s`` and
    ``lse = M + log(sum_s e^(m_s - M) l_s)``, written to the row's place in ``[B, Hq, M, D]`` (rows past
    the group are padding: skipped); a row no split saw gives zeros and ``-inf``."""
    bh = tl.program_id(0)
    r = tl.program_id(1)
    if r < GQ:
        s = tl.arange(0, BS)
        s_ok = s < S
        base = bh * S * ROWS + s * ROWS + r
        m = tl.load(m_ptr + base, mask=s_ok, other=float("-inf"))
        l = tl.load(l_ptr + base, mask=s_ok, other=0.0)
        top = tl.max(m, axis=0)
        safe = tl.where(top == float("-inf"), 0.0, top)
        w = tl.exp(m - safe)
        total = tl.sum(w * l, axis=0)
        d = tl.arange(0, D)
        acc = tl.load(acc_ptr + base[:, None] * D + d[None, :], mask=s_ok[:, None], other=0.0)
        out = tl.sum(w[:, None] * acc, axis=0) / tl.maximum(total, 1e-30)
        tl.store(out_ptr + (bh * GQ + r) * D + d, out.to(out_ptr.dtype.element_ty))
        tl.store(lse_ptr + bh * GQ + r, safe + tl.log(total))


_WORKSPACE: dict = {}  # device -> fp32 buffer for the splits' partials, grown by reserve() before capture


def workspace_floats(batch: int, kv_heads: int, q_heads: int, head_dim: int, queries: int, device) -> int:
    """Floats of the splits' partials ``acc [B, Hkv, S, rows, D]``, ``m`` and ``l`` of one call."""
    GQ = q_heads // kv_heads * queries
    BQ = max(16, min(ACC_ELEMENTS // head_dim, triton.next_power_of_2(GQ)))
    rows = triton.cdiv(GQ, BQ) * BQ
    S = num_splits(batch * kv_heads * triton.cdiv(GQ, BQ), torch.device(device))
    return batch * kv_heads * S * rows * (head_dim + 2)


def reserve(batch: int, kv_heads: int, q_heads: int, head_dim: int, device, queries: int = 1) -> None:
    """Allocate (once, before CUDA-graph capture: the builder calls it) the workspace a call of up to
    ``batch`` sequences needs, so that every captured call reads and writes the same memory."""
    need = workspace_floats(batch, kv_heads, q_heads, head_dim, queries, device)
    key = str(torch.device(device))
    if key not in _WORKSPACE or _WORKSPACE[key].numel() < need:
        _WORKSPACE[key] = torch.empty(need, dtype=torch.float32, device=device)


def _scratch(device, floats: int) -> torch.Tensor:
    """``floats`` of the persistent workspace (grown outside capture if a call needs more than reserved)."""
    key = str(device)
    if key not in _WORKSPACE or _WORKSPACE[key].numel() < floats:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(
                "minikv paged attention: the workspace must be reserved before CUDA-graph capture "
                f"(needs {floats} floats, has {_WORKSPACE[key].numel() if key in _WORKSPACE else 0})"
            )
        _WORKSPACE[key] = torch.empty(floats, dtype=torch.float32, device=device)
    return _WORKSPACE[key][:floats]


def num_splits(rows: int, device: torch.device) -> int:
    """Splits per (sequence, KV head): enough programs to fill the GPU (2 per SM), from the batch shape
    alone (fixed per captured batch size); two on the interpreter (the merge is exercised)."""
    if device.type != "cuda":
        return 2
    sms = _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return max(1, min(MAX_SPLITS, triton.cdiv(2 * sms, rows)))


def _strides(x: torch.Tensor) -> tuple[int, int]:
    """(block, KV head) strides; a single head's stride is never used (and a view may give it any value),
    nor an empty region's (per-token keys have no residual)."""
    if x.numel() == 0:
        return 0, 0
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
    keys_per_token: bool = False,
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
    R = QB * BQ
    work = _scratch(q.device, B * Hkv * S * R * (D + 2))  # persistent: no allocation per step
    acc = work[: B * Hkv * S * R * D]
    m = work[B * Hkv * S * R * D :][: B * Hkv * S * R]
    l = work[B * Hkv * S * R * (D + 1) :]
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
            KEYS_PER_TOKEN=keys_per_token,
            num_warps=warps,
        )
    out = torch.empty(B, Hq, M, D, dtype=q.dtype, device=q.device)
    lse = torch.empty(B, Hq, M, dtype=torch.float32, device=q.device)
    with torch.device(q.device):
        _merge_splits_kernel[(B * Hkv, R)](acc, m, l, out, lse, S, R, GQ, D=D, BS=triton.next_power_of_2(S))
    return out, lse


paged_decode_attention = paged_reference.decode_of(paged_attention)  # the Triton launcher of the decode op

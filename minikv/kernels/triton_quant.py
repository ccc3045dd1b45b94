"""Triton quantize + pack, bit-exact with ``quant.quantize_pack`` (the reference).

One program quantizes ``GROUPS`` consecutive groups of one row of ``x [M, N]`` (any strides: keys
are passed transposed). The arithmetic repeats the reference's fp32 operations in the same order:
min/max, min rounded down and scale rounded up to fp16, ``(x - mn) * (1 / scale)`` with
correctly rounded divisions (``div_rn``; plain ``/`` is approximate on GPUs), round half to even,
no FMA contraction (``enable_fp_fusion=False``), and the same clip-ratio search.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..config import CLIP_GRID
from .quant import META_DTYPE, clip_table


@triton.jit
def _fp16_neighbour(x, UP: tl.constexpr):
    """fp32 ``x`` -> the fp16 value nearest to it on the side ``UP`` (above) or below."""
    y = x.to(tl.float16)
    yf = y.to(tl.float32)
    b = y.to(tl.int16, bitcast=True)
    positive = yf > 0
    if UP:
        bad = yf < x
        step = tl.where(positive, b + 1, b - 1)
        step = tl.where(yf == 0, 1, step)
    else:
        bad = yf > x
        step = tl.where(positive, b - 1, b + 1)
        step = tl.where(yf == 0, -32767, step)  # 0x8001: the smallest negative subnormal
    out = tl.where(bad, step.to(tl.int16), b)
    return out.to(tl.float16, bitcast=True)


@triton.jit
def _round_half_even(v):
    r = tl.floor(v + 0.5)
    tie = (r - v) == 0.5
    odd = (r - 2.0 * tl.floor(r * 0.5)) == 1.0
    return tl.where(tie & odd, r - 1.0, r)


@triton.jit
def _codes(x, lo, span, QMAX: tl.constexpr):
    """Float codes ``[GROUPS, G]`` and the fp16 scale for groups starting at ``lo`` (fp16) spanning ``span``."""
    scale = tl.math.div_rn(span, QMAX * 1.0)
    scale = _fp16_neighbour(tl.maximum(scale, 5.960464477539063e-08), True)  # >= 2**-24
    inv = tl.math.div_rn(tl.full(span.shape, 1.0, tl.float32), scale.to(tl.float32))
    v = (x - lo.to(tl.float32)[:, None]) * inv[:, None]
    return tl.minimum(tl.maximum(_round_half_even(v), 0.0), QMAX * 1.0), scale


@triton.jit
def _squared_error(x, q, scale, lo):
    """``sum (x - (q * scale + lo))**2`` per group in fp64 (exact squares of fp32 differences)."""
    recon = q * scale.to(tl.float32)[:, None] + lo.to(tl.float32)[:, None]
    e = (x - recon).to(tl.float64)
    return tl.sum(e * e, axis=1)


@triton.jit
def quantize_groups(x, clip_ptr, BITS: tl.constexpr, G: tl.constexpr, N_CLIP: tl.constexpr):
    """fp32 groups ``x [GROUPS, G]`` -> int32 codes ``[GROUPS, G]``, fp16 scale and minimum ``[GROUPS]``,
    as the reference computes them (N_CLIP = 1: min-max; else the clip-ratio search of ``clip_ptr``'s
    (ratio, (1 - ratio) / 2) fp32 pairs). A group holding a non-finite value gets codes 0."""
    QMAX: tl.constexpr = (1 << BITS) - 1
    finite = tl.sum(((x == x) & (tl.abs(x) != float("inf"))).to(tl.int32), axis=1) == G
    low = _fp16_neighbour(tl.min(x, axis=1), False)  # [GROUPS] fp16
    span = tl.max(x, axis=1) - low.to(tl.float32)
    q, scale = _codes(x, low, span, QMAX)
    mn = low
    if N_CLIP > 1:
        best = _squared_error(x, q, scale, mn)
        for i in tl.static_range(1, N_CLIP):
            ratio = tl.load(clip_ptr + 2 * i)
            half = tl.load(clip_ptr + 2 * i + 1)
            lo = _fp16_neighbour(low.to(tl.float32) + span * half, False)
            q_c, scale_c = _codes(x, lo, span * ratio, QMAX)
            err = _squared_error(x, q_c, scale_c, lo)
            better = err < best  # NaN (a non-finite group) never wins: min-max stays
            q = tl.where(better[:, None], q_c, q)
            scale = tl.where(better, scale_c, scale)
            mn = tl.where(better, lo, mn)
            best = tl.where(better, err, best)
    return tl.where(finite[:, None], q.to(tl.int32), 0), scale, mn


@triton.jit
def pack_words(q, N: tl.constexpr, BITS: tl.constexpr):
    """int32 codes (N of them, any shape) -> ``[N * BITS // 32]`` words: element j of each run of
    ``32 // BITS`` sits at bits ``[BITS*j, BITS*(j+1))`` of its word."""
    PER_WORD: tl.constexpr = 32 // BITS
    q = tl.reshape(q, [N // PER_WORD, PER_WORD])
    shifts = tl.arange(0, PER_WORD) * BITS
    return tl.sum(q << shifts[None, :], axis=1)  # disjoint bits: the sum is the OR


@triton.jit
def _quantize_pack_kernel(
    x_ptr,
    codes_ptr,
    scale_ptr,
    mn_ptr,
    clip_ptr,
    N,
    stride_xm,
    stride_xn,
    BITS: tl.constexpr,
    G: tl.constexpr,
    GROUPS: tl.constexpr,
    N_CLIP: tl.constexpr,
):
    # BITS, G, GROUPS are constexpr: they fix the tile shapes [GROUPS, G] and the unrolled packing;
    # N_CLIP (1 = no clipping) unrolls the clip-ratio search
    PER_WORD: tl.constexpr = 32 // BITS
    row = tl.program_id(0)
    g0 = tl.program_id(1) * GROUPS
    grp = g0 + tl.arange(0, GROUPS)  # [GROUPS]
    col = grp[:, None] * G + tl.arange(0, G)[None, :]  # [GROUPS, G]
    ok = grp < N // G
    x = tl.load(x_ptr + row * stride_xm + col * stride_xn, mask=ok[:, None], other=0.0).to(tl.float32)
    q, scale, mn = quantize_groups(x, clip_ptr, BITS, G, N_CLIP)
    words = pack_words(q, GROUPS * G, BITS)
    widx = g0 * (G // PER_WORD) + tl.arange(0, GROUPS * G // PER_WORD)
    tl.store(codes_ptr + row * (N // PER_WORD) + widx, words, mask=widx < N // PER_WORD)
    tl.store(scale_ptr + row * (N // G) + grp, scale, mask=ok)
    tl.store(mn_ptr + row * (N // G) + grp, mn, mask=ok)


def quantize_pack(x: torch.Tensor, bits: int, group_size: int, clip: bool = False):
    """Triton launcher of ``minikv::quantize_pack`` (same contract as the reference)."""
    *lead, n = x.shape
    x2 = x.reshape(-1, n) if x.dim() != 2 else x  # a view whenever the strides allow
    M = x2.shape[0]
    codes = torch.empty((M, n * bits // 32), dtype=torch.int32, device=x.device)
    scale = torch.empty((M, n // group_size), dtype=META_DTYPE, device=x.device)
    mn = torch.empty_like(scale)
    groups = max(1, min(triton.next_power_of_2(n // group_size), max(1, 256 // group_size)))
    grid = (M, triton.cdiv(n // group_size, groups))
    if M and n:
        with torch.device(x.device):
            # no FMA contraction: the codes must follow the reference's fp32 roundings exactly
            _quantize_pack_kernel[grid](
                x2,
                codes,
                scale,
                mn,
                clip_table(x.device),
                n,
                x2.stride(0),
                x2.stride(1),
                BITS=bits,
                G=group_size,
                GROUPS=groups,
                N_CLIP=len(CLIP_GRID) if clip else 1,
                enable_fp_fusion=False,
            )
    return codes.view(*lead, -1), scale.view(*lead, -1), mn.view(*lead, -1)

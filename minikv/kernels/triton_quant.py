"""Triton quantize + pack, bit-exact with ``quant.quantize_pack`` (the reference).

One program quantizes ``GROUPS`` consecutive groups of one row of ``x [M, N]`` (any strides: keys
are passed transposed). The arithmetic repeats the reference's fp32 operations in the same order:
min/max, min rounded down and scale rounded up to fp16, ``(x - mn) * (1 / scale)`` with
correctly rounded divisions (``div_rn``; plain ``/`` is approximate on GPUs), round half to even.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .quant import META_DTYPE


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
def _quantize_pack_kernel(
    x_ptr, codes_ptr, scale_ptr, mn_ptr,
    N, stride_xm, stride_xn,
    BITS: tl.constexpr, G: tl.constexpr, GROUPS: tl.constexpr,
):
    # BITS, G, GROUPS are constexpr: they fix the tile shapes [GROUPS, G] and the unrolled packing
    PER_WORD: tl.constexpr = 32 // BITS
    QMAX: tl.constexpr = (1 << BITS) - 1
    row = tl.program_id(0)
    g0 = tl.program_id(1) * GROUPS
    grp = g0 + tl.arange(0, GROUPS)  # [GROUPS]
    col = grp[:, None] * G + tl.arange(0, G)[None, :]  # [GROUPS, G]
    ok = grp < N // G
    x = tl.load(x_ptr + row * stride_xm + col * stride_xn, mask=ok[:, None], other=0.0).to(tl.float32)
    finite = tl.sum(((x == x) & (tl.abs(x) != float("inf"))).to(tl.int32), axis=1) == G
    mn = _fp16_neighbour(tl.min(x, axis=1), False)  # [GROUPS] fp16
    mx = tl.max(x, axis=1)
    scale = tl.math.div_rn(mx - mn.to(tl.float32), QMAX * 1.0)
    scale = _fp16_neighbour(tl.maximum(scale, 5.960464477539063e-08), True)  # >= 2**-24
    inv = tl.math.div_rn(tl.full([GROUPS], 1.0, tl.float32), scale.to(tl.float32))
    v = (x - mn.to(tl.float32)[:, None]) * inv[:, None]
    q = tl.minimum(tl.maximum(_round_half_even(v), 0.0), QMAX * 1.0).to(tl.int32)
    q = tl.where(finite[:, None], q, 0)
    # pack: element j of each run of PER_WORD sits at bits [BITS*j, BITS*(j+1)) of its word
    q = tl.reshape(q, [GROUPS * G // PER_WORD, PER_WORD])
    shifts = tl.arange(0, PER_WORD) * BITS
    words = tl.sum(q << shifts[None, :], axis=1)  # disjoint bits: the sum is the OR
    widx = g0 * (G // PER_WORD) + tl.arange(0, GROUPS * G // PER_WORD)
    tl.store(codes_ptr + row * (N // PER_WORD) + widx, words, mask=widx < N // PER_WORD)
    tl.store(scale_ptr + row * (N // G) + grp, scale, mask=ok)
    tl.store(mn_ptr + row * (N // G) + grp, mn, mask=ok)


def quantize_pack(x: torch.Tensor, bits: int, group_size: int):
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
            _quantize_pack_kernel[grid](x2, codes, scale, mn, n, x2.stride(0), x2.stride(1),
                                        BITS=bits, G=group_size, GROUPS=groups)
    return codes.view(*lead, -1), scale.view(*lead, -1), mn.view(*lead, -1)

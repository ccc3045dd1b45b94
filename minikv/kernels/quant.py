"""Reference 2/4-bit grouped asymmetric quantization and int32 bit packing (pure PyTorch).

Scheme (KIVI, kept by MiniKV): along the last axis, groups of G elements share an fp16
``scale`` and an fp16 minimum ``mn``; ``q = round((x - mn) / scale)`` in [0, 2**bits - 1] and
``x_hat = q * scale + mn``. This is torchao's affine quantization in the *float* zero-point
domain (tinygemm's ``zero_point = mn + scale * mid``). We express it with torchao's public
INT-domain primitives applied to ``x - mn`` with a zero point of 0, which performs exactly
``clamp(round((x - mn) * (1 / scale)), 0, qmax)`` and its inverse ``q * scale``; the shift by the
minimum is the only arithmetic done here. The Triton kernels reproduce these fp32 operations in
the same order, so codes and metadata match bit for bit.

Packing: ``32 // bits`` codes per int32 word along the last axis, little-endian: element ``j`` of
a run sits at bits ``[bits*j, bits*(j+1))`` (KIVI's layout, so torchao's uint2/uint4 codes of a
group of 16 (8) elements become one word; a group of G spans G*bits/32 words).

Guards: ``scale`` is rounded *up* to fp16 and ``mn`` *down*, so every code is within range and
every element is within ``scale / 2`` of its reconstruction; a constant group gets the smallest
positive scale and round-trips exactly; a non-finite element poisons only its own group (its
codes are zeroed and masked before packing so they cannot spill into neighbouring codes).
"""

from __future__ import annotations

import contextlib
import functools
import logging

import torch

from ..config import CLIP_GRID

META_DTYPE = torch.float16
_TINY = torch.finfo(torch.float16).smallest_normal * 2.0**-10  # smallest fp16 subnormal, 2**-24


@contextlib.contextmanager
def _quiet_torchao():
    """Silence torchao's import-time messages (optional CUDA libraries it cannot load here, torch's
    pytree notices about its enums): they say nothing about minikv's work."""
    loggers = [logging.getLogger(name) for name in ("torchao", "torch.utils._pytree")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


@functools.cache
def _torchao():
    """torchao's affine primitives, imported on first use (torchao imports triton) and quietly."""
    with _quiet_torchao():
        from torchao.quantization import quant_primitives
    return quant_primitives


def import_torchao_quietly() -> None:
    """Import torchao and the transformers module that loads its extras when a model is built, so
    that loading a model later prints none of their import-time messages."""
    with _quiet_torchao():
        _torchao()
        try:
            import transformers.integrations.torchao  # noqa: F401
        except ImportError:  # an older transformers without it: nothing to pre-import
            pass


def _round_to_fp16(x: torch.Tensor, up: bool) -> torch.Tensor:
    """Round fp32 ``x`` to the fp16 neighbour above (``up``) or below it."""
    y = x.to(META_DTYPE)
    yf = y.float()
    bad = (yf < x) if up else (yf > x)
    step = torch.full_like(y, float("inf") if up else float("-inf"))
    return torch.where(bad, torch.nextafter(y, step), y)


def quantize_pack(x: torch.Tensor, bits: int, group_size: int, clip: bool = False):
    """Quantize ``x[..., N]`` along its last axis in groups of ``group_size`` and pack the codes.

    Returns ``codes [..., N * bits // 32]`` int32, ``scale`` and ``mn [..., N // group_size]`` fp16.
    ``clip``: per group, the range is shrunk around its centre by the ratio of :data:`CLIP_GRID`
    whose reconstruction has the smallest squared error (ratio 1.0, plain min-max, wins ties, so a
    clipped group never reconstructs worse). Errors are summed in fp64 from exact squares of fp32
    differences, so the choice does not depend on the order of the sum for all practical purposes;
    a group whose error is NaN (non-finite elements) keeps min-max.
    """
    *lead, n = x.shape
    qmax = 2**bits - 1
    xg = x.float().reshape(*lead, n // group_size, group_size)  # [..., N/G, G]
    finite = torch.isfinite(xg).all(-1)
    mn = _round_to_fp16(xg.amin(-1), up=False)  # [..., N/G]
    span = xg.amax(-1) - mn.float()
    if clip:  # every ratio at once, along a leading candidate axis; ratio 1.0 first
        ratio, half = clip_table(x.device).unbind(-1)
        shape = (-1,) + (1,) * span.dim()
        lo = _round_to_fp16(mn.float() + span * half.reshape(shape), up=False)  # [K, ..., N/G]
        lo[0] = mn  # (mn + span * 0.0 == mn: the min-max candidate, exactly)
        q, scale = _codes(xg.expand(len(CLIP_GRID), *xg.shape), lo, span * ratio.reshape(shape), qmax)
        err = _squared_error(xg, q, scale, lo).nan_to_num(nan=float("inf"))
        best = err.argmin(0, keepdim=True)  # the first of equal minima: min-max wins ties
        q = q.gather(0, best.unsqueeze(-1).expand(1, *q.shape[1:]))[0]
        scale, mn = scale.gather(0, best)[0], lo.gather(0, best)[0]
    else:
        q, scale = _codes(xg, mn, span, qmax)
    q = torch.where(finite.unsqueeze(-1), q.to(torch.int32), 0) & qmax
    return pack(q.reshape(*lead, n), bits), scale, mn


@functools.cache
def clip_table(device: torch.device) -> torch.Tensor:
    """``[len(CLIP_GRID), 2]`` fp32: each clip ratio and half the range it cuts, ``(1 - ratio) / 2``.

    Built once per device (the decode step's flush quantizes every step) and shared with the Triton
    kernel, so both apply the same fp32 constants.
    """
    return torch.tensor([(r, 0.5 * (1.0 - r)) for r in CLIP_GRID], dtype=torch.float32, device=device)


def _codes(xg, mn, span, qmax: int):
    """Codes ``[..., N/G, G]`` (uint8) and the fp16 scale for groups starting at ``mn`` spanning ``span``."""
    scale = _round_to_fp16((span / qmax).clamp_min(_TINY), up=True)
    shifted = xg - mn.float().unsqueeze(-1)
    block = (1,) * (shifted.dim() - 1) + (xg.shape[-1],)
    zero = torch.zeros_like(scale, dtype=torch.int32)
    return _torchao().quantize_affine(shifted, block, scale.float(), zero, torch.uint8, 0, qmax), scale


def _squared_error(xg, q, scale, mn) -> torch.Tensor:
    """``sum (x - (q * scale + mn))**2`` per group, in fp64 (the fp32 differences square exactly)."""
    recon = q.float() * scale.float().unsqueeze(-1) + mn.float().unsqueeze(-1)
    return (xg - recon).double().square().sum(-1)


def unpack_dequantize(codes, scale, mn, bits: int, group_size: int, dtype: torch.dtype) -> torch.Tensor:
    """Inverse of :func:`quantize_pack`: ``codes [..., W]`` -> ``x_hat [..., W * 32 // bits]`` in ``dtype``."""
    q = unpack(codes, bits).to(torch.uint8)  # [..., N]
    *lead, n = q.shape
    block = (1,) * (len(lead) + 1) + (group_size,)
    qg = q.reshape(*lead, n // group_size, group_size)
    zero = torch.zeros_like(scale, dtype=torch.int32)
    deq = _torchao().dequantize_affine(
        qg, block, scale.float(), zero, torch.uint8, 0, 2**bits - 1, output_dtype=torch.float32
    )
    return (deq + mn.float().unsqueeze(-1)).reshape(*lead, n).to(dtype)


def pack(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes ``q[..., N]`` (values < 2**bits) into int32 words ``[..., N * bits // 32]``."""
    per_word = 32 // bits
    *lead, n = q.shape
    shifts = torch.arange(per_word, device=q.device, dtype=torch.int64) * bits
    words = (q.to(torch.int64).reshape(*lead, n // per_word, per_word) << shifts).sum(-1)
    # bit 31 set -> wrap into the negative int32 range (two's complement)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def unpack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of :func:`pack`: int32 words ``[..., W]`` -> int32 codes ``[..., W * 32 // bits]``."""
    per_word = 32 // bits
    shifts = torch.arange(per_word, device=codes.device, dtype=torch.int32) * bits
    q = (codes.unsqueeze(-1) >> shifts) & (2**bits - 1)  # [..., W, per_word]
    return q.reshape(*codes.shape[:-1], codes.shape[-1] * per_word)

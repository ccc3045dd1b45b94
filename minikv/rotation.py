"""A fixed orthonormal rotation of each head's channels: Hadamard with fixed signs.

A head_dim that is not a power of two (Phi-3's 96) gets a block-diagonal Hadamard over its largest
power-of-two blocks (3 x 32).

Rotating values (per token) before quantization spreads an outlier channel over all channels, so
one group's range no longer follows it (QuaRot, RotateKV). The rotation is undone exactly in
attention: with ``R`` orthonormal, ``softmax(q R (k R)^T) (v R) R^T = softmax(q k^T) v``.
"""

from __future__ import annotations

import functools

import torch

SIGN_SEED = 0  # the signs are fixed once: the same rotation for every layer, head and run


@functools.cache
def _matrix(D: int) -> torch.Tensor:
    block = D & -D  # the largest power of two dividing D: the whole head when D is one (64, 128, 256)
    if block < 2:
        raise ValueError(f"a Hadamard rotation needs an even head_dim, got {D}")
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < block:  # Sylvester: H_2n = [[H, H], [H, -H]]
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    h = torch.block_diag(*[h] * (D // block)) / block**0.5  # D = 96: three 32-channel blocks
    gen = torch.Generator().manual_seed(SIGN_SEED)
    signs = torch.randint(0, 2, (D,), generator=gen).double() * 2 - 1
    return signs[:, None] * h  # diag(signs) H: orthonormal


def hadamard(D: int, device=None) -> torch.Tensor:
    """The ``[D, D]`` fp32 rotation (rows: input channels); ``R @ R.T == I``."""
    return _matrix(D).to(device=device, dtype=torch.float32)


def rotate(x: torch.Tensor, R: torch.Tensor | None) -> torch.Tensor:
    """``x [..., D] @ R`` in fp32, back in x's dtype (``R=None``: ``x`` unchanged)."""
    return x if R is None else (x.float() @ R).to(x.dtype)


def unrotate(x: torch.Tensor, R: torch.Tensor | None) -> torch.Tensor:
    """Inverse of :func:`rotate`: ``x @ R.T``."""
    return x if R is None else (x.float() @ R.T).to(x.dtype)

"""The low-precision tier of MiKV: tokens that lose the selection kept at 1-2 bits instead of dropped.

MiKV (Yang et al. 2024, "No Token Left Behind") keeps the evicted tokens at a lower precision so that
attention can still reach them. Here they go to a store of their own, quantized like the main store
(keys per channel over groups of ``G`` tokens, values per token over groups of ``G`` channels, the
same rotation) at ``evicted_bits``, with no sinks, no residual and no appends: a partial last group is
padded by repeating its last token (min/max unchanged; the padding slots are masked and counted in
the bytes). Attention reads both tiers dequantized (:meth:`dense`): a measurement tier (the fused
decode kernel does not read it).
"""

from __future__ import annotations

import torch

from .kernels import quant
from .rotation import rotate, unrotate
from .store import packed_token_bytes, round_up


class EvictedStore:
    """Tokens ``[B, H, n, D]`` packed at ``bits`` in groups of ``group``; the same count per sequence's heads."""

    def __init__(self, bits: int, group: int, clip: bool, rot_k, rot_v, dtype):
        self.bits, self.group, self.clip = bits, group, clip
        self.rot_k, self.rot_v, self.dtype = rot_k, rot_v, dtype
        self.parts: list[tuple] = []  # (k codes/scale/mn, v codes/scale/mn, valid [B, n]) per write
        self._padded = 0  # slots packed per sequence, padding included

    def write(self, k: torch.Tensor, v: torch.Tensor, counts: torch.Tensor) -> None:
        """Add ``k/v [B, H, N, D]`` whose first ``counts[b]`` tokens are real (temporal order)."""
        B, H, N, D = k.shape
        if N == 0:
            return
        G = self.group
        n = round_up(N, G)
        last = (counts - 1).clamp_min(0)[:, None]  # [B, 1]: the last real token of each sequence
        slot = torch.arange(n, device=k.device)[None]
        take = torch.where(slot < counts[:, None], slot.clamp_max(N - 1), last)[:, None, :, None].expand(B, H, n, D)
        k, v = rotate(k, self.rot_k).gather(2, take), rotate(v, self.rot_v).gather(2, take)
        kq = quant.quantize_pack(k.transpose(-1, -2), self.bits, G, self.clip)  # per channel over G tokens
        vq = quant.quantize_pack(v, self.bits, G, self.clip)  # per token over G channels
        self.parts.append((kq, vq, slot < counts[:, None]))
        self._padded += n

    def dense(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """``(k, v [B, H, n, D], valid [B, n])`` dequantized and rotated back; ``None`` when empty."""
        if not self.parts:
            return None
        ks, vs, valids = [], [], []
        for kq, vq, valid in self.parts:
            ks.append(quant.unpack_dequantize(*kq, self.bits, self.group, self.dtype).transpose(-1, -2))
            vs.append(quant.unpack_dequantize(*vq, self.bits, self.group, self.dtype))
            valids.append(valid)
        k, v = unrotate(torch.cat(ks, 2), self.rot_k), unrotate(torch.cat(vs, 2), self.rot_v)
        return k, v, torch.cat(valids, 1)

    def used_bytes(self) -> int:
        """Codes + fp16 scales and minimums of every packed slot (padding included), K and V."""
        if not self.parts:
            return 0
        B, H, D = self.parts[0][0][0].shape[:3]
        return B * H * self._padded * packed_token_bytes(D, self.bits, self.bits, self.group)

    def allocated_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for kq, vq, _ in self.parts for t in (*kq, *vq))

"""Static-shape token stores of one cache layer: 2/4-bit packed (+ residual) or dense.

Both hold, per sequence and KV head, the kept prompt tokens followed by the generated ones, in
temporal order, with the per-sequence fill level as a tensor. Shapes never change after
allocation, so a decode step is a fixed graph.
"""

from __future__ import annotations

import copy

import torch

from .config import MiniKVConfig
from .kernels import implementation
from .kernels.quant import META_DTYPE


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


class QuantizedStore:
    """KIVI layout, packed store of ``C`` tokens plus a full-precision residual of ``R`` tokens."""

    def __init__(self, cfg: MiniKVConfig, B: int, H: int, D: int, tokens: int, dtype, device):
        self.bits, self.group = cfg.bits, cfg.q_group_size
        self.impl = implementation(cfg.backend, torch.device(device))
        G, R, per_word = self.group, cfg.residual_length, 32 // cfg.bits
        C = round_up(max(tokens, 1), G)
        self.capacity = C
        int_kw = dict(dtype=torch.int32, device=device)
        meta_kw = dict(dtype=META_DTYPE, device=device)
        self.k_codes = torch.zeros(B, H, D, C // per_word, **int_kw)
        self.k_scale = torch.zeros(B, H, D, C // G, **meta_kw)
        self.k_mn = torch.zeros(B, H, D, C // G, **meta_kw)
        self.v_codes = torch.zeros(B, H, C, D // per_word, **int_kw)
        self.v_scale = torch.zeros(B, H, C, D // G, **meta_kw)
        self.v_mn = torch.zeros(B, H, C, D // G, **meta_kw)
        self.res_k = torch.zeros(B, H, R, D, dtype=dtype, device=device)
        self.res_v = torch.zeros(B, H, R, D, dtype=dtype, device=device)
        self.n_packed = torch.zeros(B, dtype=torch.int64, device=device)
        self.res_len = torch.zeros(B, dtype=torch.int64, device=device)

    def buffers(self) -> list[torch.Tensor]:
        return [self.k_codes, self.k_scale, self.k_mn, self.v_codes, self.v_scale, self.v_mn,
                self.n_packed, self.res_k, self.res_v, self.res_len]

    def __deepcopy__(self, memo):
        """A copy with its own buffers (the kernel namespace is shared, not copied)."""
        new = copy.copy(self)
        for name, value in vars(self).items():
            if isinstance(value, torch.Tensor):
                setattr(new, name, value.clone())
        return new

    def write_prompt(self, k: torch.Tensor, v: torch.Tensor, n_keep: torch.Tensor) -> None:
        """Store the kept prompt tokens ``k/v [B, H, N, D]`` (first ``n_keep[b]`` valid).

        Whole groups of G go to the packed store, the last ``n_keep % G`` to the residual.
        """
        G = self.group
        N = k.shape[2]
        full = (N // G) * G
        if full:
            kc, ks, km = self.impl.quantize_pack(k[:, :, :full].transpose(-1, -2), self.bits, G)  # [B, H, D, full/16]
            vc, vs, vm = self.impl.quantize_pack(v[:, :, :full], self.bits, G)  # [B, H, full, D/16]
            per_word = 32 // self.bits
            self.k_codes[..., : full // per_word] = kc
            self.k_scale[..., : full // G] = ks
            self.k_mn[..., : full // G] = km
            self.v_codes[:, :, :full] = vc
            self.v_scale[:, :, :full] = vs
            self.v_mn[:, :, :full] = vm
        packed = (n_keep // G) * G  # [B]
        self.n_packed.copy_(packed)
        self.res_len.copy_(n_keep - packed)
        # residual: tokens [packed, n_keep) of each sequence -> slots [0, n_keep - packed)
        take = (packed[:, None] + torch.arange(G, device=k.device)[None]).clamp_max(N - 1)  # [B, G]
        index = take[:, None, :, None].expand(-1, k.shape[1], -1, k.shape[3])
        self.res_k[:, :, :G] = k.gather(2, index)
        self.res_v[:, :, :G] = v.gather(2, index)

    def append(self, k: torch.Tensor, v: torch.Tensor) -> None:
        self.impl.append_kv(k, v, *self.buffers(), self.bits, self.group)

    def attend(self, q: torch.Tensor, scale: float, softcap: float) -> torch.Tensor:
        return self.impl.decode_attention(q, *self.buffers(), scale, softcap, self.bits, self.group)

    def lengths(self) -> torch.Tensor:
        return self.n_packed + self.res_len

    def used_bytes(self) -> int:
        """Bytes that represent the tokens held (codes + scales + mins, and the residual)."""
        B, H, D = self.k_codes.shape[:3]
        per_token = 2 * (D * self.bits // 8 + 2 * (D // self.group) * META_DTYPE.itemsize)  # K and V
        res_per_token = 2 * D * self.res_k.element_size()
        return int(H * (self.n_packed.sum() * per_token + self.res_len.sum() * res_per_token))

    def allocated_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.buffers())


class DenseStore:
    """Uncompressed store (``bits=16``): kept tokens in the model dtype, static capacity."""

    def __init__(self, cfg: MiniKVConfig, B: int, H: int, D: int, tokens: int, dtype, device):
        self.capacity = max(tokens, 1)
        self.k = torch.zeros(B, H, self.capacity, D, dtype=dtype, device=device)
        self.v = torch.zeros(B, H, self.capacity, D, dtype=dtype, device=device)
        self.length = torch.zeros(B, dtype=torch.int64, device=device)
        self._slots = torch.arange(self.capacity, device=device)  # built once, not per token

    def buffers(self) -> list[torch.Tensor]:
        return [self.k, self.v, self.length]

    def write_prompt(self, k, v, n_keep) -> None:
        N = k.shape[2]
        self.k[:, :, :N] = k
        self.v[:, :, :N] = v
        self.length.copy_(n_keep)

    def append(self, k, v) -> None:
        Lq = k.shape[2]
        slots = (self.length[:, None] + torch.arange(Lq, device=k.device)[None]).clamp_max(self.capacity - 1)
        index = slots[:, None, :, None].expand(-1, k.shape[1], -1, k.shape[3])  # [B, H, Lq, D]
        self.k.scatter_(2, index, k)
        self.v.scatter_(2, index, v)
        self.length.add_(Lq)

    def visible(self, Lq: int) -> torch.Tensor:
        """``[B, 1, Lq, C]`` bool: slot ``s`` is seen by new query ``i`` if ``s < length - (Lq - 1 - i)``."""
        slot = self._slots
        limit = self.length[:, None] - (Lq - 1 - torch.arange(Lq, device=self.k.device))[None]  # [B, Lq]
        return (slot[None, None, :] < limit[:, :, None])[:, None]

    def lengths(self) -> torch.Tensor:
        return self.length

    def used_bytes(self) -> int:
        B, H, _, D = self.k.shape
        return int(self.length.sum() * H * D * 2 * self.k.element_size())

    def allocated_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.buffers())

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
from .rotation import hadamard, rotate, unrotate


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


class QuantizedStore:
    """KIVI layout: a packed store of ``C`` tokens plus a full-precision residual of ``S + R`` tokens.

    The residual begins with each sequence's ``n_sink`` sink tokens (the first ``sink_tokens`` of
    the prompt, never quantized, never flushed), then holds up to ``R`` new tokens until a flush.
    With ``rotate``, keys and/or values are stored rotated (:mod:`minikv.rotation`); queries are
    rotated and outputs rotated back here, so the kernels never know.
    """

    def __init__(self, cfg: MiniKVConfig, B: int, H: int, D: int, tokens: int, dtype, device):
        self.k_bits, self.v_bits, self.group = cfg.key_bits, cfg.value_bits, cfg.q_group_size
        self.clip, self.residual = cfg.clips, cfg.residual_length
        self.impl = implementation(cfg.backend, torch.device(device))
        self.rot_k = hadamard(D, device) if cfg.rotation in ("k", "kv") else None
        self.rot_v = hadamard(D, device) if cfg.rotation in ("v", "kv") else None
        G, S, R = self.group, cfg.sink_tokens, cfg.residual_length
        C = round_up(max(tokens, 1), G)
        self.capacity, self.sink_capacity = C, S
        int_kw = dict(dtype=torch.int32, device=device)
        meta_kw = dict(dtype=META_DTYPE, device=device)
        self.k_codes = torch.zeros(B, H, D, C // (32 // self.k_bits), **int_kw)
        self.k_scale = torch.zeros(B, H, D, C // G, **meta_kw)
        self.k_mn = torch.zeros(B, H, D, C // G, **meta_kw)
        self.v_codes = torch.zeros(B, H, C, D // (32 // self.v_bits), **int_kw)
        self.v_scale = torch.zeros(B, H, C, D // G, **meta_kw)
        self.v_mn = torch.zeros(B, H, C, D // G, **meta_kw)
        self.res_k = torch.zeros(B, H, S + R, D, dtype=dtype, device=device)
        self.res_v = torch.zeros(B, H, S + R, D, dtype=dtype, device=device)
        self.n_packed = torch.zeros(B, dtype=torch.int64, device=device)
        self.res_len = torch.zeros(B, dtype=torch.int64, device=device)
        self.n_sink = torch.zeros(B, dtype=torch.int64, device=device)

    def buffers(self) -> list[torch.Tensor]:
        """What the decode kernel reads (and, with ``n_sink``, what an append mutates)."""
        return [self.k_codes, self.k_scale, self.k_mn, self.v_codes, self.v_scale, self.v_mn,
                self.n_packed, self.res_k, self.res_v, self.res_len]

    def state(self) -> list[torch.Tensor]:
        return [*self.buffers(), self.n_sink]

    def __deepcopy__(self, memo):
        """A copy with its own buffers (the kernel namespace is shared, not copied)."""
        new = copy.copy(self)
        for name, value in vars(self).items():
            if isinstance(value, torch.Tensor):
                setattr(new, name, value.clone())
        return new

    def write_prompt(self, k: torch.Tensor, v: torch.Tensor, n_keep: torch.Tensor) -> None:
        """Store the kept prompt tokens ``k/v [B, H, N, D]`` (temporal order, first ``n_keep[b]`` valid).

        The first ``min(S, n_keep)`` are the sinks (selection keeps them first); of the rest, whole
        groups of G go to the packed store and the last ``(n_keep - n_sink) % G`` to the residual.
        """
        G, S = self.group, self.sink_capacity
        k, v = rotate(k, self.rot_k), rotate(v, self.rot_v)
        B, H, N, D = k.shape
        n_sink = n_keep.clamp_max(S)
        n_body = n_keep - n_sink
        pos = torch.arange(N, device=k.device)
        if S:  # the body (tokens after the sinks) moved to the front
            body = (n_sink[:, None] + pos[None]).clamp_max(N - 1)[:, None, :, None].expand(B, H, N, D)
            kb, vb = k.gather(2, body), v.gather(2, body)
        else:
            kb, vb = k, v
        full = (N // G) * G
        if full:
            kc, ks, km = self.impl.quantize_pack(kb[:, :, :full].transpose(-1, -2), self.k_bits, G, self.clip)
            vc, vs, vm = self.impl.quantize_pack(vb[:, :, :full], self.v_bits, G, self.clip)
            self.k_codes[..., : kc.shape[-1]] = kc  # [B, H, D, full * bits / 32]
            self.k_scale[..., : full // G] = ks
            self.k_mn[..., : full // G] = km
            self.v_codes[:, :, :full] = vc  # [B, H, full, D * bits / 32]
            self.v_scale[:, :, :full] = vs
            self.v_mn[:, :, :full] = vm
        packed = (n_body // G) * G  # [B]
        self.n_packed.copy_(packed)
        self.n_sink.copy_(n_sink)
        self.res_len.copy_(n_keep - packed)
        # residual slot j: sink j (j < n_sink), else body token packed + j - n_sink = prompt token packed + j
        j = torch.arange(S + G, device=k.device)[None]  # [1, S + G]
        take = torch.where(j < n_sink[:, None], j, packed[:, None] + j).clamp_max(N - 1)  # [B, S + G]
        index = take[:, None, :, None].expand(-1, H, -1, D)
        self.res_k[:, :, : S + G] = k.gather(2, index)
        self.res_v[:, :, : S + G] = v.gather(2, index)

    def append(self, k: torch.Tensor, v: torch.Tensor) -> None:
        k, v = rotate(k, self.rot_k), rotate(v, self.rot_v)
        self.impl.append_kv(k, v, *self.state(), self.k_bits, self.v_bits, self.group, self.residual, self.clip)

    def attend(self, q: torch.Tensor, scale: float, softcap: float) -> torch.Tensor:
        out = self.impl.decode_attention(rotate(q, self.rot_k), *self.buffers(), scale, softcap,
                                         self.k_bits, self.v_bits, self.group)
        return unrotate(out, self.rot_v)

    def lengths(self) -> torch.Tensor:
        return self.n_packed + self.res_len

    def used_bytes(self) -> int:
        """Bytes that represent the tokens held: codes + fp16 scales + fp16 minimums of the packed
        tokens, and the residual (sinks included) in its own dtype."""
        B, H, D = self.k_codes.shape[:3]
        meta = 2 * (D // self.group) * META_DTYPE.itemsize  # a scale and a minimum per G elements
        per_token = D * self.k_bits // 8 + meta + D * self.v_bits // 8 + meta  # K and V
        res_per_token = 2 * D * self.res_k.element_size()
        return int(H * (self.n_packed.sum() * per_token + self.res_len.sum() * res_per_token))

    def allocated_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.state())


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

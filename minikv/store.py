"""Static-shape token stores of one cache layer: 2/4-bit packed (+ residual) or dense.

Both hold, per sequence and KV head, the kept prompt tokens followed by the generated ones, in
temporal order, with the per-sequence fill level as a tensor. Shapes never change after
allocation, so a decode step is a fixed graph.
"""

from __future__ import annotations

import copy

import torch

from .config import MiniKVConfig, residual_dtype
from .dense import dense_attention, mask_for
from .kernels import implementation
from .kernels.quant import META_DTYPE
from .rotation import hadamard, rotate, unrotate


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def packed_token_bytes(D: int, k_bits: int, v_bits: int, group: int) -> int:
    """Bytes of one packed token of one head: K and V codes, and an fp16 scale and minimum per G elements each."""
    meta = 2 * (D // group) * META_DTYPE.itemsize
    return D * k_bits // 8 + meta + D * v_bits // 8 + meta


def _put_groups(dst, src, b: int, offsets, F: int, k_bits: int, G: int) -> None:
    """Write ``F`` packed tokens (whole groups) of sequence ``b`` into a packed store's six tensors ``dst``
    (key codes, scales, minimums; value codes, scales, minimums), each KV head ``h`` after its first
    ``offsets[h]``; ``src``: the six tensors of ``quantize_pack`` for that sequence's heads (``[H, ...]``)."""
    kw = 32 // k_bits
    for h, p in enumerate(offsets):
        kc, ks, km, vc, vs, vm = (t[h] for t in src)
        dst[0][b, h, :, p // kw : (p + F) // kw] = kc
        dst[1][b, h, :, p // G : (p + F) // G] = ks
        dst[2][b, h, :, p // G : (p + F) // G] = km
        dst[3][b, h, p : p + F] = vc
        dst[4][b, h, p : p + F] = vs
        dst[5][b, h, p : p + F] = vm


class QuantizedStore:
    """KIVI layout: a packed store of ``C`` tokens plus a full-precision residual of ``S + R`` tokens,
    and, with a ``tier_share`` (this layer's share of ``cfg.tier_share``), a precision tier: a second packed
    store of ``Ct = tier_tokens`` tokens at ``cfg.tier_bits`` (keys, values) holding each head's
    best-scored prompt tokens.

    The residual begins with each sequence's ``n_sink`` sink tokens (the first ``sink_tokens`` of
    the prompt, never quantized, never flushed), then holds up to ``R`` new tokens until a flush.
    Three segments, one attention (``minikv::decode_attention``): sinks and recent tokens in full
    precision, the tier, the rest at ``k_bits``/``v_bits``. The prompt and later turns fill the tier
    (each head's best-scored share of them); decoded tokens go to the main store.
    With ``rotate``, keys and/or values are stored rotated (:mod:`minikv.rotation`); queries are
    rotated and outputs rotated back here, so the kernels never know.
    """

    def __init__(
        self,
        cfg: MiniKVConfig,
        B: int,
        H: int,
        D: int,
        tokens: int,
        dtype,
        device,
        tier_tokens: int = 0,
        tier_share=0.0,
    ):
        self.cfg, self.dtype = cfg, dtype
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
        res_dtype = residual_dtype(cfg.residual_dtype, dtype)
        self.res_k = torch.zeros(B, H, S + R, D, dtype=res_dtype, device=device)
        self.res_v = torch.zeros(B, H, S + R, D, dtype=res_dtype, device=device)
        self.n_packed = torch.zeros(B, H, dtype=torch.int64, device=device)  # per KV head (per-head budgets)
        self.res_len = torch.zeros(B, dtype=torch.int64, device=device)
        self.n_sink = torch.zeros(B, dtype=torch.int64, device=device)
        self.tier_bits = cfg.tier_bits
        self.tier_share = tier_share  # this layer's
        self.tier_capacity = tier_tokens // G * G if tier_share > 0 else 0
        self.tier: list[torch.Tensor] = []  # k codes, scale, mn; v codes, scale, mn; n_tier [B, H]
        if self.tier_capacity:
            (tk, tv), Ct = self.tier_bits, self.tier_capacity
            self.tier = [
                torch.zeros(B, H, D, Ct // (32 // tk), **int_kw),
                torch.zeros(B, H, D, Ct // G, **meta_kw),
                torch.zeros(B, H, D, Ct // G, **meta_kw),
                torch.zeros(B, H, Ct, D // (32 // tv), **int_kw),
                torch.zeros(B, H, Ct, D // G, **meta_kw),
                torch.zeros(B, H, Ct, D // G, **meta_kw),
                torch.zeros(B, H, dtype=torch.int64, device=device),
            ]

    def buffers(self) -> list[torch.Tensor]:
        """What the decode kernel reads (and, with ``n_sink``, what an append mutates)."""
        return [
            self.k_codes,
            self.k_scale,
            self.k_mn,
            self.v_codes,
            self.v_scale,
            self.v_mn,
            self.n_packed,
            self.res_k,
            self.res_v,
            self.res_len,
        ]

    def state(self) -> list[torch.Tensor]:
        """What an append mutates (the main store, the residual, the fill levels)."""
        return [*self.buffers(), self.n_sink]

    def all_state(self) -> list[torch.Tensor]:
        """Every tensor the store holds: :meth:`state` and the tier's."""
        return [*self.state(), *self.tier]

    def __deepcopy__(self, memo):
        """A copy with its own buffers (the kernel namespace is shared, not copied)."""
        new = copy.copy(self)
        for name, value in vars(self).items():
            if isinstance(value, torch.Tensor):
                setattr(new, name, value.clone())
        new.tier = [t.clone() for t in self.tier]
        return new

    def write_prompt(self, k: torch.Tensor, v: torch.Tensor, n_keep: torch.Tensor, scores=None) -> None:
        """Store the kept prompt tokens ``k/v [B, H, N, D]`` (temporal order, the first ``n_keep`` valid:
        ``[B]``, or ``[B, H]`` per KV head), ranked for the tier by ``scores [B, H, N]`` (with a tier).

        The first ``min(S, n_keep)`` are the sinks (selection keeps them first). Of the rest (the body),
        each head's best-scored ``tier_share`` (rounded down to whole groups of G) go to the tier; of the
        others, whole groups of G go to the packed store and the last ``(n_keep - n_sink) % G`` to the
        residual, which the heads share: per-head counts must leave every head the same remainder.
        """
        G, S = self.group, self.sink_capacity
        k, v = rotate(k, self.rot_k), rotate(v, self.rot_v)
        B, H, N, D = k.shape
        per_head = n_keep.dim() == 2
        n_keep = n_keep.view(B, -1).expand(B, H)
        n_sink = n_keep.amin(1).clamp_max(S)  # [B]
        n_body = n_keep - n_sink[:, None]  # [B, H]
        rest = n_body % G
        if per_head and not torch.equal(rest, rest[:, :1].expand(B, H)):  # prefill time: reads the counts
            raise ValueError(
                f"per-head counts must leave every head the same remainder mod G={G}, got {n_keep.tolist()}"
            )
        pos = torch.arange(N, device=k.device)
        in_body = (pos >= n_sink[:, None, None]) & (pos < n_keep[..., None])  # [B, H, N]
        if self.tier:
            if scores is None:
                raise ValueError("a store with a precision tier ranks the prompt's tokens: pass their scores")
            n_tier = torch.div(n_body * self.tier_share, G, rounding_mode="floor").long() * G
            n_tier = n_tier.clamp_max(self.tier_capacity)
            ranked = scores.float().masked_fill(~in_body, float("-inf"))
            rank = ranked.argsort(dim=-1, descending=True, stable=True).argsort(dim=-1)  # 0 = best
            tiered = in_body & (rank < n_tier[..., None])
            # the tier's tokens first, then the rest of the body, each in temporal order
            order = torch.argsort(torch.where(tiered, 0, torch.where(in_body, 1, 2)), dim=-1, stable=True)
            first = order[..., : min(self.tier_capacity, N // G * G), None].expand(-1, -1, -1, D)
            self._write_tier(k.gather(2, first), v.gather(2, first), n_tier)
            body = (n_tier[..., None] + pos).clamp_max(N - 1)  # the main store's body, after the tier's
            body = order.gather(2, body)[..., None].expand(-1, -1, -1, D)
        else:
            n_tier = torch.zeros_like(n_body)
            body = (n_sink[:, None, None] + pos).clamp_max(N - 1)[..., None].expand(B, H, N, D)
        kb, vb = k.gather(2, body), v.gather(2, body)  # the main store's tokens first
        n_main = n_body - n_tier
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
        packed = n_main - rest  # [B, H]
        self.n_packed.copy_(packed)
        self.n_sink.copy_(n_sink)
        self.res_len.copy_(n_sink + rest[:, 0])
        # residual slot j: sink j (j < n_sink), else the main body's token packed + j - n_sink
        j = torch.arange(S + G, device=k.device)  # [S + G]
        sink = j < n_sink[:, None, None]  # [B, 1, S + G]
        at = (packed[..., None] + j - n_sink[:, None, None]).clamp(0, N - 1)  # [B, H, S + G]
        take = torch.where(sink, j.clamp_max(N - 1), body[..., 0].gather(2, at))
        index = take[..., None].expand(-1, -1, -1, D)
        self.res_k[:, :, : S + G] = k.gather(2, index)
        self.res_v[:, :, : S + G] = v.gather(2, index)

    def _write_tier(self, k: torch.Tensor, v: torch.Tensor, n_tier: torch.Tensor) -> None:
        """Pack the tier's first tokens ``k/v [B, H, n, D]`` (rotated, whole groups, ``n`` at most its
        capacity; each head's first ``n_tier`` hold one)."""
        (tk, tv), G = self.tier_bits, self.group
        kc, ks, km = self.impl.quantize_pack(k.transpose(-1, -2), tk, G, self.clip)
        vc, vs, vm = self.impl.quantize_pack(v, tv, G, self.clip)
        for dst, src in zip(self.tier[:3], (kc, ks, km)):  # keys: tokens along the last axis
            dst[..., : src.shape[-1]] = src
        for dst, src in zip(self.tier[3:6], (vc, vs, vm)):  # values: tokens along axis 2
            dst[:, :, : src.shape[2]] = src
        self.tier[-1].copy_(n_tier)

    def append(self, k: torch.Tensor, v: torch.Tensor) -> None:
        k, v = rotate(k, self.rot_k), rotate(v, self.rot_v)
        self.impl.append_kv(k, v, *self.state(), self.k_bits, self.v_bits, self.group, self.residual, self.clip)

    def extend(self, k: torch.Tensor, v: torch.Tensor, scores: torch.Tensor | None = None) -> None:
        """Append ``N`` tokens ``k/v [B, H, N, D]`` to every sequence at once (a new turn's kept tokens),
        ranked for the tier by ``scores [B, H, N]`` (with a tier; ``None``: none of them in it).

        With a tier, each head's best-scored :meth:`tier_tokens` ``(N)`` go to the tier, after its own
        (in temporal order). Per sequence, the residual's tokens after the sinks and the other new ones
        are packed in whole groups of G (as :meth:`write_prompt` packs a prompt) and the last ``< G`` stay
        in the residual. Groups are independent, so the codes are those of :meth:`append`'s flushes of
        the same tokens. Prefill-time code: reads the fill levels on the host; the capacities must hold
        the tokens (:meth:`resized`).
        """
        k, v = rotate(k, self.rot_k), rotate(v, self.rot_v)
        G = self.group
        n_tier = self.tier_tokens(k.shape[2]) if scores is not None else 0
        levels = list(zip(self.n_sink.tolist(), self.res_len.tolist(), self.n_packed.tolist()))
        M = [r - s + k.shape[2] - n_tier for s, r, _ in levels]
        need = max(max(heads) + m // G * G for (_, _, heads), m in zip(levels, M))
        if need > self.capacity:
            raise ValueError(f"store holds {self.capacity} packed tokens, {need} needed: resize it first")
        if n_tier:
            k, v = self._extend_tier(k, v, scores, n_tier)
        for b, (s, r, heads) in enumerate(levels):
            body_k = torch.cat([self.res_k[b, :, s:r], k[b].to(self.res_k.dtype)], 1)  # [H, M, D]
            body_v = torch.cat([self.res_v[b, :, s:r], v[b].to(self.res_v.dtype)], 1)
            F = (M[b] // G) * G
            if F:
                kc = self.impl.quantize_pack(body_k[None, :, :F].transpose(-1, -2), self.k_bits, G, self.clip)
                vc = self.impl.quantize_pack(body_v[None, :, :F], self.v_bits, G, self.clip)
                _put_groups(self.buffers()[:6], [t[0] for t in (*kc, *vc)], b, heads, F, self.k_bits, G)
            self.res_k[b, :, s : s + M[b] - F] = body_k[:, F:]
            self.res_v[b, :, s : s + M[b] - F] = body_v[:, F:]
            self.n_packed[b] += F
            self.res_len[b] = s + M[b] - F

    def tier_tokens(self, n: int) -> int:
        """How many of a turn's ``n`` kept tokens each head puts in the tier: the share, in whole groups."""
        return int(n * self.tier_share) // self.group * self.group

    def tier_held(self) -> int:
        """The most tokens a head holds in the tier (host sync: prefill-time code)."""
        return int(self.tier[-1].max()) if self.tier else 0

    def _extend_tier(self, k, v, scores, n_tier: int):
        """Pack each head's ``n_tier`` best-scored tokens of ``k/v [B, H, N, D]`` (rotated) after the tier's
        own; return the others ``[B, H, N - n_tier, D]``, in temporal order."""
        (tk, tv), G = self.tier_bits, self.group
        need = self.tier_held() + n_tier
        if need > self.tier_capacity:
            raise ValueError(f"the tier holds {self.tier_capacity} tokens, {need} needed: resize it first")
        rank = scores.float().argsort(dim=-1, descending=True, stable=True).argsort(dim=-1)  # 0 = best
        order = torch.argsort((rank >= n_tier).to(torch.int8), dim=-1, stable=True)  # the tier's first
        index = order[..., None].expand(-1, -1, -1, k.shape[-1])
        k, v = k.gather(2, index), v.gather(2, index)
        kc = self.impl.quantize_pack(k[:, :, :n_tier].transpose(-1, -2), tk, G, self.clip)
        vc = self.impl.quantize_pack(v[:, :, :n_tier], tv, G, self.clip)
        for b, heads in enumerate(self.tier[-1].tolist()):
            _put_groups(self.tier[:6], [t[b] for t in (*kc, *vc)], b, heads, n_tier, tk, G)
        self.tier[-1] += n_tier
        return k[:, :, n_tier:], v[:, :, n_tier:]

    def dense(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(k, v [B, H, Ct + C + S + R, D], valid [B, H, Ct + C + S + R])``: every token held (the tier's,
        the packed store's, the residual's), dequantized and rotated back, in the store's dtype; ``valid``
        marks each head's slots that hold one."""
        G = self.group
        keys = [
            self.impl.unpack_dequantize(self.k_codes, self.k_scale, self.k_mn, self.k_bits, G, self.dtype).transpose(
                -1, -2
            ),
            self.res_k.to(self.dtype),
        ]
        vals = [
            self.impl.unpack_dequantize(self.v_codes, self.v_scale, self.v_mn, self.v_bits, G, self.dtype),
            self.res_v.to(self.dtype),
        ]
        C, SR = self.capacity, self.res_k.shape[2]
        slot = torch.arange(C + SR, device=self.res_k.device)
        valid = torch.where(slot < C, slot < self.n_packed[..., None], slot - C < self.res_len[:, None, None])
        if self.tier:
            (tk, tv), (kc, ks, km, vc, vs, vm, n_tier) = self.tier_bits, self.tier
            keys.insert(0, self.impl.unpack_dequantize(kc, ks, km, tk, G, self.dtype).transpose(-1, -2))
            vals.insert(0, self.impl.unpack_dequantize(vc, vs, vm, tv, G, self.dtype))
            in_tier = torch.arange(self.tier_capacity, device=valid.device) < n_tier[..., None]
            valid = torch.cat([in_tier, valid], -1)
        k = unrotate(torch.cat(keys, 2), self.rot_k)
        v = unrotate(torch.cat(vals, 2), self.rot_v)
        return k, v, valid

    def resized(self, tokens: int, tier_tokens: int = 0) -> "QuantizedStore":
        """A store with room for ``tokens`` packed tokens and (with a tier) ``tier_tokens`` tier tokens (at
        least the tier's capacity now), holding this one's tokens."""
        B, H, D = self.k_codes.shape[:3]
        tier = max(self.tier_capacity, tier_tokens) if self.tier_share > 0 else 0
        new = type(self)(self.cfg, B, H, D, tokens, self.dtype, self.k_codes.device, tier, self.tier_share)
        return _copy_into(new, self)

    def attend(self, module, q: torch.Tensor, scale: float, softcap, fallback: str = "sdpa"):
        """Decode attention of ``q [B, Hq, Lq, D]`` (the new tokens appended) over every token held:
        ``(out [B, Lq, Hq, D], None)``, by ``minikv::decode_attention`` (``module``/``fallback`` unused)."""
        tier = (*self.tier, *self.tier_bits) if self.tier else ()
        out = self.impl.decode_attention(
            rotate(q, self.rot_k),
            *self.buffers(),
            scale,
            softcap or 0.0,
            self.k_bits,
            self.v_bits,
            self.group,
            *tier,
        )
        return unrotate(out, self.rot_v).transpose(1, 2), None

    def lengths(self) -> torch.Tensor:
        """Tokens held ``[B, H]`` per sequence and KV head."""
        held = self.n_packed + self.res_len[:, None]
        return held + self.tier[-1] if self.tier else held

    def used_bytes(self) -> int:
        """Bytes that represent the tokens held: codes + fp16 scales + fp16 minimums of each head's
        packed tokens (the tier's at its widths), and the residual (sinks included) in its own dtype."""
        B, H, D = self.k_codes.shape[:3]
        per_token = packed_token_bytes(D, self.k_bits, self.v_bits, self.group)
        res_per_token = 2 * D * self.res_k.element_size()
        used = self.n_packed.sum() * per_token + H * self.res_len.sum() * res_per_token
        if self.tier:
            used = used + self.tier[-1].sum() * packed_token_bytes(D, *self.tier_bits, self.group)
        return int(used)

    def allocated_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.all_state())


class DenseStore:
    """Uncompressed store (``bits=16``): kept tokens in the model dtype, static capacity."""

    def __init__(self, cfg: MiniKVConfig, B: int, H: int, D: int, tokens: int, dtype, device):
        self.cfg = cfg
        self.capacity = max(tokens, 1)
        self.k = torch.zeros(B, H, self.capacity, D, dtype=dtype, device=device)
        self.v = torch.zeros(B, H, self.capacity, D, dtype=dtype, device=device)
        self.length = torch.zeros(B, dtype=torch.int64, device=device)
        self._slots = torch.arange(self.capacity, device=device)  # built once, not per token

    def buffers(self) -> list[torch.Tensor]:
        return [self.k, self.v, self.length]

    state = all_state = buffers

    def write_prompt(self, k, v, n_keep, scores=None) -> None:
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

    def extend(self, k, v, scores=None) -> None:
        """A turn's kept tokens: appended at each sequence's length (``scores`` unused: no tier)."""
        self.append(k, v)

    def dense(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(k, v [B, H, C, D], valid [B, H, C])``: the tokens held and which slots hold one."""
        valid = self._slots[None] < self.length[:, None]
        return self.k, self.v, valid[:, None].expand(-1, self.k.shape[1], -1)

    def resized(self, tokens: int, tier_tokens: int = 0) -> "DenseStore":
        B, H, _, D = self.k.shape
        return _copy_into(type(self)(self.cfg, B, H, D, tokens, self.k.dtype, self.k.device), self)

    def attend(self, module, q: torch.Tensor, scale: float, softcap, fallback: str = "sdpa"):
        """Decode attention over the tokens held with the unpatched model's own attention function (with
        every token kept, the tokens are HF's): ``(out [B, Lq, Hq, D], weights or None)``."""
        allowed = mask_for(self.visible(q.shape[2]), fallback, q.dtype)
        return dense_attention(module, q, self.k, self.v, allowed, scale, softcap, fallback)

    def visible(self, Lq: int) -> torch.Tensor:
        """``[B, 1, Lq, C]`` bool: slot ``s`` is seen by new query ``i`` if ``s < length - (Lq - 1 - i)``."""
        slot = self._slots
        limit = self.length[:, None] - (Lq - 1 - torch.arange(Lq, device=self.k.device))[None]  # [B, Lq]
        return (slot[None, None, :] < limit[:, :, None])[:, None]

    def lengths(self) -> torch.Tensor:
        return self.length[:, None].expand(-1, self.k.shape[1])

    def used_bytes(self) -> int:
        B, H, _, D = self.k.shape
        return int(self.length.sum() * H * D * 2 * self.k.element_size())

    def allocated_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.buffers())


def _copy_into(new, old):
    """``new`` (a store of another capacity) with ``old``'s contents: every state tensor copied over
    the leading part both shapes share (capacity axes hold the tokens first)."""
    for dst, src in zip(new.all_state(), old.all_state()):
        common = tuple(slice(0, min(a, b)) for a, b in zip(dst.shape, src.shape))
        dst[common] = src[common]
    return new

"""A static sliding-window layer (Gemma 2/3's local layers): a ring of the last W tokens, uncompressed.

The prompt is attended exactly as the unpatched model does (transformers' own sliding mask), then its
last ``W = sliding_window`` tokens are written into a ``[B, H, W, D]`` ring at slot ``position % W``
with their positions (``-1``: empty or padding). A decode step writes its token at the slot of its
position and attends over the ring with a mask built from the stored positions (``position > query -
W``, as transformers' ``sliding_window_overlay``): fixed shapes, tensor positions, no host sync, so
the step compiles into one graph. A later turn (more than one token) attends over the ring and
itself, then keeps its last W tokens.
"""

from __future__ import annotations

import torch

from .dense import dense_attention, mask_for, valid_tokens
from .view import MiniKVView, StaticLayer


class SlidingLayer(StaticLayer):
    """The last ``sliding_window`` tokens of every sequence in a static ring."""

    is_sliding = True

    def __init__(self, sliding_window: int, **kwargs):
        super().__init__()
        self.window = sliding_window
        self.keys = self.values = self.positions = None
        self.cumulative_length = torch.tensor(0, dtype=torch.int64)  # logical tokens (padding included)

    # -- transformers CacheLayerMixin -------------------------------------------------------
    def lazy_initialization(self, key_states, value_states) -> None:
        B, H, _, D = key_states.shape
        kw = dict(dtype=key_states.dtype, device=key_states.device)
        shape = (B, H, self.window, D)
        if self.keys is None or self.keys.shape != shape or self.keys.dtype != key_states.dtype:
            self.keys, self.values = torch.zeros(shape, **kw), torch.zeros(shape, **kw)
            self.positions = torch.full((B, self.window), -1, dtype=torch.int64, device=key_states.device)
            self.cumulative_length = torch.zeros((), dtype=torch.int64, device=key_states.device)
            if not torch.compiler.is_compiling():  # fixed addresses: no recompiles, CUDA graphs can replay
                for t in (self.keys, self.values, self.positions, self.cumulative_length):
                    torch._dynamo.mark_static_address(t)
        self.positions.fill_(-1)
        self.cumulative_length.zero_()
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
            view = MiniKVView(self, key_states, value_states)
        elif key_states.shape[2] > 1 and not torch.compiler.is_compiling():
            view = MiniKVView(self, key_states, value_states, turn=True)
        else:
            self._write(key_states, value_states, None)
            view = MiniKVView(self)
        return view, view

    def get_max_length(self) -> int:
        return -1  # unbounded: a sliding window

    def reset(self) -> None:
        self.is_initialized = False

    # -- the ring ------------------------------------------------------------------------------
    def _write(self, k, v, valid) -> None:
        """Write ``k/v [B, H, N, D]`` (logical positions ``cumulative_length + arange(N)``; ``valid
        [B, N]``, None = all real) into their ring slots; only the last ``W`` can survive."""
        N = k.shape[2]
        if N > self.window:
            k, v = k[:, :, -self.window :], v[:, :, -self.window :]
            valid = None if valid is None else valid[:, -self.window :]
        start = self.cumulative_length + (N - k.shape[2])
        pos = start + torch.arange(k.shape[2], device=k.device)  # [n]
        slots = pos % self.window
        self.keys.index_copy_(2, slots, k.to(self.keys.dtype))
        self.values.index_copy_(2, slots, v.to(self.values.dtype))
        new_pos = pos[None].expand(k.shape[0], -1)
        if valid is not None:
            new_pos = torch.where(valid, new_pos, -1)
        self.positions.index_copy_(1, slots, new_pos)
        self.cumulative_length.add_(N)

    def _allowed(self, key_pos, query_pos) -> torch.Tensor:
        """``[B, 1, Lq, S]``: key at ``key_pos [B, S]`` seen by query at ``query_pos [Lq]``."""
        q = query_pos[None, :, None]
        kp = key_pos[:, None, :]
        return ((kp >= 0) & (kp <= q) & (kp > q - self.window))[:, None]

    def attend(self, module, query, view: MiniKVView, mask, scaling: float, softcap, fallback: str, **kwargs):
        """Attention output ``[B, Lq, Hq, D]`` of this layer (prompt, turn or decode step)."""
        Lq = query.shape[2]
        if view.key is not None and not view.turn:  # the prompt: exactly the unpatched model's attention
            out = dense_attention(module, query, view.key, view.value, mask, scaling, softcap, fallback, **kwargs)
            T = view.key.shape[2]
            self._write(view.key, view.value, valid_tokens(mask, view.key.shape[0], T, view.key.device)[:, -T:])
            return out
        if view.turn:  # a later turn: the ring and the new tokens, then the new tokens written
            k, v = view.key, view.value
            q_pos = self.cumulative_length + torch.arange(Lq, device=k.device)
            key_pos = torch.cat([self.positions, q_pos[None].expand(k.shape[0], -1)], 1)
            keys, values = (
                torch.cat([self.keys, k.to(self.keys.dtype)], 2),
                torch.cat([self.values, v.to(self.values.dtype)], 2),
            )
            allowed = self._allowed(key_pos, q_pos)
            out = dense_attention(
                module,
                query,
                keys,
                values,
                mask_for(allowed, fallback, query.dtype),
                scaling,
                softcap,
                fallback,
                **kwargs,
            )
            self._write(k, v, None)
            return out
        q_pos = self.cumulative_length - Lq + torch.arange(Lq, device=query.device)  # written already
        allowed = self._allowed(self.positions, q_pos)
        return dense_attention(
            module,
            query,
            self.keys,
            self.values,
            mask_for(allowed, fallback, query.dtype),
            scaling,
            softcap,
            fallback,
            **kwargs,
        )

    # -- accounting ----------------------------------------------------------------------------
    def held_bytes(self) -> int:
        """Bytes of the tokens in the ring (real tokens only, K and V, in the model's dtype)."""
        if self.positions is None or not self.is_initialized:
            return 0
        B, H, _, D = self.keys.shape
        return int((self.positions >= 0).sum()) * H * D * 2 * self.keys.element_size()

    def allocated_bytes(self) -> int:
        if self.keys is None:
            return 0
        return sum(t.numel() * t.element_size() for t in (self.keys, self.values, self.positions))

"""Where each part of a token lives inside one paged block of one KV head.

vLLM gives every (block, KV head) a contiguous page of ``N`` token slots of ``C`` bytes each (its
``[num_blocks, H, N, C]`` head-major layout). The quantized layout uses those ``N * C`` bytes as
minikv's store for the block's ``N`` tokens: the codes of :class:`minikv.store.QuantizedStore`, with the
keys' words and group scales stored word-major so that the paged decode kernel
(``minikv::paged_decode_attention``) reads a tile's words as contiguous rows of ``D``:

==========  ===========================  =========  ====================================================
region      shape                        dtype      what
==========  ===========================  =========  ====================================================
k_codes     ``[N * k_bits / 32, D]``     int32      keys per channel, groups of G tokens (KIVI), word-major:
                                                    word row ``w`` holds tokens ``w*32/k_bits...`` of
                                                    every channel (a tile's words are whole rows)
k_scale/mn  ``[N / G, D]``               fp16       one scale and minimum per channel per group
v_codes     ``[N, D * v_bits / 32]``     int32      values per token, groups of G channels
v_scale/mn  ``[N, D / G]``               fp16
k_res       ``[G, D]``                   the model  the keys of the block's incomplete group, in full
                                         dtype      precision until its G-th token arrives
==========  ===========================  =========  ====================================================

Values are quantized when they are written (a token's value group is complete at once); keys wait
in ``k_res`` until their group is (KIVI's residual, bounded by one group per block). With
``keys_per_token`` the keys are laid out as the values (``[N, D * k_bits / 32]`` codes, ``[N, D / G]``
scales and minimums, quantized as written) and the page holds no residual. ``C`` is the
page's bytes divided by ``N``, rounded up to 4 bytes. At 16 bits the page is vLLM's own dense
``[N, 2 * D]`` (keys then values).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..kernels.quant import META_DTYPE
from ..store import round_up

ALIGN = 4  # bytes: every region starts on an int32 boundary


def _nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    return torch.Size(shape).numel() * dtype.itemsize


@dataclass(frozen=True)
class PageLayout:
    head_size: int
    block_size: int
    dtype: torch.dtype  # the model's (keys' residual, and the dense layout)
    k_bits: int
    v_bits: int
    group_size: int
    keys_per_token: bool = False

    @property
    def quantized(self) -> bool:
        return self.k_bits != 16

    def regions(self) -> dict[str, tuple[int, tuple[int, ...], torch.dtype]]:
        """name -> (byte offset, shape, dtype) within one page of ``block_size * slot_bytes`` bytes."""
        D, N, G = self.head_size, self.block_size, self.group_size
        if not self.quantized:
            parts = [("k", (N, D), self.dtype), ("v", (N, D), self.dtype)]
        elif self.keys_per_token:
            parts = [
                ("k_codes", (N, D * self.k_bits // 32), torch.int32),
                ("k_scale", (N, D // G), META_DTYPE),
                ("k_mn", (N, D // G), META_DTYPE),
                ("v_codes", (N, D * self.v_bits // 32), torch.int32),
                ("v_scale", (N, D // G), META_DTYPE),
                ("v_mn", (N, D // G), META_DTYPE),
            ]
        else:
            parts = [
                ("k_codes", (N * self.k_bits // 32, D), torch.int32),
                ("k_scale", (N // G, D), META_DTYPE),
                ("k_mn", (N // G, D), META_DTYPE),
                ("v_codes", (N, D * self.v_bits // 32), torch.int32),
                ("v_scale", (N, D // G), META_DTYPE),
                ("v_mn", (N, D // G), META_DTYPE),
                ("k_res", (G, D), self.dtype),
            ]
        out, offset = {}, 0
        for name, shape, dtype in parts:
            out[name] = (offset, shape, dtype)
            offset = round_up(offset + _nbytes(shape, dtype), ALIGN)
        return out

    @property
    def page_bytes(self) -> int:
        """Bytes one (block, KV head) holds, before rounding to whole slots."""
        offset, shape, dtype = list(self.regions().values())[-1]
        return offset + _nbytes(shape, dtype)

    @property
    def slot_bytes(self) -> int:
        """``C``: the bytes per (KV head, token slot) declared to vLLM (``state_content_bytes``)."""
        if not self.quantized:
            return self.dense_slot_bytes
        return round_up(round_up(self.page_bytes, self.block_size) // self.block_size, max(ALIGN, self.dtype.itemsize))

    @property
    def dense_slot_bytes(self) -> int:
        """vLLM's own bytes per (KV head, token) in the model dtype: the capacity gain is the ratio."""
        return 2 * self.head_size * self.dtype.itemsize

    def views(self, kv_cache: torch.Tensor) -> dict[str, torch.Tensor]:
        """Views ``[num_blocks, H, *shape]`` of each region of vLLM's cache tensor ``[num_blocks, H, N, C']``
        (any dtype; the bytes per page must be ``block_size * slot_bytes``). Writes go to the cache."""
        nb, H = kv_cache.shape[:2]
        pages = kv_cache.view(torch.uint8).view(nb, H, -1)  # raises (never copies) if a page is not contiguous
        if pages.shape[-1] != self.block_size * self.slot_bytes:
            raise ValueError(
                f"a KV cache page holds {pages.shape[-1]} bytes, the layout expects "
                f"{self.block_size} x {self.slot_bytes}"
            )
        out = {}
        for name, (offset, shape, dtype) in self.regions().items():
            out[name] = pages[..., offset : offset + _nbytes(shape, dtype)].view(dtype).view(nb, H, *shape)
        return out

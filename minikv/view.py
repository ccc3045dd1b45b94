"""What minikv's cache layers share: the view ``update`` returns in place of dense K/V, and the base class."""

from __future__ import annotations

from transformers.cache_utils import CacheLayerMixin


class MiniKVView:
    """The layer (whose ``attend`` computes the attention), plus the new K/V when the attention needs
    them: the prompt, or with ``turn`` the tokens that extend a cache already holding some (a new
    turn or a prefill chunk). A decode step's view holds the layer only: its tokens are stored."""

    def __init__(self, layer, key=None, value=None, turn: bool = False):
        self.layer, self.key, self.value, self.turn = layer, key, value, turn


class StaticLayer(CacheLayerMixin):
    """What minikv's cache layers share: static buffers (compileable), a logical length tensor
    ``cumulative_length``, the prompt masked by transformers and later steps by the layer itself, and
    no beam search or cropping."""

    is_compileable = True

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        # the prompt gets transformers' mask; after it, the layer's own lengths/positions are the mask
        return (query_length, 0) if not self.is_initialized else (0, 0)

    def get_seq_length(self):
        return self.cumulative_length if self.is_initialized else 0

    def reorder_cache(self, beam_idx) -> None:
        raise ValueError("beam search is not supported on a MiniKV cache (num_beams must be 1)")

    def crop(self, tokens_to_remove: int) -> None:
        raise ValueError("a MiniKV cache cannot be cropped (assisted decoding is not supported)")

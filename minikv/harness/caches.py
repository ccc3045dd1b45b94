"""The KV caches ``minikv_hf`` can evaluate, behind one small interface.

- ``minikv``: :class:`minikv.MiniKVCache` with the given knobs (the model is patched);
- ``quanto``: transformers' ``QuantizedCache`` (optimum-quanto backend, ``bits`` 2 or 4, HF defaults
  otherwise: q_group_size 64, residual_length 128), the quantization-only baseline;
- ``full``: no cache compression at all: lm-eval's stock HF scoring, unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

KINDS = ("minikv", "quanto", "full")
QUANTO_BITS = (2, 4)


@dataclass
class KVBytes:
    """Running totals over every cache an evaluation built: bytes held vs an fp16 cache."""

    used: int = 0
    fp16: int = 0
    caches: int = 0

    def add(self, used: int, fp16: int) -> None:
        self.used, self.fp16, self.caches = self.used + used, self.fp16 + fp16, self.caches + 1

    @property
    def ratio(self) -> float | None:
        return self.used / self.fp16 if self.fp16 else None


def fp16_bytes(model_config, batch: int, tokens: int) -> int:
    """Bytes of an fp16 K+V cache holding ``tokens`` per sequence in every layer."""
    text = model_config.get_text_config(decoder=True)
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
    return text.num_hidden_layers * batch * tokens * kv_heads * head_dim * 2 * 2


def quantized_cache_bytes(cache) -> int:
    """Bytes held by a transformers ``QuantizedCache`` (quanto tensors' storage + residual)."""
    total = 0
    for layer in cache.layers:
        for name in ("_quantized_keys", "_quantized_values", "keys", "values"):
            total += _storage_bytes(getattr(layer, name, None))
    return total


def _storage_bytes(obj) -> int:
    import torch

    if obj is None:
        return 0
    if type(obj) is torch.Tensor:
        return obj.numel() * obj.element_size()
    # a quanto QTensor: its inner tensors (packed codes, scale, shift) are plain tensors
    names, _ = obj.__tensor_flatten__() if hasattr(obj, "__tensor_flatten__") else ([], None)
    return sum(_storage_bytes(getattr(obj, n)) for n in names)

"""minikv: MiniKV-style KV-cache compression for Hugging Face causal LMs.

``import minikv`` patches nothing and imports neither triton nor CUDA; transformers and the ops
are loaded on first use.
"""

from __future__ import annotations

from .config import MiniKVConfig
from .patch import is_patched, patch, unpatch

__all__ = ["Conversation", "KVMemory", "MiniKVCache", "MiniKVConfig", "generate", "is_patched", "patch", "unpatch"]
__version__ = "0.1.0"


def generate(model, input_ids, attention_mask=None, max_new_tokens: int = 32, **kwargs):
    """Greedy gpt-fast style generation on a patched model; see :func:`minikv.loop.generate`."""
    from .loop import generate as _generate

    return _generate(model, input_ids, attention_mask, max_new_tokens, **kwargs)


def __getattr__(name):
    if name in ("MiniKVCache", "KVMemory"):
        from . import cache

        return getattr(cache, name)
    if name == "Conversation":
        from .chat import Conversation

        return Conversation
    raise AttributeError(f"module 'minikv' has no attribute {name!r}")

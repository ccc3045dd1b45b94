"""minikv: MiniKV-style KV-cache compression for Hugging Face causal LMs.

``import minikv`` patches nothing and imports neither triton nor CUDA; transformers and the ops
are loaded on first use.
"""

from __future__ import annotations

from .config import MiniKVConfig
from .patch import is_patched, patch, unpatch

__all__ = ["KVMemory", "MiniKVCache", "MiniKVConfig", "is_patched", "patch", "unpatch"]
__version__ = "0.1.0"


def __getattr__(name):
    if name in ("MiniKVCache", "KVMemory"):
        from . import cache

        return getattr(cache, name)
    raise AttributeError(f"module 'minikv' has no attribute {name!r}")

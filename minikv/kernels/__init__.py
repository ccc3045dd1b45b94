"""MiniKV kernels: the custom ops (``ops``), their pure-PyTorch references (``reference``,
``quant``). Importing this package registers the ops; it imports neither triton nor CUDA."""

from . import ops

__all__ = ["ops"]

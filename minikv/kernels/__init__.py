"""MiniKV kernels: the custom ops (``ops``), their pure-PyTorch references (``reference``, ``quant``)
and Triton implementations (``triton_*``, registered for CUDA). Importing this package registers the
ops; it imports neither triton nor CUDA."""

from . import ops
from .backend import implementation, triton_runs_on, use_triton_on_cpu

__all__ = ["implementation", "ops", "triton_runs_on", "use_triton_on_cpu"]

"""Choosing the implementation of the ops: the PyTorch reference or the Triton kernels.

- On CUDA the Triton kernels are registered as the ops' CUDA kernels the first time ``minikv.kernels``
  is imported; triton itself is imported only when a CUDA tensor first reaches an op.
- On CPU the decode step's ops run :mod:`.cpu_ops` (the C++ decode attention, built on first use,
  and an append that quantizes only full residuals); the other ops run their references.
- ``MiniKVConfig(backend="reference")`` bypasses the ops and runs the reference functions on any
  device; ``"auto"`` and ``"triton"`` go through the ops (``"triton"`` also insists that Triton is
  what runs).
- Tests run the Triton kernels on CPU tensors through the Triton interpreter: set
  ``TRITON_INTERPRET=1`` before anything imports triton, then call :func:`use_triton_on_cpu`.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import types

import torch

from . import cpu_ops, ops, paged_reference, quant, reference

# op name -> (module, function) of its Triton launcher
TRITON_LAUNCHERS = {
    "quantize_pack": ("triton_quant", "quantize_pack"),
    "decode_attention": ("triton_decode", "decode_attention"),
    "prefill_attention": ("triton_prefill", "prefill_attention"),
    "append_kv": ("triton_append", "append_kv"),
    "paged_decode_attention": ("triton_paged", "paged_decode_attention"),
    "paged_attention": ("triton_paged", "paged_attention"),
}
REFERENCE = types.SimpleNamespace(
    quantize_pack=quant.quantize_pack,
    unpack_dequantize=quant.unpack_dequantize,
    prefill_attention=reference.prefill_attention,
    reconstruct_attention=reference.reconstruct_attention,
    select_tokens=reference.select_tokens,
    append_kv=reference.append_kv,
    decode_attention=reference.decode_attention,
    paged_decode_attention=paged_reference.paged_decode_attention,
    paged_attention=paged_reference.paged_attention,
)

CPU_KERNELS = {
    "quantize_pack": cpu_ops.quantize_pack,
    "decode_attention": cpu_ops.decode_attention,
    "append_kv": cpu_ops.append_kv,
    "reconstruct_attention": cpu_ops.reconstruct_attention,
    "paged_decode_attention": cpu_ops.paged_decode_attention,
    "paged_attention": cpu_ops.paged_attention,
}

_registered: set[str] = set()
_cpu = {"enabled": False}


def _launcher(op_name: str, device_type: str):
    module, name = TRITON_LAUNCHERS[op_name]
    fallback = CPU_KERNELS.get(op_name, getattr(REFERENCE, op_name))

    def launcher(*args, **kwargs):
        if device_type == "cpu" and not _cpu["enabled"]:
            return fallback(*args, **kwargs)
        fn = getattr(importlib.import_module(f"{__package__}.{module}"), name)
        return fn(*args, **kwargs)

    return launcher


def register(device_type: str) -> None:
    """Register the Triton launchers as the ``device_type`` kernels of the ops (on CPU: with the CPU
    kernels while Triton is off, and the CPU-only kernels; idempotent)."""
    if device_type in _registered:
        return
    for op_name in TRITON_LAUNCHERS:
        getattr(ops, op_name).register_kernel(device_type)(_launcher(op_name, device_type))
    if device_type == "cpu":  # CPU kernels of ops that have no Triton kernel
        for op_name in CPU_KERNELS.keys() - TRITON_LAUNCHERS.keys():
            getattr(ops, op_name).register_kernel("cpu")(CPU_KERNELS[op_name])
    _registered.add(device_type)


def triton_importable() -> bool:
    return importlib.util.find_spec("triton") is not None


def use_triton_on_cpu(enabled: bool = True) -> None:
    """Run the ops' Triton kernels on CPU tensors (interpreted; for tests and debugging), or stop."""
    if enabled and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("the Triton kernels run on CPU only under TRITON_INTERPRET=1, set before importing triton")
    register("cpu")
    _cpu["enabled"] = enabled


def triton_runs_on(device: torch.device) -> bool:
    return device.type == "cuda" and "cuda" in _registered or device.type == "cpu" and _cpu["enabled"]


def implementation(backend: str, device: torch.device):
    """The functions a cache layer calls for ``backend`` on ``device``."""
    if backend == "reference":
        return REFERENCE
    if backend == "triton" and not triton_runs_on(device):
        raise ValueError(
            f"backend='triton' has no kernels on {device.type}: Triton runs on CUDA, or on CPU under "
            f"TRITON_INTERPRET=1 after minikv.kernels.use_triton_on_cpu(); use backend='auto' or 'reference'"
        )
    return ops


register("cpu")  # Triton on CPU only after use_triton_on_cpu(); until then CPU_KERNELS or the references
if triton_importable():
    register("cuda")

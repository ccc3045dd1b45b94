"""A guard for the capture-safe paths: every API that reads a tensor back to the host raises inside it."""

from __future__ import annotations

import contextlib

import torch

NAMES = ("item", "tolist", "cpu", "nonzero", "__bool__", "numpy", "__int__", "__float__", "__index__")


@contextlib.contextmanager
def no_host_reads():
    saved = {name: getattr(torch.Tensor, name) for name in NAMES}

    def refuse(name):
        def f(*args, **kwargs):
            raise AssertionError(f"host read on the decode path: Tensor.{name}")

        return f

    try:
        for name in NAMES:
            setattr(torch.Tensor, name, refuse(name))
        yield
    finally:
        for name, fn in saved.items():
            setattr(torch.Tensor, name, fn)

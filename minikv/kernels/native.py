"""The C++ CPU kernels (``cpu/*.cpp``): built on first use with torch's extension loader, cached on disk.

The build needs a C++ compiler with OpenMP (g++ on Linux) and ninja; it runs once per machine and
torch version (about a minute on 2 cores) and lands in ``$MINIKV_CACHE_DIR`` (default
``~/.cache/minikv``). ``MINIKV_CPU_KERNELS=0`` skips it: the ops then run the PyTorch references.
A build that fails warns once and falls back to the references too.
"""

from __future__ import annotations

import contextlib
import functools
import os
import platform
import re
import shutil
import sys
import warnings
from pathlib import Path

import torch

SOURCES = sorted((Path(__file__).parent / "cpu").glob("*.cpp"))
ENV_SWITCH = "MINIKV_CPU_KERNELS"


def _isa() -> tuple[str, list[str]]:
    """A tag and the flags for the vector units this CPU has (the build is named after both)."""
    if platform.machine() in ("x86_64", "AMD64"):
        try:
            flags = set(Path("/proc/cpuinfo").read_text().split())
        except OSError:
            flags = set()
        if {"avx2", "fma", "f16c"} <= flags:
            return "avx2", ["-mavx2", "-mfma", "-mf16c"]
    return "base", []


def build_name() -> str:
    torch_tag = re.sub(r"[^0-9a-zA-Z]", "_", torch.__version__)
    return f"minikv_cpu_{torch_tag}_{_isa()[0]}"


def build_directory() -> Path:
    from ..models import cache_root

    return cache_root() / build_name()


@contextlib.contextmanager
def _ninja_on_path():
    """torch's loader runs ``ninja`` from PATH: add the one pip installed (the ``ninja`` dependency, in the
    environment's bin folder, which an unactivated venv leaves off PATH) for the build."""
    path = os.environ.get("PATH", "")
    if shutil.which("ninja") is None:
        try:
            import ninja

            extra = ninja.BIN_DIR
        except (ImportError, AttributeError):
            extra = str(Path(sys.executable).parent)
        os.environ["PATH"] = extra + os.pathsep + path
    try:
        yield
    finally:
        os.environ["PATH"] = path


def enabled() -> bool:
    return os.environ.get(ENV_SWITCH, "1") != "0"


@functools.cache
def available() -> bool:
    """Whether ``torch.ops.minikv_cpu`` is loaded (building it first if needed)."""
    if not enabled():
        return False
    from torch.utils import cpp_extension

    name, (_, flags) = build_name(), _isa()
    directory = build_directory()
    directory.mkdir(parents=True, exist_ok=True)
    if not (directory / f"{name}.so").exists():
        print(
            f"minikv: building the C++ CPU kernels in {directory} (once per machine and torch version)",
            file=sys.stderr,
            flush=True,
        )
    try:
        with _ninja_on_path():
            cpp_extension.load(
                name=name,
                sources=[str(s) for s in SOURCES],
                build_directory=str(directory),
                extra_cflags=["-O3", "-fopenmp", "-ffp-contract=off", *flags],
                extra_ldflags=["-fopenmp"],
                is_python_module=False,
                verbose=False,
            )
    except Exception as e:  # noqa: BLE001 - no compiler, no ninja, a broken toolchain: say so, use the reference
        warnings.warn(
            f"minikv: the C++ CPU kernels did not build ({type(e).__name__}: {str(e)[:300]}); "
            f"CPU decoding runs the PyTorch reference (slower). Set {ENV_SWITCH}=0 to skip the build.",
            RuntimeWarning,
            stacklevel=2,
        )
        return False
    return True

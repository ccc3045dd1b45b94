"""lm-evaluation-harness integration: the ``minikv_hf`` model.

``lm_eval --model minikv_hf --model_args pretrained=...,bits=2,budget=0.5 --tasks ...`` works after
``pip install minikv[eval]``: the installed ``minikv_lm_eval.pth`` adds an import hook (stdlib only)
that registers ``minikv_hf`` right after lm-eval fills its own model registry, so the built-in
models stay visible. ``minikv-lm-eval`` is the same command line with the registration done first.
Nothing here imports lm-eval until it is used.
"""

from __future__ import annotations

NAME = "minikv_hf"
TARGET = "minikv.harness.model:MiniKVLM"


def register() -> None:
    """Register ``minikv_hf`` in lm-eval's model registry (idempotent, never hides built-ins)."""
    from lm_eval.api.registry import model_registry

    if len(model_registry) == 0:  # the registry fills itself only while empty: fill it first
        import lm_eval.models  # noqa: F401
    if NAME not in model_registry:
        model_registry.register(NAME, target=TARGET)


__all__ = ["NAME", "TARGET", "register"]

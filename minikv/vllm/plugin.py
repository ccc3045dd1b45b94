"""The ``vllm.general_plugins`` entry point (``minikv = minikv.vllm.plugin:register``).

vLLM calls :func:`register` in every process it starts (API server, engine core, workers), so it is
idempotent and cheap. With ``MINIKV_VLLM`` unset it does nothing: installing minikv never changes
vLLM by itself. With it set, it checks the vLLM version and the settings (a clear error at engine
start) and registers the backend as ``CUSTOM`` (``--attention-backend CUSTOM`` on GPUs) and, on the
CPU platform, in place of ``CPU_ATTN`` (vLLM's CPU platform ignores ``--attention-backend``).
"""

from __future__ import annotations

from .settings import ENV, VLLM_VERSIONS, current

BACKEND = "minikv.vllm.backend:MiniKVAttentionBackend"


def check_version(version: str) -> None:
    minor = ".".join(version.split(".")[:2])
    if minor not in VLLM_VERSIONS:
        raise RuntimeError(
            f"{ENV}: minikv's vLLM backend supports vLLM {', '.join(v + '.x' for v in VLLM_VERSIONS)}, "
            f'found vLLM {version} (pip install "minikv[vllm]" installs a supported one)'
        )


def register() -> None:
    settings = current()  # raises on a bad value, naming it
    if settings is None:
        return
    import vllm
    from vllm.platforms import current_platform
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    check_version(vllm.__version__)
    path = BACKEND.replace(":", ".")
    register_backend(AttentionBackendEnum.CUSTOM, path)
    if current_platform.is_cpu():
        register_backend(AttentionBackendEnum.CPU_ATTN, path)

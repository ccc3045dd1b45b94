"""Start-up hook installed by minikv (``minikv_lm_eval.pth``): registers lm-eval's ``minikv_hf``.

lm-eval 0.4 has no plugin discovery and fills its model registry lazily, only while it is empty,
so registering before it would hide its built-in models. This hook therefore waits: it watches for
``lm_eval.models`` (the module that fills the registry) and registers ``minikv_hf`` as a lazy
``"module:Class"`` placeholder right after it ran. It uses the standard library only and imports
nothing else at start-up; torch and minikv load when ``minikv_hf`` is actually asked for.
"""

from __future__ import annotations

import importlib.machinery
import sys

WATCHED = "lm_eval.models"


def _register() -> None:
    try:
        from minikv.harness import register
    except ImportError:  # minikv uninstalled but this file left behind: stay out of lm-eval's way
        return
    register()


class _LmEvalModelsFinder:
    """Meta-path finder that only wraps the loader of ``lm_eval.models`` (one line of work)."""

    def find_spec(self, name, path=None, target=None):
        if name != WATCHED:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return None
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            _register()

        spec.loader.exec_module = exec_module  # this loader instance serves this import only
        return spec

    def invalidate_caches(self):
        pass


def install() -> None:
    if not any(isinstance(f, _LmEvalModelsFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _LmEvalModelsFinder())
    if WATCHED in sys.modules:  # lm-eval already loaded its registry
        _register()


install()

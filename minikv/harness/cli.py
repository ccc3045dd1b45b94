"""``minikv-lm-eval``: lm-eval's own command line with ``minikv_hf`` registered first.

Same arguments as ``lm_eval`` (``minikv-lm-eval --model minikv_hf --model_args ... --tasks ...``);
useful where the ``.pth`` hook is not installed (e.g. a non-pip install of minikv).
"""

from __future__ import annotations


def main() -> None:
    from lm_eval.__main__ import cli_evaluate

    from . import register

    register()
    cli_evaluate()


if __name__ == "__main__":
    main()

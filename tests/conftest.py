import os
import sys

# the Triton kernels are tested on CPU through the interpreter; this must precede any triton import.
# MINIKV_TEST_CUDA=1 (benchmarks/run_gpu.sh) compiles them for the GPU instead (tests/test_cuda.py)
if os.environ.get("MINIKV_TEST_CUDA") != "1":
    os.environ["TRITON_INTERPRET"] = "1"

sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402


@pytest.fixture(autouse=True, scope="session")
def _quiet_torchao():
    # transformers imports torchao, which logs about CUDA-only extensions; import it once quietly
    from minikv.kernels.quant import _torchao

    _torchao()

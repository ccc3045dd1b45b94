import os
import sys

# the Triton kernels are tested on CPU through the interpreter; this must precede any triton import.
# MINIKV_TEST_CUDA=1 (benchmarks/run_gpu.sh) compiles them for the GPU instead (tests/test_cuda.py)
if os.environ.get("MINIKV_TEST_CUDA") != "1":
    os.environ["TRITON_INTERPRET"] = "1"

sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402


def pytest_configure(config):
    # under pytest-xdist each worker gets its share of the cores (torch would take them all in every worker)
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        import torch

        torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))


@pytest.fixture(autouse=True, scope="session")
def _quiet_torchao():
    # transformers imports torchao, which logs about CUDA-only extensions; import it once quietly
    from minikv.kernels.quant import _torchao

    _torchao()

import subprocess
import sys


def test_import_is_light_and_patches_nothing():
    code = (
        "import sys, minikv\n"
        "assert 'triton' not in sys.modules, 'triton imported'\n"
        "assert 'transformers' not in sys.modules, 'transformers imported'\n"
        "assert not ('torch' in sys.modules and sys.modules['torch'].cuda.is_initialized()), 'CUDA initialised'\n"
        "print(sorted(minikv.__all__))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "patch" in out.stdout


def test_importing_transformers_after_minikv_has_no_minikv_registration():
    code = (
        "import minikv\n"
        "from transformers import AttentionInterface\n"
        "assert 'minikv' not in AttentionInterface._global_mapping\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr

"""The code passes the linter and the formatter configured in pyproject.toml (ruff: pyflakes, pycodestyle,
import order; ruff format, 120 columns)."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _ruff():
    ruff = shutil.which("ruff") or shutil.which("ruff", path=str(Path(sys.executable).parent))
    if ruff is None:
        pytest.skip("ruff is not installed (pip install -e '.[test]' installs it)")
    return ruff


def test_ruff_finds_nothing():
    out = subprocess.run([_ruff(), "check", "--no-cache", str(ROOT)], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stdout + out.stderr


def test_the_code_is_formatted():
    """`ruff format` leaves every file as it is (run it to fix)."""
    out = subprocess.run(
        [_ruff(), "format", "--check", "--no-cache", str(ROOT)], capture_output=True, text=True, cwd=ROOT
    )
    assert out.returncode == 0, out.stdout + out.stderr

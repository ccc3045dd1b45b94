"""The benchmark scripts keep running (tiny shapes on CPU; their numbers are not results)."""

import csv
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("script", ["bench_decode.py", "bench_prefill.py", "bench_quantize.py"])
def test_benchmark_quick_run_writes_a_csv(script, tmp_path):
    out = tmp_path / "r.csv"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), "--quick", "--device", "cpu", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = list(csv.DictReader(out.open()))
    assert rows and {"provider", "median_ms", "device", "torch"} <= set(rows[0])
    assert all(float(r["median_ms"]) > 0 for r in rows)


def test_generate_benchmark_runs_on_smollm2(tmp_path):
    out = tmp_path / "g.csv"
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "bench_generate.py"),
            "--context",
            "64",
            "--new",
            "3",
            "--providers",
            "minikv-eager,hf-dynamic",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = {r["provider"]: r for r in csv.DictReader(out.open())}
    assert set(rows) == {"minikv-eager", "hf-dynamic"}
    assert float(rows["minikv-eager"]["kv_MiB"]) > 0 and float(rows["hf-dynamic"]["decode_tokens_per_s"]) > 0


def test_paged_benchmark_quick_run_writes_a_csv(tmp_path):
    out = tmp_path / "p.csv"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_paged.py"), "--quick", "--device", "cpu", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = list(csv.DictReader(out.open()))
    assert {r["provider"] for r in rows} >= {"minikv-paged K4V2", "sdpa_bf16"}
    assert all(float(r["us"]) > 0 and float(r["bytes_vs_bf16"]) > 0 for r in rows)

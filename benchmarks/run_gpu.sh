#!/usr/bin/env bash
# All kernel benchmarks on the first CUDA device; CSVs in benchmarks/results/.
set -euo pipefail
cd "$(dirname "$0")/.."
python benchmarks/bench_quantize.py --device cuda
python benchmarks/bench_decode.py --device cuda --bits 2 --group 32
python benchmarks/bench_prefill.py --device cuda

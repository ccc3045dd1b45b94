#!/usr/bin/env bash
# Everything only a GPU can show, on the first CUDA device (one `device` call): the CUDA tests first
# (kernels compiled, not interpreted: codes equal to the reference, decode within the error budget,
# patched generation equal to the reference path, compiled decode with CUDA graphs replaying), then
# every benchmark table as CSVs in benchmarks/results/.
set -euo pipefail
cd "$(dirname "$0")/.."
MINIKV_TEST_CUDA=1 python -m pytest -q tests/test_cuda.py
# issue 21: vLLM's pages read in place (Llama-3.1-8B heads, 8k/32k/128k, batch 1/8/32) against bf16 SDPA
# and flash_attn_with_kvcache (bf16/fp8 pages) when installed; the CUDA-graph replay test is in test_cuda.py
python benchmarks/bench_paged.py --device cuda
python benchmarks/bench_quantize.py --device cuda
python benchmarks/bench_decode.py --device cuda --bits 2 --group 32
python benchmarks/bench_decode.py --device cuda --bits 2 --k-bits 4 --group 32 --out benchmarks/results/decode_k4v2.csv
python benchmarks/bench_prefill.py --device cuda
# issue 4: Llama-3.1-8B-shaped decode (eager / compiled / CUDA graphs vs HF static compiled, dynamic,
# quantized), batch 1/8/32 at 4k and 32k, peak memory; and whether compiling the prefill pays off
python benchmarks/bench_generate.py --llama8b --device cuda --batch 1 8 32 --context 4096 32768 --new 64 \
    --out benchmarks/results/generate_llama8b_cuda.csv
python benchmarks/bench_prefill_compile.py --device cuda --lengths 4096 8192 16384 \
    --out benchmarks/results/prefill_compile_cuda.csv
# issue 21: vllm.LLM output tokens/s with and without the plugin (skipped without vLLM on the machine)
python benchmarks/vllm_throughput.py --prompts 32 --prompt-tokens 4096 --new 128

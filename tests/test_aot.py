"""Every Triton kernel compiles for an H100 (sm_90) and an A100 (sm_80) without a GPU, through its real
launcher: no compile error, no register spills in fp16/bf16 at head_dim 64/128/256, and the decode
kernels' main loops (the contiguous store's and vLLM's pages') request each packed byte about once (``benchmarks/aot_check.py``)."""

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

pytest.importorskip("triton")
pytestmark = pytest.mark.aot  # deselected by default (pyproject addopts): CI stage 2 runs it


@pytest.fixture(scope="module")
def table(tmp_path_factory):
    out = tmp_path_factory.mktemp("aot") / "aot"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # a real compile, not the interpreter
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "aot_check.py"), "--quick", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=900,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return list(csv.DictReader(out.with_suffix(".csv").open()))


def test_every_kernel_compiles_for_sm90_and_sm80(table):
    seen = {(r["arch"], r["kernel"]) for r in table}
    kernels = {"decode_attention", "paged_attention", "merge_splits", "prefill_forward", "prefill_scores"}
    kernels |= {"quantize_pack", "append"}
    assert seen == {(arch, k) for arch in ("sm_90", "sm_80") for k in kernels}
    for kernel in ("decode_attention", "paged_attention"):
        assert {int(r["D"]) for r in table if r["kernel"] == kernel} == {64, 128, 256}
    assert all(int(r["regs"]) > 0 and int(r["ctas_per_sm"]) >= 1 for r in table)


def test_no_spills_in_half_precision_attention(table):
    spilled = [
        (r["arch"], r["kernel"], r["dtype"], r["D"], r["spill_stores"])
        for r in table
        if r["kernel"] != "quantize_pack" and (int(r["spill_stores"]) or int(r["spill_loads"]))
    ]
    assert not spilled


def test_quantizers_are_compiled_without_fma_contraction(table):
    """Codes equal the reference only if each fp32 product is rounded before its sum, as in the reference
    (and the interpreter): no fused multiply-add in the PTX of the quantize and append kernels."""
    rows = [r for r in table if r["kernel"] in ("quantize_pack", "append")]
    assert rows and all(int(r["fma_f32"]) == 0 for r in rows)
    assert any(int(r["fma_f32"]) > 0 for r in table if r["kernel"] == "decode_attention")  # the count sees FMAs


@pytest.mark.parametrize("kernel", ["decode_attention", "paged_attention"])
def test_decode_main_loop_loads_each_packed_byte_about_once(table, kernel):
    """The paged kernel's loop also loads its page id from the block table once per tile."""
    ratios = {
        (r["arch"], r["dtype"], r["D"], r["k_bits"], r["v_bits"], r["Lq"], r["keys"]): float(r["loads_per_packed_byte"])
        for r in table
        if r["kernel"] == kernel
    }
    assert len(ratios) == {"decode_attention": 24, "paged_attention": 48}[kernel], sorted(ratios)
    assert max(ratios.values()) <= 1.25, ratios


# ---- the PTX reading the check relies on ------------------------------------------------------

PTX = """
.visible .entry k(
)
{
	ld.global.b32 	%r1, [%rd1];
$L__BB0_2:
	@%p1 ld.global.v4.b32 	{ %r2, %r3, %r4, %r5 }, [%rd2];
	ld.global.b16 	%rs1, [%rd3];
	cp.async.cg.shared.global [ %r6 + 0 ], [ %rd4 + 0 ], 0x10, %r7;
	@%p2 bra 	$L__BB0_2;
$L__BB0_3:
	ld.global.v2.b32 	{ %r8, %r9 }, [%rd5];
	bra.uni 	$L__BB0_3;
}
"""


def test_ptx_loops_and_load_widths():
    import aot_check

    bodies = aot_check.loops(PTX)
    assert len(bodies) == 2 and bodies[0][0] == "$L__BB0_2:"
    assert aot_check.loop_load_bytes(PTX, threads=128) == 128 * (16 + 2 + 16)  # the first loop only
    assert aot_check.load_bytes("ld.global.v2.b32", "{ %r8, %r9 }, [%rd5]") == 8


def test_ptxas_report_and_occupancy():
    import aot_check

    log = (
        "ptxas info    : Function properties for k\n    8 bytes stack frame, 8 bytes spill stores, 4 bytes spill loads\n"
        "ptxas info    : Used 255 registers, used 1 barriers\n"
    )
    assert aot_check.ptxas_resources(log) == dict(regs=255, spill_stores=8, spill_loads=4, stack=8)
    assert aot_check.occupancy(90, regs=128, num_warps=4, shared=0) == 4  # 65536 / (128 * 128)
    assert aot_check.occupancy(90, regs=64, num_warps=4, shared=100_000) == 2  # shared memory bound
    with pytest.raises(RuntimeError, match="no ptxas report"):
        aot_check.ptxas_resources("nothing")

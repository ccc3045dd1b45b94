"""Ahead-of-time compilation of every minikv Triton kernel for an H100 (sm_90) and an A100 (sm_80),
on a machine without a GPU: compile errors, registers, spills, shared memory, occupancy, and the
global-load bytes the decode kernels' main loops (the contiguous store, vLLM's pages) issue per
packed byte they cover.

    python benchmarks/aot_check.py                 # the full grid, sm_90 and sm_80 (a few minutes)
    python benchmarks/aot_check.py --quick         # the named shapes only (what the tests run)

Each configuration goes through the kernel's real launcher (``minikv/kernels/triton_*.py``) with CPU
tensors of the real shapes and dtypes, so the specialisation (constexprs, divisibility, integers
equal to 1) is the one a GPU launch would get; only the launch itself is replaced by Triton's
``warmup`` compile for the chosen target. Resources come from ptxas' own ``-v`` report
(``TRITON_DUMP_PTXAS_LOG``); shared memory from the compiled kernel's metadata. Writes
``<out>.csv`` and ``<out>.md`` (default ``benchmarks/results/aot``). Must run without
``TRITON_INTERPRET`` (the tests start it in a subprocess).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import itertools
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime import driver  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from minikv.kernels import triton_append, triton_decode, triton_paged, triton_prefill, triton_quant  # noqa: E402
from minikv.vllm.layout import PageLayout  # noqa: E402

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
SM = {  # per-SM limits used for the occupancy estimate
    90: dict(regs=65536, smem=233472, threads=2048, ctas=32),
    80: dict(regs=65536, smem=167936, threads=2048, ctas=32),
}


class TargetDriver:
    """Stands in for the CUDA driver while compiling: device 0, stream 0, ``target``; nothing launches."""

    def __init__(self, arch: int):
        self.target = GPUTarget("cuda", arch, 32)

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return self.target

    def get_active_torch_device(self):
        return torch.device("cpu")


@dataclass
class Compiled:
    kernel: str
    constexprs: dict
    ptx: str
    shared: int
    num_warps: int
    num_stages: int
    ptxas_log: str = field(repr=False)


@contextlib.contextmanager
def compiling_for(arch: int, module, names: list[str], out: list[Compiled]):
    """Within: launches of ``module.<names>`` compile for ``arch`` (warmup) and are appended to ``out``."""
    jits = {n: getattr(module, n) for n in names}

    class Launch:
        def __init__(self, name):
            self.name = name

        def __getitem__(self, grid):
            def go(*args, **kwargs):
                jit = jits[self.name]
                log = io.StringIO()
                with contextlib.redirect_stdout(log):
                    ck = jit.run(*args, grid=grid, warmup=True, **kwargs)
                const = {k: v for k, v in kwargs.items() if k.isupper()}
                md = ck.metadata
                out.append(
                    Compiled(self.name, const, ck.asm["ptx"], md.shared, md.num_warps, md.num_stages, log.getvalue())
                )

            return go

    previous = driver._active  # None without a GPU (reading .active would look for a driver)
    driver.set_active(TargetDriver(arch))
    for n, jit in jits.items():
        jit.device_caches.clear()  # binders remember their target
        setattr(module, n, Launch(n))
    try:
        yield
    finally:
        for n, jit in jits.items():
            setattr(module, n, jit)
            jit.device_caches.clear()
        driver._active = previous


# ---- the configurations: real shapes through the real launchers ---------------------------------


def decode_case(
    dtype: str,
    D: int,
    k_bits: int,
    v_bits: int,
    G: int,
    g: int,
    Lq: int,
    Hkv: int = 2,
    C: int = 1024,
    R: int = 128,
    S: int = 4,
):
    dt = DTYPES[dtype]
    B = 1
    q = torch.zeros(B, Hkv * g, Lq, D, dtype=dt)
    k = (
        torch.zeros(B, Hkv, D, C * k_bits // 32, dtype=torch.int32),
        torch.zeros(B, Hkv, D, C // G, dtype=torch.float16),
        torch.zeros(B, Hkv, D, C // G, dtype=torch.float16),
    )
    v = (
        torch.zeros(B, Hkv, C, D * v_bits // 32, dtype=torch.int32),
        torch.zeros(B, Hkv, C, D // G, dtype=torch.float16),
        torch.zeros(B, Hkv, C, D // G, dtype=torch.float16),
    )
    n = torch.zeros(B, dtype=torch.int64)
    res = torch.zeros(B, Hkv, S + R, D, dtype=dt)
    n_packed = torch.zeros(B, Hkv, dtype=torch.int64)  # per KV head
    triton_decode.decode_attention(q, *k, *v, n_packed, res, res, n, 0.1, 0.0, k_bits, v_bits, G)


def paged_case(
    dtype: str,
    D: int,
    k_bits: int,
    v_bits: int,
    G: int,
    g: int,
    Lq: int = 1,
    N: int = 256,
    Hkv: int = 8,
    keys: str = "channel",
):
    """vLLM's pages (minikv.vllm.layout) of a cache tensor in the model dtype, a block table, lengths;
    ``Lq`` new queries per sequence (1: decode; more: a prefill chunk over its stored context)."""
    dt = DTYPES[dtype]
    lay = PageLayout(D, N, dt, k_bits, v_bits, G, keys == "token")
    B, nb = 4, 8
    cache = torch.zeros(16, Hkv, N, lay.slot_bytes // dt.itemsize, dtype=dt)
    views = lay.views(cache)
    regions = [
        views.get(n, views["v_codes"][:, :, :0])
        for n in ("k_codes", "k_scale", "k_mn", "v_codes", "v_scale", "v_mn", "k_res")
    ]
    table = torch.zeros(B, nb, dtype=torch.int32)
    lens = torch.zeros(B, dtype=torch.int32)
    q = torch.zeros(B, Hkv * g, Lq, D, dtype=dt)
    triton_paged.paged_attention(q, *regions, table, lens, lens, 0.1, 0.0, k_bits, v_bits, G, keys == "token")


def prefill_case(dtype: str, D: int, g: int = 4, T: int = 512, Hkv: int = 2):
    dt = DTYPES[dtype]
    q = torch.zeros(1, Hkv * g, T, D, dtype=dt)
    k = torch.zeros(1, Hkv, T, D, dtype=dt)
    valid = torch.ones(1, T, dtype=torch.bool)
    triton_prefill.prefill_attention(q, k, k, valid, torch.ones(1, T), 0.1, 0.0)


def quantize_case(dtype: str, bits: int, G: int, keys: bool, D: int = 128, tokens: int = 128):
    x = torch.zeros(2, 2, tokens, D, dtype=DTYPES[dtype])
    triton_quant.quantize_pack(x.transpose(-1, -2) if keys else x, bits, G, clip=True)


def append_case(
    dtype: str, D: int, k_bits: int, v_bits: int, G: int, R: int = 128, Hkv: int = 2, C: int = 1024, S: int = 4
):
    dt = DTYPES[dtype]
    k = torch.zeros(1, Hkv, 1, D, dtype=dt)
    store = (
        torch.zeros(1, Hkv, D, C * k_bits // 32, dtype=torch.int32),
        torch.zeros(1, Hkv, D, C // G, dtype=torch.float16),
        torch.zeros(1, Hkv, D, C // G, dtype=torch.float16),
        torch.zeros(1, Hkv, C, D * v_bits // 32, dtype=torch.int32),
        torch.zeros(1, Hkv, C, D // G, dtype=torch.float16),
        torch.zeros(1, Hkv, C, D // G, dtype=torch.float16),
    )
    res = torch.zeros(1, Hkv, S + R, D, dtype=dt)
    n = torch.zeros(1, dtype=torch.int64)
    n_packed = torch.zeros(1, Hkv, dtype=torch.int64)  # per KV head
    triton_append.append_kv(k, k, *store, n_packed, res, res.clone(), n.clone(), n.clone(), k_bits, v_bits, G, R, True)


BIT_PAIRS = [(2, 2), (4, 2), (4, 4)]
ROWS = [(1, 1), (4, 1), (8, 4)]  # (query heads per KV head, new queries): 1, 4 and 32 rows


def configurations(quick: bool) -> list[tuple[str, dict, callable]]:
    """(kernel family, parameters, case) triples; ``quick``: the named shapes in fp16/bf16."""
    dtypes = ["fp16", "bf16"] if quick else list(DTYPES)
    groups = [32] if quick else [16, 32, 64]
    rows = [(4, 1)] if quick else ROWS
    pairs = [(2, 2), (4, 2)] if quick else BIT_PAIRS
    out = []
    for dtype, D, (kb, vb), G, (g, Lq) in itertools.product(dtypes, (64, 128, 256), pairs, groups, rows):
        if D % G == 0:
            p = dict(dtype=dtype, D=D, k_bits=kb, v_bits=vb, G=G, g=g, Lq=Lq)
            out.append(("decode", p, lambda p=p: decode_case(**p)))
    # (g, Lq, keys): decode, a prefill chunk; keys per channel (the default) or per token
    paged_rows = [(4, 1, "channel"), (4, 16, "channel"), (4, 1, "token")]
    if not quick:
        paged_rows += [(1, 1, "channel"), (8, 1, "channel"), (4, 16, "token")]
    for dtype, D, (kb, vb), G, (g, Lq, keys) in itertools.product(dtypes, (64, 128, 256), pairs, groups, paged_rows):
        if quick and (kb, vb) != (4, 2) and (Lq, keys) != (1, "channel"):
            continue  # quick: chunks and per-token keys at the defaults' widths only
        if D % G == 0:
            p = dict(dtype=dtype, D=D, k_bits=kb, v_bits=vb, G=G, g=g, Lq=Lq, keys=keys)
            out.append(("paged", p, lambda p=p: paged_case(**p)))
    for dtype, D in itertools.product(dtypes, (64, 128, 256)):
        p = dict(dtype=dtype, D=D)
        out.append(("prefill", p, lambda p=p: prefill_case(**p)))
    for dtype, D, (kb, vb), G in itertools.product(
        dtypes[:1] if quick else dtypes, (64, 128, 256), [(4, 2)] if quick else pairs, groups
    ):
        p = dict(dtype=dtype, D=D, k_bits=kb, v_bits=vb, G=G)
        out.append(("append", p, lambda p=p: append_case(**p)))
    for dtype, bits, G, keys in itertools.product(dtypes[:1] if quick else dtypes, (2, 4), groups, (True, False)):
        p = dict(dtype=dtype, bits=bits, G=G, keys=keys)
        out.append(("quantize", p, lambda p=p: quantize_case(**p)))
    return out


LAUNCHED = {
    "decode": (triton_decode, ["_decode_attention_kernel"]),
    "paged": (triton_paged, ["_paged_attention_kernel", "_merge_splits_kernel"]),
    "prefill": (triton_prefill, ["_prefill_forward_kernel", "_prefill_scores_kernel"]),
    "quantize": (triton_quant, ["_quantize_pack_kernel"]),
    "append": (triton_append, ["_append_kernel"]),
}


# ---- reading the results ----------------------------------------------------------------------


def ptxas_resources(log: str) -> dict:
    """Registers, spill stores/loads (bytes per thread) and stack from ptxas' ``-v`` report."""
    regs = re.search(r"Used (\d+) registers", log)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    stack = re.search(r"(\d+) bytes stack frame", log)
    if regs is None:
        raise RuntimeError(f"no ptxas report in the compile log:\n{log[-2000:]}")
    return dict(
        regs=int(regs[1]),
        spill_stores=int(spills[1]) if spills else 0,
        spill_loads=int(spills[2]) if spills else 0,
        stack=int(stack[1]) if stack else 0,
    )


def occupancy(arch: int, regs: int, num_warps: int, shared: int) -> int:
    """CTAs per SM allowed by registers (allocated per warp in units of 256), shared memory, threads."""
    lim = SM[arch]
    per_warp = -(-regs * 32 // 256) * 256
    by_regs = lim["regs"] // (per_warp * num_warps)
    by_smem = lim["smem"] // shared if shared else lim["ctas"]
    return min(by_regs, by_smem, lim["threads"] // (32 * num_warps), lim["ctas"])


_LOAD = re.compile(r"^\s*(?:@!?%p\d+\s+)?(ld\.global[\w.]*|cp\.async\.(?:ca|cg)\.shared\.global[\w.]*)\s+(.*);")
_WIDTH = {
    "b8": 1,
    "u8": 1,
    "s8": 1,
    "b16": 2,
    "u16": 2,
    "s16": 2,
    "f16": 2,
    "b32": 4,
    "u32": 4,
    "s32": 4,
    "f32": 4,
    "b64": 8,
    "u64": 8,
    "s64": 8,
    "f64": 8,
    "b128": 16,
}


def load_bytes(instr: str, operands: str) -> int:
    """Bytes one thread requests with one global load (``ld.global[.vN].type``) or ``cp.async`` (its cp-size)."""
    if instr.startswith("cp.async"):
        return int(operands.split(",")[2].strip(), 0)
    parts = instr.split(".")
    vec = next((int(p[1:]) for p in parts if re.fullmatch(r"v\d", p)), 1)
    return vec * _WIDTH[parts[-1]]


def loops(ptx: str) -> list[list[str]]:
    """Bodies of the PTX loops (a label and a later branch back to it), in program order."""
    lines = ptx.splitlines()
    labels = {m[1]: i for i, line in enumerate(lines) if (m := re.match(r"^(\$L__\w+):", line))}
    out = []
    for i, line in enumerate(lines):
        m = re.search(r"\bbra(?:\.uni)?\s+(\$L__\w+);", line)
        if m and m[1] in labels and labels[m[1]] < i:
            out.append((labels[m[1]], lines[labels[m[1]] : i + 1]))
    return [body for _, body in sorted(out)]


def loop_load_bytes(ptx: str, threads: int) -> int:
    """Global-load bytes one iteration of the kernel's first loop (the packed tokens) issues per CTA."""
    body = loops(ptx)[0]
    return threads * sum(load_bytes(m[1], m[2]) for line in body if (m := _LOAD.match(line)))


def decode_packed_bytes(c: Compiled) -> int:
    """Store bytes one decode tile covers: BT tokens x D channels of key and value codes plus their
    fp16 scales and minimums (keys: per channel per G tokens; values: per token per G channels)."""
    k = c.constexprs
    bt, d, g = k["BT"], k["D"], k["G"]
    codes = bt * d * (k["K_BITS"] + k["V_BITS"]) // 8
    return codes + 2 * 2 * (d * bt // g) * 2


def rows_of(arch: int, family: str, params: dict, compiled: list[Compiled]) -> list[dict]:
    out = []
    for c in compiled:
        res = ptxas_resources(c.ptxas_log)
        row = dict(
            arch=f"sm_{arch}",
            kernel=c.kernel.strip("_").removesuffix("_kernel"),
            **{k: params.get(k, "") for k in ("dtype", "D", "k_bits", "v_bits", "bits", "G", "g", "Lq", "keys")},
            BT=c.constexprs.get("BT", ""),
            num_warps=c.num_warps,
            num_stages=c.num_stages,
            **res,
            shared=c.shared,
            ctas_per_sm=occupancy(arch, res["regs"], c.num_warps, c.shared),
            fma_f32=len(re.findall(r"\bfma\.rn(?:\.ftz)?\.f32\b", c.ptx)),
        )
        if c.kernel in ("_decode_attention_kernel", "_paged_attention_kernel"):  # the main loops
            issued = loop_load_bytes(c.ptx, 32 * c.num_warps)
            row["loop_load_bytes"] = issued
            row["packed_bytes"] = decode_packed_bytes(c)
            row["loads_per_packed_byte"] = round(issued / row["packed_bytes"], 3)
        out.append(row)
    return out


def run(quick: bool, archs: list[int]) -> list[dict]:
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("aot_check compiles for a GPU: run it without TRITON_INTERPRET=1")
    os.environ["TRITON_ALWAYS_COMPILE"] = "1"  # a cached kernel would print no ptxas report
    os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"
    rows = []
    for arch in archs:
        for family, params, case in configurations(quick):
            module, names = LAUNCHED[family]
            compiled: list[Compiled] = []
            with compiling_for(arch, module, names, compiled):
                case()
            rows += rows_of(arch, family, params, compiled)
    return rows


def byte_model(G: int = 32) -> list[dict]:
    """Bytes one cached token costs per KV head in the packed store (codes + fp16 scales and minimums:
    keys per channel per G tokens, values per token per G channels) vs an fp16 cache, and the decode
    speedup over SDPA fp16 that implies when both read their bytes at the same bandwidth."""
    out = []
    for D, (kb, vb) in itertools.product((64, 128, 256), BIT_PAIRS):
        packed = D * (kb + vb) / 8 + 2 * 2 * D / G + 2 * 2 * (D // G)
        fp16 = 2 * D * 2
        out.append(
            dict(
                D=D,
                k_bits=kb,
                v_bits=vb,
                G=G,
                packed_bytes_per_token=packed,
                fp16_bytes_per_token=fp16,
                fraction_of_fp16=round(packed / fp16, 4),
                speedup_bound=round(fp16 / packed, 2),
            )
        )
    return out


def markdown(rows: list[dict]) -> str:
    cols = [
        "arch",
        "kernel",
        "dtype",
        "D",
        "k_bits",
        "v_bits",
        "bits",
        "keys",
        "G",
        "g",
        "Lq",
        "BT",
        "num_warps",
        "regs",
        "spill_stores",
        "spill_loads",
        "shared",
        "ctas_per_sm",
        "loads_per_packed_byte",
    ]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(r.get(c, "")) for c in cols) + " |" for r in rows]
    return (
        "\n".join(lines)
        + f"\n\ntriton {triton.__version__}, torch {torch.__version__}; `python benchmarks/aot_check.py`\n"
    )


def summary(rows: list[dict]) -> str:
    """One line per (arch, kernel, dtype, head_dim) over every bit width, group size and row count:
    register range, worst spill, most shared memory, fewest CTAs per SM, worst load bytes per packed byte."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["arch"], r["kernel"], r["dtype"], r["D"]), []).append(r)
    lines = [
        "| arch | kernel | dtype | D | configs | regs | max spill st/ld (B/thread) | max shared (B) | min CTAs/SM "
        "| max load B per packed B |",
        "|" + "---|" * 10,
    ]
    for (arch, kernel, dtype, D), rs in groups.items():
        regs = sorted(int(r["regs"]) for r in rs)
        spill = max((int(r["spill_stores"]), int(r["spill_loads"])) for r in rs)
        loads = [float(r["loads_per_packed_byte"]) for r in rs if str(r.get("loads_per_packed_byte", "")) != ""]
        lines.append(
            f"| {arch} | {kernel} | {dtype} | {D} | {len(rs)} | {regs[0]}-{regs[-1]} | {spill[0]}/{spill[1]} | "
            f"{max(int(r['shared']) for r in rs)} | {min(int(r['ctas_per_sm']) for r in rs)} | "
            f"{max(loads) if loads else ''} |"
        )
    return "\n".join(lines) + "\n"


def write(rows: list[dict], out: Path) -> None:
    """``out.csv`` (every row) and ``out.md`` (the table and the byte model); prints the markdown."""
    out.parent.mkdir(parents=True, exist_ok=True)
    fields = list(dict.fromkeys(k for r in rows for k in r))
    with open(out.with_suffix(".csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)
    model = byte_model()
    cols = list(model[0])
    text = (
        "## Summary\n\n"
        + summary(rows)
        + "\n## Every configuration\n\n"
        + markdown(rows)
        + "\n## Byte model (per token and KV head, packed store vs fp16)\n\n"
        + "\n".join(
            ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
            + ["| " + " | ".join(str(r[c]) for c in cols) + " |" for r in model]
        )
        + "\n"
    )
    out.with_suffix(".md").write_text(text)
    print(text)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="the named shapes in fp16/bf16 (what the tests run)")
    p.add_argument("--arch", type=int, nargs="+", default=[90, 80], choices=sorted(SM))
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "aot"))
    args = p.parse_args()
    write(run(args.quick, args.arch), Path(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The CPU kernels (``minikv.kernels.cpu_ops``): the C++ quantizer and decode attention, and the append
that quantizes only full residuals, against the references.

Codes, scales and minimums equal the reference's bit for bit; attention outputs are within the error
budget of fp64 attention over the dequantized store; the append leaves every buffer as the
reference's branch-free append does.
"""

import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_ops import _dense_fp64, _filled_store, _store

from minikv.kernels import cpu_ops, native, ops, quant, reference
from minikv.kernels.quant import unpack_dequantize

pytestmark = pytest.mark.skipif(not native.enabled(), reason=f"{native.ENV_SWITCH}=0: the references run")


def test_the_cpu_kernels_build_on_this_machine():
    """The README's machine has a compiler: the build must not silently fall back to the references."""
    assert native.available()
    assert os.path.exists(native.build_directory() / f"{native.build_name()}.so")


def test_the_ops_run_the_cpu_kernels_on_cpu_tensors():
    buf, n_packed, res_k, res_v, res_len = _filled_store(1, 2, 16, 2, 16, 32, [32], [3])
    with torch.profiler.profile() as prof:
        ops.decode_attention(torch.randn(1, 4, 1, 16), *buf, n_packed, res_k, res_v, res_len, 0.25, 0.0, 2, 2, 16)
        ops.quantize_pack(torch.randn(2, 64), 2, 16)
    names = {e.key for e in prof.key_averages()}
    assert {"minikv_cpu::decode_attention", "minikv_cpu::quantize_pack"} <= names


# ---- quantize + pack: bit for bit ----------------------------------------------------------------
def _assert_same_quantization(x, bits, G, clip):
    want = quant.quantize_pack(x, bits, G, clip)
    got = cpu_ops.quantize_pack(x, bits, G, clip)
    assert torch.equal(got[0], want[0]), "codes"
    for a, b in zip(got[1:], want[1:]):  # fp16 scale and minimum: equal values, NaN where the reference has NaN
        assert a.dtype == b.dtype == torch.float16 and a.shape == b.shape
        assert torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(0), b.nan_to_num(0))


@settings(max_examples=60, deadline=None)
@given(
    rows=st.integers(1, 6),
    groups=st.integers(1, 5),
    bits=st.sampled_from([2, 4]),
    G=st.sampled_from([16, 32, 64]),
    clip=st.booleans(),
    log_scale=st.floats(-7, 4),
    dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
    seed=st.integers(0, 2**16),
)
def test_quantize_pack_codes_equal_the_reference(rows, groups, bits, G, clip, log_scale, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(rows, groups * G, generator=g) * 10**log_scale).to(dtype)
    _assert_same_quantization(x, bits, G, clip)
    _assert_same_quantization(x.t().contiguous().t(), bits, G, clip)  # strided (keys arrive transposed)


@pytest.mark.parametrize("clip", [False, True])
@pytest.mark.parametrize("bits,G", [(2, 16), (4, 8), (4, 32)])
def test_quantize_pack_edge_groups_equal_the_reference(clip, bits, G):
    x = torch.randn(8, 2 * G)
    x[0, 3] = float("nan")  # poisons its group only
    x[1, G + 1] = float("inf")
    x[2, :G] = 1.5  # constant: the smallest scale, exact round trip
    x[3, G:] = -float("inf")
    x[4] = 7e4 * torch.randn(2 * G)  # beyond fp16's range
    x[5] = torch.randn(2 * G) * 1e-9  # below fp16's smallest normal
    x[6, :G] = torch.tensor([0.0, -0.0] * (G // 2))
    x[7] = torch.linspace(-1, 1, 2 * G)
    _assert_same_quantization(x, bits, G, clip)


# ---- decode attention: within the error budget ---------------------------------------------------
def _fp64_decode(q, buf, n_packed, res_k, res_v, res_len, k_bits, v_bits, G, scale, softcap):
    """Attention over [dequantized store ; residual] per sequence in fp64, causal among the new queries."""
    B, Hq, Lq, D = q.shape
    K = unpack_dequantize(buf[0], buf[1], buf[2], k_bits, G, torch.float64).transpose(-1, -2)
    V = unpack_dequantize(buf[3], buf[4], buf[5], v_bits, G, torch.float64)
    out = torch.zeros(B, Hq, Lq, D, dtype=torch.float64)
    Hkv = res_k.shape[1]
    g = Hq // Hkv
    for b in range(B):
        for h in range(Hkv):  # each KV head holds its own count of packed tokens
            n, r = int(n_packed[b, h]), int(res_len[b])
            keys = torch.cat([K[b : b + 1, h : h + 1, :n], res_k[b : b + 1, h : h + 1, :r].double()], 2)
            vals = torch.cat([V[b : b + 1, h : h + 1, :n], res_v[b : b + 1, h : h + 1, :r].double()], 2)
            N = n + r
            allowed = torch.arange(N)[None, :] < (N - (Lq - 1 - torch.arange(Lq)))[:, None]
            if N:
                rows = slice(h * g, (h + 1) * g)
                out[b : b + 1, rows] = _dense_fp64(q[b : b + 1, rows], keys, vals, allowed[None, None], scale, softcap)[
                    0
                ]
    return out


def _mixed_store(B, Hkv, D, k_bits, v_bits, G, R, n_packed, res_len, seed=0):
    """n_packed: per sequence, or per sequence and KV head (nested lists)."""
    g = torch.Generator().manual_seed(seed)
    n_packed = torch.tensor(n_packed).view(B, -1).expand(B, Hkv).contiguous()
    C = -(-(int(n_packed.max()) + G) // G) * G
    buf = _store(B, Hkv, D, C, 4, G)
    k, v = torch.randn(B, Hkv, C, D, generator=g), torch.randn(B, Hkv, C, D, generator=g)
    buf[0], buf[1], buf[2] = quant.quantize_pack(k.transpose(-1, -2), k_bits, G)
    buf[3], buf[4], buf[5] = quant.quantize_pack(v, v_bits, G)
    res_k, res_v = torch.randn(B, Hkv, R, D, generator=g), torch.randn(B, Hkv, R, D, generator=g)
    return buf, n_packed, res_k, res_v, torch.tensor(res_len)


@pytest.mark.parametrize("D", [64, 96, 256])
@pytest.mark.parametrize("Hq,Hkv", [(9, 3), (4, 1), (2, 2)])  # GQA, MQA, MHA
@pytest.mark.parametrize("k_bits,v_bits", [(4, 2), (2, 2), (4, 4)])
@pytest.mark.parametrize("Lq", [1, 3])
def test_decode_attention_matches_fp64(D, Hq, Hkv, k_bits, v_bits, Lq):
    G, R = 32, 36  # 4 sinks + 32 new tokens
    # fill levels: empty, residual only, store only, both (a store long enough to be split across units);
    # each KV head its own count (per-head budgets)
    base, res_len = [0, 0, 640, 1024], [0, 5, 0, 36]
    n_packed = [[max(n - 96 * h, 0) if n else 0 for h in range(Hkv)] for n in base]
    buf, npk, res_k, res_v, rl = _mixed_store(4, Hkv, D, k_bits, v_bits, G, R, n_packed, res_len)
    q = torch.randn(4, Hq, Lq, D)
    for softcap in (0.0, 5.0):
        args = (q, *buf, npk, res_k, res_v, rl, D**-0.5, softcap, k_bits, v_bits, G)
        got = cpu_ops.decode_attention(*args)
        want = _fp64_decode(q, buf, npk, res_k, res_v, rl, k_bits, v_bits, G, D**-0.5, softcap)
        assert got.dtype == q.dtype and got.shape == q.shape
        assert torch.allclose(got.double(), want, atol=2e-5), (got.double() - want).abs().max()
        assert torch.allclose(got, reference.decode_attention(*args), atol=2e-5)
        assert bool((got[0] == 0).all())  # a sequence with nothing cached attends to nothing, as the reference


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_decode_attention_in_half_precision_meets_the_budget(dtype):
    """Half-precision queries and residual: the kernel computes in fp32, so its error is at most the
    reference's (which also computes in fp32) plus rounding the output."""
    buf, npk, res_k, res_v, rl = _mixed_store(2, 2, 64, 4, 2, 32, 36, [256, 64], [7, 36])
    q = torch.randn(2, 8, 1, 64).to(dtype)
    res_k, res_v = res_k.to(dtype), res_v.to(dtype)
    args = (q, *buf, npk, res_k, res_v, rl, 0.125, 0.0, 4, 2, 32)
    got, ref = cpu_ops.decode_attention(*args), reference.decode_attention(*args)
    want = _fp64_decode(q, buf, npk, res_k, res_v, rl, 4, 2, 32, 0.125, 0.0)
    assert got.dtype == dtype
    assert (got.double() - want).abs().max() <= 2 * (ref.double() - want).abs().max() + 1e-3


def test_decode_attention_of_fp32_queries_over_an_fp16_residual():
    """An fp32 model's residual is fp16 by default (``residual_dtype=None``): the kernel reads it as the
    reference does, within fp32 rounding of fp64 attention over the residual's stored values."""
    buf, npk, res_k, res_v, rl = _mixed_store(2, 2, 64, 4, 2, 32, 36, [[256, 192], [64, 0]], [7, 36])
    res_k, res_v = res_k.half(), res_v.half()
    q = torch.randn(2, 6, 2, 64)
    args = (q, *buf, npk, res_k, res_v, rl, 0.125, 0.0, 4, 2, 32)
    got = cpu_ops.decode_attention(*args)
    want = _fp64_decode(q, buf, npk, res_k, res_v, rl, 4, 2, 32, 0.125, 0.0)
    assert got.dtype == torch.float32
    assert torch.allclose(got.double(), want, atol=2e-5) and torch.allclose(
        got, reference.decode_attention(*args), atol=2e-5
    )


def test_decode_attention_does_not_depend_on_the_thread_count():
    buf, npk, res_k, res_v, rl = _mixed_store(1, 1, 64, 4, 2, 32, 36, [4096], [20])
    args = (torch.randn(1, 4, 1, 64), *buf, npk, res_k, res_v, rl, 0.125, 0.0, 4, 2, 32)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = cpu_ops.decode_attention(*args)
    finally:
        torch.set_num_threads(threads)
    assert torch.allclose(cpu_ops.decode_attention(*args), one, atol=1e-6)


def test_decode_attention_after_a_flush_inside_a_multi_token_append():
    """Lq new tokens whose append flushed the residual: some of them are in the store; the causal mask
    follows the logical order (store, then residual) as the reference's."""
    B, H, D, G, R = 2, 2, 32, 16, 16
    buf = _store(B, H, D, 64, 4, G)
    buf[3] = torch.zeros(B, H, 64, D * 2 // 32, dtype=torch.int32)  # 2-bit values
    n_packed, res_len = torch.tensor([[0, 16], [16, 32]]), torch.tensor([14, 3])
    n_sink = torch.zeros(B, dtype=torch.int64)
    res_k, res_v = torch.randn(B, H, R, D), torch.randn(B, H, R, D)
    k, v = torch.randn(B, H, 4, D), torch.randn(B, H, 4, D)
    cpu_ops.append_kv(k, v, *buf, n_packed, res_k, res_v, res_len, n_sink, 4, 2, G, R, True)
    assert n_packed.tolist() == [[16, 32], [16, 32]] and res_len.tolist() == [2, 7]
    q = torch.randn(B, 4, 4, D)
    args = (q, *buf, n_packed, res_k, res_v, res_len, D**-0.5, 0.0, 4, 2, G)
    want = _fp64_decode(q, buf, n_packed, res_k, res_v, res_len, 4, 2, G, D**-0.5, 0.0)
    assert torch.allclose(cpu_ops.decode_attention(*args).double(), want, atol=2e-5)


# ---- the reconstruction pass's attention: fused attention + log-sum-exp maxima ----------------------
def test_reconstruct_attention_runs_fused_attention_and_matches_the_reference():
    g = torch.Generator().manual_seed(3)
    B, Hq, Hkv, S, M, D = 2, 9, 3, 300, 140, 64  # more queries than one block
    q = torch.randn(B, Hq, M, D, generator=g)
    k, v = torch.randn(B, Hkv, S, D, generator=g), torch.randn(B, Hkv, S, D, generator=g)
    k_new, v_new = torch.randn(B, Hkv, M, D, generator=g), torch.randn(B, Hkv, M, D, generator=g)
    valid = torch.ones(B, S, dtype=torch.bool)
    valid[1, :37] = False  # left padding
    counted = torch.rand(B, M, generator=g) < 0.8
    args = (q, k, v, valid, k_new, v_new, counted, D**-0.5, 0.0)
    with torch.profiler.profile() as prof:
        out, scores = ops.reconstruct_attention(*args)
    assert any("flash_attention" in e.key for e in prof.key_averages())
    ref_out, ref_scores = reference.reconstruct_attention(*args)
    assert torch.allclose(out, ref_out, atol=1e-5)
    assert torch.allclose(scores, ref_scores, atol=1e-6, rtol=1e-4)
    assert bool((scores[1, :, :37] == 0).all())


# ---- append: the reference's buffers, quantized once per flush -----------------------------------
@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    clip=st.booleans(),
    bits=st.sampled_from([(4, 2), (2, 2), (2, 4)]),
    sinks=st.lists(st.integers(0, 4), min_size=3, max_size=3),
    steps=st.lists(st.integers(1, 5), min_size=1, max_size=12),
)
def test_append_leaves_the_references_buffers(seed, clip, bits, sinks, steps):
    B, H, D, G, R, C = 3, 2, 32, 16, 32, 256
    k_bits, v_bits = bits
    g = torch.Generator().manual_seed(seed)
    n_sink = torch.tensor(sinks)
    state = [*_store(B, H, D, C, 4, G)]
    state[3] = torch.zeros(B, H, C, D * v_bits // 32, dtype=torch.int32)
    state[0] = torch.zeros(B, H, D, C * k_bits // 32, dtype=torch.int32)
    fill = torch.randint(0, R, (B,), generator=g)
    state += [
        torch.tensor([[0, 32], [16, 0], [32, 64]]),  # each KV head its own fill (per-head budgets)
        torch.randn(B, H, 4 + R, D, generator=g),
        torch.randn(B, H, 4 + R, D, generator=g),
        n_sink + fill,
    ]
    fast = [t.clone() for t in state]
    for Lq in steps:
        k, v = torch.randn(B, H, Lq, D, generator=g), torch.randn(B, H, Lq, D, generator=g)
        reference.append_kv(k, v, *state, n_sink, k_bits, v_bits, G, R, clip)
        cpu_ops.append_kv(k, v, *fast, n_sink, k_bits, v_bits, G, R, clip)
        for a, b in zip(fast, state):
            assert torch.equal(a, b)


def test_append_quantizes_only_when_a_residual_fills(monkeypatch):
    B, H, D, G, R = 2, 2, 16, 16, 32
    calls = []
    real = cpu_ops.quantize_pack
    monkeypatch.setattr(cpu_ops, "quantize_pack", lambda *a: calls.append(a[0].shape) or real(*a))
    buf = _store(B, H, D, 96, 2, G)
    n_packed, res_len, n_sink = (
        torch.tensor([[0, 0], [16, 16]]),
        torch.tensor([R - 3, 0]),
        torch.zeros(B, dtype=torch.int64),
    )
    res_k, res_v = torch.zeros(B, H, R, D), torch.zeros(B, H, R, D)
    for _ in range(5):
        tok = torch.randn(B, H, 1, D)
        cpu_ops.append_kv(tok, tok, *buf, n_packed, res_k, res_v, res_len, n_sink, 2, 2, G, R, True)
    assert len(calls) == 2  # one flush (sequence 0 at the third token): its keys and its values
    assert n_packed.tolist() == [[32, 32], [16, 16]] and res_len.tolist() == [2, 5]


def test_append_refuses_to_overflow_the_store():
    B, H, D, G, R = 1, 1, 16, 16, 16
    buf = _store(B, H, D, 16, 2, G)
    n_packed, res_len = torch.tensor([[16]]), torch.tensor([R - 1])
    res = torch.zeros(B, H, R, D)
    with pytest.raises(RuntimeError, match="store of sequence 0 is full"):
        cpu_ops.append_kv(
            torch.randn(1, 1, 1, D),
            torch.randn(1, 1, 1, D),
            *buf,
            n_packed,
            res,
            res.clone(),
            res_len,
            torch.zeros(1, dtype=torch.int64),
            2,
            2,
            G,
            R,
            False,
        )


def test_without_the_build_the_ops_fall_back_to_the_references(monkeypatch):
    monkeypatch.setattr(native, "available", lambda: False)
    x = torch.randn(3, 64)
    got = ops.quantize_pack(x, 2, 16, True)
    assert all(torch.equal(a, b) for a, b in zip(got, quant.quantize_pack(x, 2, 16, True)))
    buf, npk, res_k, res_v, rl = _filled_store(1, 2, 16, 2, 16, 32, [32], [3])
    args = (torch.randn(1, 4, 1, 16), *buf, npk, res_k, res_v, rl, 0.25, 0.0, 2, 2, 16)
    assert torch.equal(ops.decode_attention(*args), reference.decode_attention(*args))


def test_the_build_finds_the_ninja_pip_installed(monkeypatch):
    """An unactivated venv leaves its bin folder (where pip puts ninja) off PATH: the build adds it."""
    import ninja

    monkeypatch.setattr(native.shutil, "which", lambda name: None)
    before = os.environ["PATH"]
    with native._ninja_on_path():
        assert os.environ["PATH"].split(os.pathsep)[0] == ninja.BIN_DIR
    assert os.environ["PATH"] == before


def test_a_store_in_another_layout_takes_the_reference():
    buf, npk, res_k, res_v, rl = _filled_store(1, 2, 16, 2, 16, 32, [32], [3])
    strided = [t.transpose(-1, -2).contiguous().transpose(-1, -2) for t in buf]  # same values, other strides
    args = (torch.randn(1, 4, 1, 16), *strided, npk, res_k, res_v, rl, 0.25, 0.0, 2, 2, 16)
    assert torch.equal(cpu_ops.decode_attention(*args), reference.decode_attention(*args))

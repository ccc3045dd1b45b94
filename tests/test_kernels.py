"""Triton kernels against the references, on CPU through the Triton interpreter (TRITON_INTERPRET=1,
set in conftest.py before triton is imported).

Codes, scales and minimums must be equal bit for bit; attention outputs must meet the rule
``err(kernel vs fp64) <= 2 * err(same-dtype torch vs fp64) + eps``.
"""

import os

import pytest
import torch
from models import tiny_model
from test_ops import _filled_store, _inputs, _store
from torch.library import opcheck

import minikv
from minikv.kernels import ops, quant, reference, use_triton_on_cpu
from minikv.kernels.quant import unpack_dequantize

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs TRITON_INTERPRET=1")
EPS = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}


@pytest.fixture(autouse=True)
def triton_on_cpu():
    use_triton_on_cpu(True)
    yield
    use_triton_on_cpu(False)


# ---- quantize + pack --------------------------------------------------------------------------
QUANT_SHAPES = [(1, 16), (3, 64), (2, 5, 48), (4, 1, 3, 128), (7, 256)]  # weird shapes


@pytest.mark.parametrize("shape", QUANT_SHAPES)
@pytest.mark.parametrize("bits,G", [(2, 16), (2, 32), (4, 8), (4, 16)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_quantize_pack_is_bit_exact(shape, bits, G, dtype):
    if shape[-1] % G:
        pytest.skip("group does not tile the row")
    g = torch.Generator().manual_seed(sum(shape) + bits)
    x = (torch.randn(*shape, generator=g) * 4 + torch.rand(shape[:-1] + (1,), generator=g)).to(dtype)
    x.view(-1)[::7] = x.view(-1)[0]  # ties and repeated values
    want = quant.quantize_pack(x, bits, G)
    got = ops.quantize_pack(x, bits, G)
    for a, b in zip(want, got):
        assert a.dtype == b.dtype and torch.equal(a, b)


@pytest.mark.parametrize("bits", [2, 4])
def test_quantize_pack_keys_layout_and_constant_groups(bits):
    k = torch.randn(2, 3, 64, 16, dtype=torch.float16)  # [B, H, T, D] -> per channel along tokens
    k[0, 1, :16] = 0.25  # a constant group
    for a, b in zip(
        quant.quantize_pack(k.transpose(-1, -2), bits, 16), ops.quantize_pack(k.transpose(-1, -2), bits, 16)
    ):
        assert torch.equal(a, b)


# ---- decode attention ---------------------------------------------------------------------------
# (Hq, Hkv, D): GQA 1/3/4/8, head_dim 64 and 128
HEADS = [(4, 4, 64), (9, 3, 64), (8, 2, 128), (8, 1, 64), (4, 1, 256)]  # the last: Gemma 3 (MQA, D 256)
# per-sequence (packed, residual) lengths: T < G, T = R +- 1, odd, batch 1 and > 1 with different lengths
# (R = 32 in these tests: 31 = R - 1 tokens, 33 = R + 1 tokens)
LENGTHS = [([0], [5]), ([0], [31]), ([32], [1]), ([32], [0]), ([64, 0, 16], [1, 31, 7]), ([96, 32], [31, 2])]


def _dense(q, K, V, n, r, Lq, dtype):
    """Attention over the first n + r rows of K, V in ``dtype`` (causal among the Lq new queries)."""
    N = n + r
    g = q.shape[1] // K.shape[1]
    s = q.to(dtype) @ K[:, :, :N].to(dtype).repeat_interleave(g, 1).transpose(-1, -2) * q.shape[-1] ** -0.5
    pos = torch.arange(N, device=q.device)
    allowed = pos[None, :] < (N - (Lq - 1 - torch.arange(Lq, device=q.device)))[:, None]
    p = torch.softmax(s.masked_fill(~allowed, float("-inf")).float(), -1).to(dtype)
    return p @ V[:, :, :N].to(dtype).repeat_interleave(g, 1)


# every (heads, lengths) pair once, bits and dtype alternating (the interpreter is slow)
DECODE_CASES = [
    (*heads, lengths, (2, 4)[(i + j) % 2], (torch.float16, torch.bfloat16, torch.float32)[(i + j) % 3])
    for i, heads in enumerate(HEADS)
    for j, lengths in enumerate(LENGTHS)
]


@pytest.mark.parametrize("Hq,Hkv,D,lengths,bits,dtype", DECODE_CASES)
def test_decode_attention_error_budget(Hq, Hkv, D, lengths, bits, dtype):
    n_packed, res_len = lengths
    B, G, R, Lq = len(n_packed), 16, 32, 1
    per_head = [[max(n - 16 * h, 0) for h in range(Hkv)] for n in n_packed]  # each KV head its own count
    buf, npk, rk, rv, rl = _filled_store(B, Hkv, D, bits, G, R, per_head, res_len, seed=D + Hq)
    rk, rv = rk.to(dtype), rv.to(dtype)
    q = torch.randn(B, Hq, Lq, D).to(dtype)
    got = ops.decode_attention(q, *buf, npk, rk, rv, rl, D**-0.5, 0.0, bits, bits, G)
    K = unpack_dequantize(buf[0], buf[1], buf[2], bits, G, torch.float64).transpose(-1, -2)
    V = unpack_dequantize(buf[3], buf[4], buf[5], bits, G, torch.float64)
    g = Hq // Hkv
    for b in range(B):
        for h in range(Hkv):
            n, r, rows = per_head[b][h], res_len[b], slice(h * g, (h + 1) * g)
            keys = torch.cat([K[b : b + 1, h : h + 1, :n], rk[b : b + 1, h : h + 1, :r].double()], 2)
            vals = torch.cat([V[b : b + 1, h : h + 1, :n], rv[b : b + 1, h : h + 1, :r].double()], 2)
            exact = _dense(q[b : b + 1, rows].double(), keys, vals, n, r, Lq, torch.float64)
            same_dtype = _dense(q[b : b + 1, rows], keys, vals, n, r, Lq, dtype).double()
            err = (got[b : b + 1, rows].double() - exact).abs().max()
            budget = 2 * (same_dtype - exact).abs().max() + EPS[dtype]
            assert err <= budget, (b, h, float(err), float(budget))


@pytest.mark.parametrize("softcap", [0.0, 20.0])
@pytest.mark.parametrize("Lq", [1, 4])
def test_decode_attention_matches_the_reference_with_softcap_and_several_queries(softcap, Lq):
    buf, npk, rk, rv, rl = _filled_store(2, 2, 64, 2, 16, 32, [[48, 16], [16, 32]], [3, 30])
    q = torch.randn(2, 8, Lq, 64)
    want = reference.decode_attention(q, *buf, npk, rk, rv, rl, 0.125, softcap, 2, 2, 16)
    got = ops.decode_attention(q, *buf, npk, rk, rv, rl, 0.125, softcap, 2, 2, 16)
    assert torch.allclose(got, want, atol=1e-5)


def test_decode_attention_of_fp32_queries_over_an_fp16_residual():
    """An fp32 model's default residual is fp16: the Triton kernel reads it as the reference does."""
    buf, npk, rk, rv, rl = _filled_store(2, 2, 64, 2, 16, 32, [[48, 16], [16, 32]], [3, 30])
    rk, rv = rk.half(), rv.half()
    q = torch.randn(2, 8, 2, 64)
    want = reference.decode_attention(q, *buf, npk, rk, rv, rl, 0.125, 0.0, 2, 2, 16)
    got = ops.decode_attention(q, *buf, npk, rk, rv, rl, 0.125, 0.0, 2, 2, 16)
    assert got.dtype == torch.float32 and torch.allclose(got, want, atol=1e-5)


# every tile shape of triton_decode.TILES: head_dim 64/128/256 (Gemma 3's MQA at 256), G 16/32/64
# (G 64 takes 64-token tiles), keys and values at different widths, several tiles and two splits
TILE_CASES = [(4, 1, 256, 32, 4, 2), (8, 2, 64, 64, 2, 2), (4, 2, 128, 64, 4, 4), (6, 2, 64, 16, 4, 2)]


@pytest.mark.parametrize("Hq,Hkv,D,G,k_bits,v_bits", TILE_CASES)
def test_decode_tiles_of_every_head_dim_and_group_size(Hq, Hkv, D, G, k_bits, v_bits):
    from minikv.kernels import triton_decode

    bt, _ = triton_decode.tile(D, G)
    assert bt % G == 0
    n_packed, res_len, R = [3 * bt + G, G], [5, 0], 32
    g = torch.Generator().manual_seed(D + G)
    C = max(n_packed)
    k = torch.randn(2, Hkv, C, D, generator=g)
    v = torch.randn(2, Hkv, C, D, generator=g)
    buf = (*quant.quantize_pack(k.transpose(-1, -2), k_bits, G), *quant.quantize_pack(v, v_bits, G))
    rk, rv = torch.randn(2, Hkv, R, D, generator=g), torch.randn(2, Hkv, R, D, generator=g)
    q = torch.randn(2, Hq, 2, D, generator=g)
    npk = torch.tensor([[n - bt * h for h in range(Hkv)] for n in n_packed]).clamp_min(0)  # per KV head
    rl = torch.tensor(res_len) + 1  # 2 new queries: >= 1 residual token each
    want = reference.decode_attention(q, *buf, npk, rk, rv, rl, D**-0.5, 0.0, k_bits, v_bits, G)
    got = ops.decode_attention(q, *buf, npk, rk, rv, rl, D**-0.5, 0.0, k_bits, v_bits, G)
    assert torch.allclose(got, want, atol=2e-5), (got - want).abs().max()


# ---- append + flush ---------------------------------------------------------------------------
APPEND_CASES = [  # (k_bits, v_bits, G, D, R, clip, residual dtype)
    (4, 2, 16, 64, 32, True, torch.float16),
    (2, 2, 32, 128, 64, False, torch.bfloat16),
    (4, 4, 16, 32, 16, True, torch.float32),
    (2, 2, 16, 256, 32, True, torch.float16),
]


@pytest.mark.parametrize("k_bits,v_bits,G,D,R,clip,dtype", APPEND_CASES)
def test_append_kernel_is_bit_exact_across_flushes(k_bits, v_bits, G, D, R, clip, dtype):
    """Sequences at different fill levels (one flushes on the first token, one never, one after
    a while), with and without sinks, several steps of one and of three tokens: every buffer and
    length equal to the reference's, bit for bit."""
    from minikv.kernels import triton_append

    B, H, S = 3, 2, 4
    C = 4 * R
    g = torch.Generator().manual_seed(D + R + k_bits)
    state = {}
    for name in ("ref", "kernel"):
        store = list(_store(B, H, D, C, k_bits, G)[:3] + _store(B, H, D, C, v_bits, G)[3:])
        n_packed = torch.tensor([[0, R], [R, 0], [2 * R, R]])  # each KV head its own fill
        res_k, res_v = torch.zeros(B, H, S + R, D, dtype=dtype), torch.zeros(B, H, S + R, D, dtype=dtype)
        state[name] = [store, n_packed, res_k, res_v, torch.tensor([S + R - 1, 0, 2]), torch.tensor([S, 0, 2])]
    for steps, width in ((R + 2, 1), (R // 3 + 1, 3)):
        for _ in range(steps):
            k = torch.randn(B, H, width, D, generator=g) * 3
            v = torch.randn(B, H, width, D, generator=g)
            for name, fn in (("ref", reference.append_kv), ("kernel", triton_append.append_kv)):
                store, n_packed, res_k, res_v, res_len, n_sink = state[name]
                fn(k, v, *store, n_packed, res_k, res_v, res_len, n_sink, k_bits, v_bits, G, R, clip)
    (ref_store, *ref_rest), (got_store, *got_rest) = state["ref"], state["kernel"]
    assert int(ref_rest[0].min()) >= 2 * R  # every sequence flushed at least twice
    for a, b in zip(ref_store + ref_rest, got_store + got_rest):
        assert a.dtype == b.dtype and torch.equal(a, b)


# ---- prefill attention with scores -------------------------------------------------------------
PREFILL_SHAPES = [(1, 4, 4, 5, 64), (2, 6, 2, 37, 64), (1, 8, 1, 17, 128), (2, 9, 3, 100, 64), (3, 8, 2, 130, 64)]


@pytest.mark.parametrize("shape", PREFILL_SHAPES)
@pytest.mark.parametrize("softcap", [0.0, 30.0])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_prefill_attention_and_scores(shape, softcap, dtype):
    q, k, v, valid = _inputs(*shape, dtype=dtype, seed=sum(shape))
    B, Hq, Hkv, T, D = shape
    w = torch.rand(B, T, generator=torch.Generator().manual_seed(1))
    got, got_scores = ops.prefill_attention(q, k, v, valid, w, D**-0.5, softcap)
    want, want_scores = reference.prefill_attention(
        q.double().float(), k.float(), v.float(), valid, w, D**-0.5, softcap
    )
    exact, _ = reference.prefill_attention(q.double(), k.double(), v.double(), valid, w, D**-0.5, softcap)
    rows = valid[:, None, :, None]
    same = reference.prefill_attention(q, k, v, valid, w, D**-0.5, softcap)[0]  # fp32 math, output in dtype
    err = ((got.double() - exact) * rows).abs().max()
    budget = 2 * ((same.double() - exact) * rows).abs().max() + EPS[dtype]
    assert err <= budget, (float(err), float(budget))
    assert torch.allclose(got_scores, want_scores, rtol=1e-3, atol=1e-4 if dtype == torch.float32 else 1e-3)


def test_prefill_kernel_reads_no_square_buffer():
    import minikv.kernels.triton_prefill as TP

    T = 300
    q, k, v, valid = _inputs(1, 2, 1, T, 64)
    seen = []
    real = torch.empty

    def spy(*size, **kw):
        t = real(*size, **kw)
        seen.append(t.numel())
        return t

    TP.torch.empty = spy
    try:
        TP.prefill_attention(q, k, v, valid, valid.float(), 0.125, 0.0)
    finally:
        TP.torch.empty = real
    assert max(seen) < T * T


# ---- the ops with the kernels registered, and a patched generation -----------------------------
@pytest.mark.parametrize("case", ["quantize", "decode", "prefill", "append"])
def test_opcheck_with_triton_registered(case):
    if case == "quantize":
        opcheck(ops.quantize_pack, (torch.randn(3, 64), 2, 16))
    elif case == "append":
        B, H, D, G, S, R = 2, 2, 16, 16, 3, 32
        buf = _store(B, H, D, 96, 4, G)[:3] + _store(B, H, D, 96, 2, G)[3:]
        state = (
            torch.tensor([[0, 16], [16, 32]]),
            torch.randn(B, H, S + R, D),
            torch.randn(B, H, S + R, D),
            torch.tensor([33, 5]),
            torch.tensor([3, 2]),
        )
        opcheck(ops.append_kv, (torch.randn(B, H, 2, D), torch.randn(B, H, 2, D), *buf, *state, 4, 2, G, R, True))
    elif case == "decode":
        buf, npk, rk, rv, rl = _filled_store(2, 2, 64, 2, 16, 32, [16, 0], [3, 9])
        opcheck(ops.decode_attention, (torch.randn(2, 4, 1, 64), *buf, npk, rk, rv, rl, 0.125, 0.0, 2, 2, 16))
    else:
        q, k, v, valid = _inputs(2, 4, 2, 21, 64)
        opcheck(ops.prefill_attention, (q, k, v, valid, valid.float(), 0.125, 0.0))


def test_backend_triton_is_refused_where_triton_does_not_run():
    from minikv.kernels import implementation

    use_triton_on_cpu(False)
    with pytest.raises(ValueError, match="backend='triton' has no kernels on cpu"):
        implementation("triton", torch.device("cpu"))


@pytest.mark.parametrize(
    "family, policy",
    [
        ("llama", {}),
        ("gemma2", {}),
        ("llama", dict(scorer="a2sf", crush=0.25)),
        ("llama", dict(scorer="keynorm", schedule="pyramidkv")),
    ],
)
def test_patched_generation_with_triton_equals_the_reference(family, policy):
    model = tiny_model(family, dtype=torch.float32, head_dim=64)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 320, (2, 70), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :11] = 0
    outs = {}
    for backend in ("reference", "triton"):
        # no clip search: interpreted it is most of the time here; its codes are checked bit for bit above
        minikv.patch(model, bits=2, budget=0.5, residual_length=16, backend=backend, clip=False, **policy)
        outs[backend] = model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0)
        minikv.unpatch(model)
    assert torch.equal(outs["reference"], outs["triton"])


def test_patch_refuses_backend_triton_where_it_cannot_run():
    use_triton_on_cpu(False)
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="backend='triton' has no kernels on cpu"):
        minikv.patch(model, backend="triton")
    assert not minikv.is_patched(model)

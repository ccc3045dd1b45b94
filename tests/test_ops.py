"""The custom ops: opcheck, and the attention math against fp64 materialised references."""

import pytest
import torch
from torch.library import opcheck

from minikv.kernels import ops, reference
from minikv.kernels.quant import unpack_dequantize

# (B, Hq, Hkv, T, D): odd lengths, T < G, GQA 1/3/4/8, batch 1 and > 1
SHAPES = [(1, 2, 2, 5, 16), (2, 6, 2, 37, 16), (3, 8, 2, 130, 32), (1, 8, 1, 17, 64), (2, 9, 3, 257, 16)]


def _inputs(B, Hq, Hkv, T, D, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, T, D, generator=g).to(dtype)
    k = torch.randn(B, Hkv, T, D, generator=g).to(dtype)
    v = torch.randn(B, Hkv, T, D, generator=g).to(dtype)
    valid = torch.ones(B, T, dtype=torch.bool)
    for b in range(1, B):  # left padding, different per sequence
        valid[b, : (7 * b) % max(T - 1, 1)] = False
    return q, k, v, valid


def _dense_fp64(q, k, v, allowed, scale, softcap=0.0):
    """Materialised attention in fp64: allowed [B, 1|Hq, Lq, N]."""
    g = q.shape[1] // k.shape[1]
    kk = k.double().repeat_interleave(g, 1)
    vv = v.double().repeat_interleave(g, 1)
    s = q.double() @ kk.transpose(-1, -2) * scale
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    s = s.masked_fill(~allowed, float("-inf"))
    p = torch.softmax(s, -1).nan_to_num(0.0)
    return p @ vv, p


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("softcap", [0.0, 5.0])
def test_prefill_attention_and_scores_match_fp64(shape, softcap):
    q, k, v, valid = _inputs(*shape)
    B, Hq, Hkv, T, D = shape
    w = torch.rand(B, T) * valid
    out, scores = ops.prefill_attention(q, k, v, valid, w, D**-0.5, softcap)
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    allowed = causal[None, None] & valid[:, None, None, :]
    ref, p = _dense_fp64(q, k, v, allowed, D**-0.5, softcap)
    rows = valid[:, None, :, None]  # padded query rows are unspecified
    assert torch.allclose((out.double() * rows), ref * rows, atol=1e-5)
    ref_scores = (p * w.double()[:, None, :, None]).sum(2).view(B, Hkv, Hq // Hkv, T).sum(2)
    assert torch.allclose(scores.double(), ref_scores, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("softcap", [0.0, 5.0])
@pytest.mark.parametrize("impl", [ops, reference], ids=["op", "reference"])
def test_reconstruct_attention_and_its_maxima_match_fp64(shape, softcap, impl):
    """Re-read queries over [held context (padded) ; themselves, causal]; the maxima over counted
    queries and the query heads of each KV head, per context token."""
    B, Hq, Hkv, S, D = shape
    q_ctx, k, v, valid = _inputs(*shape)
    M = max(S // 2, 1) + 3
    g = torch.Generator().manual_seed(5)
    q = torch.randn(B, Hq, M, D, generator=g)
    k_new, v_new = torch.randn(B, Hkv, M, D, generator=g), torch.randn(B, Hkv, M, D, generator=g)
    counted = torch.rand(B, M, generator=g) < 0.7
    out, scores = impl.reconstruct_attention(q, k, v, valid, k_new, v_new, counted, D**-0.5, softcap)
    causal = torch.ones(M, M, dtype=torch.bool).tril()
    allowed = torch.cat([valid[:, None, :].expand(B, M, S), causal.expand(B, M, M)], -1)[:, None]
    ref, p = _dense_fp64(q, torch.cat([k, k_new], 2), torch.cat([v, v_new], 2), allowed, D**-0.5, softcap)
    assert torch.allclose(out.double(), ref, atol=1e-5)
    per_head = (p[..., :S] * counted.double()[:, None, :, None]).amax(2)  # [B, Hq, S]
    ref_scores = per_head.view(B, Hkv, Hq // Hkv, S).amax(2)
    assert torch.allclose(scores.double(), ref_scores, atol=1e-6, rtol=1e-5)
    assert bool((scores[~valid[:, None, :].expand_as(scores)] == 0).all())  # padding receives nothing


def test_prefill_with_a_query_window_matches_fp64():
    """SnapKV's weights (last 32 queries only): blocks without weight take the fused path."""
    B, Hq, Hkv, T, D = 2, 6, 2, 300, 16
    q, k, v, valid = _inputs(B, Hq, Hkv, T, D)
    w = torch.zeros(B, T)
    w[:, -32:] = 1.0
    out, scores = ops.prefill_attention(q, k, v, valid, w, D**-0.5, 0.0)
    allowed = torch.ones(T, T, dtype=torch.bool).tril()[None, None] & valid[:, None, None, :]
    ref, p = _dense_fp64(q, k, v, allowed, D**-0.5)
    rows = valid[:, None, :, None]
    assert torch.allclose(out.double() * rows, ref * rows, atol=1e-5) and out.isfinite().all()
    ref_scores = (p * w.double()[:, None, :, None]).sum(2).view(B, Hkv, Hq // Hkv, T).sum(2)
    assert torch.allclose(scores.double(), ref_scores, atol=1e-4, rtol=1e-5)


def test_prefill_reference_never_builds_the_full_square(monkeypatch):
    import minikv.kernels.reference as R

    seen = []
    real = R._softmax

    def spy(s, allowed):
        seen.append(s.shape[-2] * s.shape[-1])
        return real(s, allowed)

    monkeypatch.setattr(R, "_softmax", spy)
    T = 3 * R.QUERY_BLOCK + 5
    q, k, v, valid = _inputs(1, 2, 1, T, 16)
    ops.prefill_attention(q, k, v, valid, valid.float(), 0.25, 0.0)
    assert max(seen) <= R.QUERY_BLOCK * T < T * T


def _store(B, H, D, C, bits, G):
    kc = torch.zeros(B, H, D, C * bits // 32, dtype=torch.int32)
    ks = torch.zeros(B, H, D, C // G, dtype=torch.float16)
    vc = torch.zeros(B, H, C, D * bits // 32, dtype=torch.int32)
    vs = torch.zeros(B, H, C, D // G, dtype=torch.float16)
    return [kc, ks, ks.clone(), vc, vs, vs.clone()]


def _filled_store(B, Hkv, D, bits, G, R, n_packed, res_len, seed=0):
    """A store holding n_packed[b] (or n_packed[b][h], per KV head) quantized tokens and res_len[b]
    residual tokens."""
    g = torch.Generator().manual_seed(seed)
    n_packed = torch.tensor(n_packed).view(B, -1).expand(B, Hkv).contiguous()
    C = int(n_packed.max()) + R
    C = -(-C // G) * G
    buf = _store(B, Hkv, D, C, bits, G)
    k = torch.randn(B, Hkv, C, D, generator=g)
    v = torch.randn(B, Hkv, C, D, generator=g)
    kc, ks, km = ops.quantize_pack(k.transpose(-1, -2), bits, G)
    vc, vs, vm = ops.quantize_pack(v, bits, G)
    for dst, src in zip(buf, (kc, ks, km, vc, vs, vm)):
        dst.copy_(src)
    res_k = torch.randn(B, Hkv, R, D, generator=g)
    res_v = torch.randn(B, Hkv, R, D, generator=g)
    return buf, n_packed, res_k, res_v, torch.tensor(res_len)


@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("Hq,Hkv", [(2, 2), (6, 2), (8, 1)])
@pytest.mark.parametrize("Lq", [1, 3])
@pytest.mark.parametrize("impl", [ops, reference], ids=["op", "reference"])
def test_decode_attention_is_one_softmax_over_store_and_residual(bits, Hq, Hkv, Lq, impl):
    B, D, G, R = 3, 32, 16, 32
    per_head = [[(16 * (b + 3 * h)) % 64 for h in range(Hkv)] for b in range(B)]  # each KV head its own count
    buf, n_packed, res_k, res_v, res_len = _filled_store(B, Hkv, D, bits, G, R, per_head, [5, 31, 3])
    q = torch.randn(B, Hq, Lq, D)
    out = impl.decode_attention(q, *buf, n_packed, res_k, res_v, res_len, D**-0.5, 0.0, bits, bits, G)
    K = unpack_dequantize(buf[0], buf[1], buf[2], bits, G, torch.float64).transpose(-1, -2)
    V = unpack_dequantize(buf[3], buf[4], buf[5], bits, G, torch.float64)
    g = Hq // Hkv
    for b in range(B):
        for h in range(Hkv):
            n, r = int(n_packed[b, h]), int(res_len[b])
            keys = torch.cat([K[b : b + 1, h : h + 1, :n], res_k[b : b + 1, h : h + 1, :r].double()], 2)
            vals = torch.cat([V[b : b + 1, h : h + 1, :n], res_v[b : b + 1, h : h + 1, :r].double()], 2)
            N = n + r
            allowed = torch.arange(N)[None, :] < (N - (Lq - 1 - torch.arange(Lq)))[:, None]  # causal among new
            ref, _ = _dense_fp64(q[b : b + 1, h * g : (h + 1) * g], keys, vals, allowed[None, None], D**-0.5)
            assert torch.allclose(out[b : b + 1, h * g : (h + 1) * g].double(), ref, atol=1e-5), (b, h)


def test_append_flushes_at_exactly_R():
    B, H, D, G, R, bits = 2, 2, 16, 16, 32, 2
    buf = _store(B, H, D, 96, bits, G)
    n_packed = torch.tensor([[0, 32], [16, 16]])  # per KV head: sequence 0's heads flush to their own offsets
    res_k, res_v = torch.zeros(B, H, R, D), torch.zeros(B, H, R, D)
    res_len = torch.tensor([R - 3, 0])
    toks = torch.randn(B, H, 5, D)
    history = []
    for i in range(5):
        ops.append_kv(
            toks[:, :, i : i + 1],
            toks[:, :, i : i + 1] * 2,
            *buf,
            n_packed,
            res_k,
            res_v,
            res_len,
            torch.zeros(B, dtype=torch.int64),
            bits,
            bits,
            G,
            R,
            False,
        )
        history.append((n_packed.tolist(), res_len.tolist()))
    # sequence 0: 29 -> 30, 31, 32=R flush -> 0, 1, 2; sequence 1 never reaches R
    assert history == [
        ([[0, 32], [16, 16]], [30, 1]),
        ([[0, 32], [16, 16]], [31, 2]),
        ([[32, 64], [16, 16]], [0, 3]),
        ([[32, 64], [16, 16]], [1, 4]),
        ([[32, 64], [16, 16]], [2, 5]),
    ]
    # the flushed group of sequence 0 went to each head's own offset; the residual starts again
    assert torch.equal(res_k[0, :, :2], toks[0, :, 3:5])
    assert (buf[0][0, 0, :, 64 // 16 :] == 0).all() and (buf[0][0, 1, :, 32 // 16 : 64 // 16] != 0).any()
    assert torch.equal(res_k[1, :, :5], toks[1])
    # sequence 1's store is untouched
    assert (buf[0][1] == 0).all() and (buf[3][1] == 0).all()


def _ops_cases():
    q, k, v, valid = _inputs(2, 4, 2, 21, 16)
    x = torch.randn(2, 3, 64)
    codes, s, m = ops.quantize_pack(x, 2, 16)
    buf, n_packed, res_k, res_v, res_len = _filled_store(2, 2, 16, 2, 16, 32, [[16, 32], [0, 16]], [3, 9])
    scores = torch.rand(2, 2, 21)
    n_keep, n_recent = torch.tensor([10, 8]), torch.tensor([4, 3])
    yield ops.quantize_pack, (x, 2, 16)
    yield ops.quantize_pack, (x.half(), 4, 8)
    yield ops.unpack_dequantize, (codes, s, m, 2, 16, torch.float32)
    yield ops.prefill_attention, (q, k, v, valid, valid.float(), 0.25, 0.0)
    yield ops.select_tokens, (scores, valid, n_keep, n_recent, 10)
    yield (
        ops.append_kv,
        (
            torch.randn(2, 2, 2, 16),
            torch.randn(2, 2, 2, 16),
            *buf,
            n_packed,
            res_k,
            res_v,
            res_len,
            torch.zeros(2, dtype=torch.int64),
            2,
            2,
            16,
            32,
            False,
        ),
    )
    yield ops.decode_attention, (torch.randn(2, 4, 1, 16), *buf, n_packed, res_k, res_v, res_len, 0.25, 0.0, 2, 2, 16)
    yield (
        ops.reconstruct_attention,
        (
            torch.randn(2, 4, 5, 16),
            k,
            v,
            valid,
            torch.randn(2, 2, 5, 16),
            torch.randn(2, 2, 5, 16),
            torch.rand(2, 5) < 0.5,
            0.25,
            0.0,
        ),
    )
    # queries as transformers passes them: [B, T, H, D] transposed to [B, H, T, D] (the fakes must
    # give the kernels' contiguous strides, or inductor's stride asserts fail at run time)
    qt = q.transpose(1, 2).contiguous().transpose(1, 2)
    yield ops.prefill_attention, (qt, k, v, valid, valid.float(), 0.25, 0.0)
    q3 = torch.randn(2, 3, 4, 16).transpose(1, 2)
    yield ops.decode_attention, (q3, *buf, n_packed, res_k, res_v, res_len, 0.25, 0.0, 2, 2, 16)


@pytest.mark.parametrize("op,args", list(_ops_cases()), ids=lambda x: getattr(x, "_name", None) or "")
def test_opcheck(op, args):
    opcheck(op, args)

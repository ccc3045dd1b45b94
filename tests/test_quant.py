"""Quantizer properties (hypothesis): packing is a bijection, error <= scale/2, constants exact."""

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from minikv.kernels import ops
from minikv.kernels.quant import pack, unpack

SETTINGS = settings(max_examples=40, deadline=None)


def _codes(bits, lead, words, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 2**bits, (*lead, words * 32 // bits), generator=g, dtype=torch.int32)


@SETTINGS
@given(
    bits=st.sampled_from([2, 4]),
    lead=st.lists(st.integers(1, 5), min_size=0, max_size=3),
    words=st.integers(1, 9),
    seed=st.integers(0, 2**31 - 1),
)
def test_pack_unpack_is_a_bijection_on_codes(bits, lead, words, seed):
    q = _codes(bits, lead, words, seed)
    packed = pack(q, bits)
    assert packed.dtype == torch.int32 and packed.shape[-1] == words
    assert torch.equal(unpack(packed, bits), q)
    # and the other way round: any int32 word survives unpack -> pack
    w = torch.randint(-(2**31), 2**31 - 1, (*lead, words), dtype=torch.int64).to(torch.int32)
    assert torch.equal(pack(unpack(w, bits), bits), w)


def test_packing_layout_is_little_endian_kivi():
    q = torch.arange(16, dtype=torch.int32) % 4  # 0,1,2,3,0,1,...
    word = int(pack(q[None], 2)[0, 0]) & 0xFFFFFFFF
    assert word == sum(int(c) << (2 * j) for j, c in enumerate(q))


@SETTINGS
@given(
    bits=st.sampled_from([2, 4]),
    groups=st.integers(1, 6),
    lead=st.lists(st.integers(1, 7), max_size=3),
    dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
    scale=st.floats(1e-3, 1e3),
    seed=st.integers(0, 2**31 - 1),
)
def test_every_element_is_within_half_a_step(bits, groups, lead, dtype, scale, seed):
    G = 16
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(*lead, groups * G, generator=g) * scale).to(dtype)
    codes, s, mn = ops.quantize_pack(x, bits, G)
    assert codes.shape[-1] == groups * G * bits // 32 and s.shape[-1] == groups and s.dtype == torch.float16
    xhat = ops.unpack_dequantize(codes, s, mn, bits, G, torch.float32)
    err = (x.float() - xhat).abs().view(*lead, groups, G)
    bound = s.float().unsqueeze(-1) / 2
    # fp32 arithmetic of (x - mn) * (1 / scale): a few ulps of |x| on top of the half step
    slack = 4 * torch.finfo(torch.float32).eps * x.float().abs().view(*lead, groups, G) + 1e-7
    assert bool((err <= bound + slack).all()), float((err - bound).max())


@SETTINGS
@given(
    bits=st.sampled_from([2, 4]),
    value=st.floats(-6e4, 6e4, allow_nan=False, allow_subnormal=False),
    dtype=st.sampled_from([torch.float16, torch.bfloat16]),
    n=st.integers(1, 4),
)
def test_constant_groups_round_trip_exactly(bits, value, dtype, n):
    x = torch.full((3, n * 16), value, dtype=dtype)
    # the minimum is stored in fp16: bf16 values outside fp16's grid cannot be exact
    assume(torch.equal(x.to(torch.float16).to(dtype), x))
    codes, s, mn = ops.quantize_pack(x, bits, 16)
    assert torch.equal(ops.unpack_dequantize(codes, s, mn, bits, 16, dtype), x)


@pytest.mark.parametrize("shape", [(1, 16), (3, 5, 48), (2, 1, 7, 32), (13, 64)])  # weird shapes
@pytest.mark.parametrize("bits", [2, 4])
def test_quantize_non_contiguous_keys_layout(shape, bits):
    # keys are quantized per channel along tokens: quantize_pack(k.transpose(-1, -2))
    k = torch.randn(*shape[:-1], 16, shape[-1])  # [..., T=16, D]
    a = ops.quantize_pack(k.transpose(-1, -2), bits, 16)
    b = ops.quantize_pack(k.transpose(-1, -2).contiguous(), bits, 16)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


def test_sqnr_floor():
    torch.manual_seed(0)
    x = torch.randn(64, 4096)
    # uniform step = group range / (2**bits - 1), error variance step**2 / 12: ~9.6 dB (2 bits), ~23.7 dB (4 bits)
    for bits, floor_db in ((2, 9.0), (4, 23.0)):
        c, s, m = ops.quantize_pack(x, bits, 16)
        err = x - ops.unpack_dequantize(c, s, m, bits, 16, torch.float32)
        sqnr = 10 * torch.log10(x.pow(2).mean() / err.pow(2).mean())
        assert sqnr > floor_db, (bits, float(sqnr))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_values_poison_only_their_own_group(bad):
    torch.manual_seed(1)
    x = torch.randn(2, 3, 64)
    clean = ops.quantize_pack(x, 2, 16)
    x[1, 2, 37] = bad  # group 2 of row (1, 2)
    dirty = ops.quantize_pack(x, 2, 16)
    codes_c, codes_d = clean[0], dirty[0]
    changed_words = (codes_c != codes_d).nonzero().tolist()
    assert all(w[:2] == [1, 2] and w[2] == 2 for w in changed_words), changed_words  # word 2 = elements 32..47
    for a, b in zip(clean[1:], dirty[1:]):
        same = (a == b) | (a.isnan() & b.isnan())
        same[1, 2, 2] = True
        assert bool(same.all())
    deq = ops.unpack_dequantize(*dirty, 2, 16, torch.float32)
    assert torch.isfinite(deq[0]).all() and torch.isfinite(deq[1, :2]).all()
    assert torch.isfinite(deq[1, 2, :32]).all() and torch.isfinite(deq[1, 2, 48:]).all()

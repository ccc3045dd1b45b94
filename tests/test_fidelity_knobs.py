"""The quantizer's fidelity knobs: sink tokens, separate key / value bits, clipped scales, rotation.

Each knob in the reference and the Triton kernels (interpreter: codes bit-identical), the properties
the issue asks for (hypothesis), the accounting, the presets and every bad input.
"""

import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from models import tiny_model
from test_ops import _store
from torch.library import opcheck

import minikv
from minikv import MiniKVCache, MiniKVConfig
from minikv.cache import MiniKVLayer
from minikv.compat import cache_key
from minikv.config import CLIP_GRID, PRESETS, from_preset
from minikv.kernels import ops, quant, reference, use_triton_on_cpu
from minikv.rotation import hadamard, rotate, unrotate

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
KEY = cache_key()  # past_key_values, or cache from transformers 5.24


def _layers(cache):
    return [layer for layer in cache.layers if isinstance(layer, MiniKVLayer)]


def _group_error(x, codes, scale, mn, bits, G):
    x_hat = quant.unpack_dequantize(codes, scale, mn, bits, G, torch.float64)
    return (x.double() - x_hat).square().reshape(*x.shape[:-1], -1, G).sum(-1)


# ---- clipped scales -------------------------------------------------------------------------------
@settings(max_examples=40, deadline=None)
@given(
    rows=st.integers(1, 4),
    groups=st.integers(1, 4),
    bits=st.sampled_from([2, 4]),
    G=st.sampled_from([16, 32]),
    seed=st.integers(0, 2**16),
    outliers=st.booleans(),
)
def test_a_clipped_scale_never_reconstructs_worse_than_min_max(rows, groups, bits, G, seed, outliers):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, groups * G, generator=g)
    if outliers:
        x[:, ::G] *= 20  # one outlier per group: where clipping pays
    plain = _group_error(x, *quant.quantize_pack(x, bits, G), bits, G)
    clipped = _group_error(x, *quant.quantize_pack(x, bits, G, clip=True), bits, G)
    assert (clipped <= plain).all()


def test_clipping_helps_on_gaussian_groups_and_keeps_constant_and_nonfinite_groups():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 256, generator=g)
    plain = _group_error(x, *quant.quantize_pack(x, 2, 16), 2, 16).sum()
    clipped = _group_error(x, *quant.quantize_pack(x, 2, 16, clip=True), 2, 16).sum()
    assert clipped < 0.9 * plain  # min-max wastes levels on the extremes at 2 bits
    y = torch.randn(2, 32)
    y[0, :16] = 0.5
    y[1, 16:] = float("nan")
    c0, s0, m0 = quant.quantize_pack(y, 2, 16)
    c1, s1, m1 = quant.quantize_pack(y, 2, 16, clip=True)
    assert s1[0, 0] == s0[0, 0] and m1[0, 0] == m0[0, 0]  # a constant group stays exact
    assert torch.allclose(s1[1, 1:], s0[1, 1:], equal_nan=True)  # a NaN group keeps min-max ...
    assert torch.allclose(m1[1, 1:], m0[1, 1:], equal_nan=True)
    assert (c1[1, 1:] == 0).all() and s1[1, 0].isfinite()  # ... and poisons only itself


# ---- rotation ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("D", [16, 64, 96, 128, 256])
def test_the_rotation_is_orthonormal_with_fixed_signs(D):
    R = hadamard(D)
    assert torch.allclose(R @ R.T, torch.eye(D), atol=1e-6)
    assert torch.equal(R, hadamard(D))  # fixed, not redrawn
    assert not torch.equal(R.abs(), R)  # signs present (not a plain Hadamard)


def test_rotation_with_quantization_off_leaves_attention_unchanged():
    g = torch.Generator().manual_seed(0)
    B, Hq, Hkv, T, D = 2, 4, 2, 37, 64
    q = torch.randn(B, Hq, 1, D, generator=g)
    k, v = torch.randn(B, Hkv, T, D, generator=g), torch.randn(B, Hkv, T, D, generator=g)
    R = hadamard(D)

    def attend(q, k, v):
        s = q.view(B, Hkv, Hq // Hkv, 1, D) @ k[:, :, None].transpose(-1, -2) * D**-0.5
        return (torch.softmax(s, -1) @ v[:, :, None]).view(B, Hq, 1, D)

    exact = attend(q.double(), k.double(), v.double())
    plain = attend(q, k, v)
    rotated = unrotate(attend(rotate(q, R), rotate(k, R), rotate(v, R)), R)
    budget = 2 * (plain.double() - exact).abs().max() + 1e-5
    assert (rotated.double() - exact).abs().max() <= budget


# ---- sinks ---------------------------------------------------------------------------------------------
@settings(max_examples=12, deadline=None)
@given(
    sinks=st.integers(1, 20),
    T=st.integers(10, 90),
    pad=st.integers(0, 8),
    budget=st.sampled_from([0.3, 0.5, None]),
    steps=st.integers(0, 40),
    bits=st.sampled_from([2, 4]),
)
def test_sinks_are_never_evicted_nor_quantized(sinks, T, pad, budget, steps, bits):
    model = minikv.patch(
        tiny_model("llama", dtype=torch.float32),
        bits=bits,
        budget=budget,
        sink_tokens=sinks,
        residual_length=16,
        scorer="snapkv",
    )
    try:
        g = torch.Generator().manual_seed(T)
        ids = torch.randint(1, 320, (2, T), generator=g)
        mask = torch.ones_like(ids)
        mask[1, :pad] = 0
        cache = MiniKVCache(model._minikv_patch.config, model.config, max_new_tokens=steps + 1)
        with torch.no_grad():
            out = model(ids, attention_mask=mask, use_cache=True, **{KEY: cache})
            prompt = [(layer.store.res_k.clone(), layer.store.n_sink.clone()) for layer in _layers(cache)]
            nxt = out.logits[:, -1:].argmax(-1)
            for _ in range(steps):
                mask = torch.cat([mask, torch.ones_like(nxt)], 1)
                out = model(nxt, attention_mask=mask, use_cache=True, **{KEY: cache})
                nxt = out.logits[:, -1:].argmax(-1)
        real = mask[:, :T].sum(-1)
        for layer, (res_k, n_sink) in zip(_layers(cache), prompt):
            assert n_sink.tolist() == torch.clamp(real, max=sinks).tolist()
            assert torch.equal(layer.store.n_sink, n_sink)  # never flushed
            for b in range(2):  # the sink slots still hold exactly what prefill put there
                n = int(n_sink[b])
                assert torch.equal(layer.store.res_k[b, :, :n], res_k[b, :, :n])
            assert (layer.store.res_len >= layer.store.n_sink).all()
            assert (layer.store.n_packed % 16 == 0).all()
    finally:
        minikv.unpatch(model)


def test_sinks_hold_the_first_prompt_tokens_in_full_precision():
    model = minikv.patch(
        tiny_model("llama", dtype=torch.float32), bits=2, budget=0.5, sink_tokens=4, residual_length=16, rotate="none"
    )  # (stored as given: no rotation to undo here)
    try:
        ids = torch.randint(1, 320, (1, 50), generator=torch.Generator().manual_seed(1))
        cache = MiniKVCache(model._minikv_patch.config, model.config, max_new_tokens=1)
        # the same selection, stored dense: its first kept tokens are the sinks, exactly
        full = minikv.MiniKVCache(MiniKVConfig(bits=16, budget=0.5, sink_tokens=4), model.config, max_new_tokens=1)
        with torch.no_grad():
            model(ids, use_cache=True, **{KEY: cache})
            model(ids, use_cache=True, **{KEY: full})
        for ours, dense in zip(_layers(cache), _layers(full)):  # in the residual's dtype: fp16 in an fp32 model
            assert ours.store.res_k.dtype == torch.float16
            assert torch.equal(ours.store.res_k[0, :, :4], dense.store.k[0, :, :4].half())
            assert torch.equal(ours.store.res_v[0, :, :4], dense.store.v[0, :, :4].half())
    finally:
        minikv.unpatch(model)


# ---- separate key / value bits -------------------------------------------------------------------
@pytest.mark.parametrize("k_bits,v_bits", [(4, 2), (2, 4)])
def test_accounting_of_key_and_value_bits_and_sinks(k_bits, v_bits):
    model = minikv.patch(
        tiny_model("llama", dtype=torch.float32),
        bits=2,
        k_bits=k_bits,
        v_bits=v_bits,
        budget=40,
        recent=8,
        residual_length=32,
        sink_tokens=3,
        scorer="snapkv",  # one count per layer and head: the hand computation below
    )
    try:
        cache = MiniKVCache(model._minikv_patch.config, model.config, max_new_tokens=8)
        ids = torch.randint(1, 320, (1, 70), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            out = model(ids, use_cache=True, **{KEY: cache})
            for _ in range(5):
                out = model(out.logits[:, -1:].argmax(-1), use_cache=True, **{KEY: cache})
    finally:
        minikv.unpatch(model)
    L, H, D, G = 3, 2, 16, 16
    # 40 kept = 3 sinks + 37 -> 32 packed + 5 residual; +5 decode tokens: residual 3 sinks + 10
    per_token = D * k_bits // 8 + D * v_bits // 8 + 2 * 2 * (D // G) * 2  # codes + fp16 scale & min, K and V
    residual = (3 + 10) * 2 * D * 2  # sinks and new tokens in fp16 (an fp32 model's residual_dtype=None)
    mem = cache.memory()
    assert mem.used_bytes == L * H * (32 * per_token + residual)
    for layer in _layers(cache):
        assert (layer.store.n_packed.tolist(), layer.store.res_len.tolist(), layer.store.n_sink.tolist()) == (
            [[32, 32]],
            [13],
            [3],
        )
        assert layer.store.k_codes.shape[-1] == layer.store.capacity * k_bits // 32
        assert layer.store.v_codes.shape[-1] == D * v_bits // 32


def test_decode_reads_keys_and_values_at_their_own_bits():
    g = torch.Generator().manual_seed(0)
    B, Hq, Hkv, D, G, C, R = 2, 4, 2, 32, 16, 64, 16
    k, v = torch.randn(B, Hkv, C, D, generator=g), torch.randn(B, Hkv, C, D, generator=g)
    kc, ks, km = quant.quantize_pack(k.transpose(-1, -2), 4, G)
    vc, vs, vm = quant.quantize_pack(v, 2, G)
    res_k, res_v = torch.randn(B, Hkv, R, D, generator=g), torch.randn(B, Hkv, R, D, generator=g)
    n_packed, res_len = torch.tensor([[64, 64], [32, 32]]), torch.tensor([3, 16])
    q = torch.randn(B, Hq, 1, D, generator=g)
    out = ops.decode_attention(q, kc, ks, km, vc, vs, vm, n_packed, res_k, res_v, res_len, D**-0.5, 0.0, 4, 2, G)
    K = quant.unpack_dequantize(kc, ks, km, 4, G, torch.float64).transpose(-1, -2)
    V = quant.unpack_dequantize(vc, vs, vm, 2, G, torch.float64)
    for b in range(B):
        n, r = int(n_packed[b, 0]), int(res_len[b])
        keys = torch.cat([K[b, :, :n], res_k[b, :, :r].double()], 1).repeat_interleave(2, 0)
        vals = torch.cat([V[b, :, :n], res_v[b, :, :r].double()], 1).repeat_interleave(2, 0)
        ref = torch.softmax(q[b].double() @ keys.transpose(-1, -2) * D**-0.5, -1) @ vals
        assert torch.allclose(out[b].double(), ref, atol=1e-5)


def test_opcheck_of_the_changed_ops():
    x = torch.randn(3, 64)
    opcheck(ops.quantize_pack, (x, 2, 16, True))
    B, H, D, G, S, R = 2, 2, 16, 16, 3, 32
    buf = _store(B, H, D, 96, 4, G)[:3] + _store(B, H, D, 96, 2, G)[3:]
    state = (
        torch.tensor([[0, 16], [16, 16]]),
        torch.randn(B, H, S + R, D),
        torch.randn(B, H, S + R, D),
        torch.tensor([33, 5]),
        torch.tensor([3, 2]),
    )
    opcheck(ops.append_kv, (torch.randn(B, H, 2, D), torch.randn(B, H, 2, D), *buf, *state, 4, 2, G, R, True))
    opcheck(ops.decode_attention, (torch.randn(B, 4, 1, D), *buf, *state[:4], 0.25, 0.0, 4, 2, G))


# ---- the Triton kernels (interpreter) --------------------------------------------------------------
triton_only = pytest.mark.skipif(not INTERPRETED, reason="needs TRITON_INTERPRET=1")


@pytest.fixture
def triton_on_cpu():
    use_triton_on_cpu(True)
    yield
    use_triton_on_cpu(False)


@triton_only
@pytest.mark.parametrize("bits,G", [(2, 16), (2, 32), (4, 8), (4, 16)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_clipped_quantize_pack_is_bit_exact(triton_on_cpu, bits, G, dtype):
    g = torch.Generator().manual_seed(bits * G)
    x = (torch.randn(5, 3, 128, generator=g) * 3).to(dtype)
    x[..., ::G] *= 8  # outliers: clipping picks ratios < 1
    x[0, 0, :G] = 1.5  # a constant group
    for data in (x, x.transpose(-1, -2).contiguous().transpose(-1, -2)):  # keys come transposed
        want = quant.quantize_pack(data, bits, G, clip=True)
        got = ops.quantize_pack(data, bits, G, True)
        for a, b in zip(want, got):
            assert a.dtype == b.dtype and torch.equal(a, b)
    assert not torch.equal(want[1], quant.quantize_pack(x, bits, G)[1])  # the clip search did change scales


@triton_only
def test_mixed_bit_decode_kernel_matches_the_reference(triton_on_cpu):
    g = torch.Generator().manual_seed(1)
    B, Hq, Hkv, D, G, C, R = 2, 8, 2, 64, 16, 96, 32
    k, v = torch.randn(B, Hkv, C, D, generator=g), torch.randn(B, Hkv, C, D, generator=g)
    for k_bits, v_bits in ((4, 2), (2, 4)):
        store = (*quant.quantize_pack(k.transpose(-1, -2), k_bits, G), *quant.quantize_pack(v, v_bits, G))
        rest = (
            torch.tensor([[96, 48], [48, 80]]),  # per KV head
            torch.randn(B, Hkv, R, D, generator=g),
            torch.randn(B, Hkv, R, D, generator=g),
            torch.tensor([7, 32]),
        )
        q = torch.randn(B, Hq, 2, D, generator=g)
        want = reference.decode_attention(q, *store, *rest, 0.125, 0.0, k_bits, v_bits, G)
        got = ops.decode_attention(q, *store, *rest, 0.125, 0.0, k_bits, v_bits, G)
        assert torch.allclose(got, want, atol=1e-5)


@triton_only
def test_generation_with_every_knob_through_triton_equals_the_reference(triton_on_cpu):
    model = tiny_model("llama", dtype=torch.float32, head_dim=64)
    ids = torch.randint(1, 320, (2, 70), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :9] = 0
    knobs = dict(
        bits=2, k_bits=4, budget=0.5, residual_length=16, sink_tokens=4, clip=True, rotate="v", scorer="snapkv"
    )
    outs = {}
    for backend in ("reference", "triton"):
        minikv.patch(model, backend=backend, **knobs)
        try:
            outs[backend] = model.generate(ids, attention_mask=mask, max_new_tokens=20, do_sample=False, pad_token_id=0)
        finally:
            minikv.unpatch(model)
    assert torch.equal(outs["reference"], outs["triton"])


# ---- presets and bad input ---------------------------------------------------------------------------
def test_the_paper_preset_is_minikvs_published_recipe():
    cfg = from_preset("paper")
    assert (cfg.bits, cfg.q_group_size, cfg.residual_length, cfg.scorer, cfg.schedule) == (
        2,
        16,
        128,
        "minikv",
        "pyramid",
    )
    assert (cfg.budget, cfg.recent, cfg.sink_tokens, cfg.clips, cfg.rotation) == (0.5, 0.5, 0, False, "none")
    assert (cfg.key_bits, cfg.value_bits) == (2, 2)
    four, off = from_preset("paper", bits=4), from_preset("paper", bits=16)
    assert (four.key_bits, four.value_bits, off.key_bits, off.value_bits) == (4, 4, 16, 16)
    assert from_preset("paper", k_bits=4).key_bits == 4 and from_preset("paper", k_bits=4).value_bits == 2
    model = minikv.patch(tiny_model("llama"), preset="paper")
    try:
        assert model._minikv_patch.config == cfg
    finally:
        minikv.unpatch(model)
    assert set(PRESETS) >= {"paper"}
    assert CLIP_GRID[0] == 1.0


@pytest.mark.parametrize(
    "kwargs, words",
    [
        (dict(k_bits=3), "k_bits must be one of [2, 4]"),
        (dict(v_bits=16), "v_bits must be one of [2, 4]"),
        (dict(bits=16, k_bits=4), "k_bits=4 needs a quantized store"),
        (dict(sink_tokens=-1), "sink_tokens must be an integer >= 0"),
        (dict(sink_tokens=9, budget=8, recent=0), "sink_tokens must be in [0, 8]"),
        (dict(clip="yes"), "clip must be True, False or None"),
        (dict(rotate="q"), "rotate must be one of"),
        (dict(bits=16, rotate="v"), "need bits=2 or 4"),
        (dict(bits=16, clip=True), "need bits=2 or 4"),
    ],
)
def test_bad_fidelity_knobs_are_refused(kwargs, words):
    with pytest.raises(ValueError) as e:
        MiniKVConfig(**kwargs)
    assert words in str(e.value)


def test_the_kvzip_preset_is_the_defaults_with_the_reconstruction_scorer_ranked_across_layers():
    assert from_preset("kvzip") == MiniKVConfig(scorer="kvzip", schedule="global")
    model = minikv.patch(tiny_model("llama"), preset="kvzip")
    try:
        assert model._minikv_patch.config.scorer == "kvzip" and model._minikv_patch.pass_hook is not None
    finally:
        minikv.unpatch(model)


def test_bad_preset_is_refused_before_patching():
    with pytest.raises(ValueError, match=r"preset must be one of \['paper', 'snapkv', 'kvzip'\], got 'nope'"):
        from_preset("nope")
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="preset must be one of"):
        minikv.patch(model, preset="nope")
    with pytest.raises(ValueError, match="pass either config= or knobs"):
        minikv.patch(model, config=MiniKVConfig(), bits=4)
    assert not minikv.is_patched(model)


def test_rotation_and_auto_groups_fit_a_head_dim_of_96():
    model = tiny_model("llama", dtype=torch.float32, head_dim=96)  # Phi-3's head_dim
    assert MiniKVConfig().for_head_dim(96).q_group_size == 32
    R = hadamard(96)
    assert torch.allclose(R @ R.T, torch.eye(96), atol=1e-6)
    minikv.patch(model)  # the defaults: rotate="kv" (3 Hadamard blocks of 32), G 32
    try:
        out = model.generate(torch.randint(1, 320, (1, 40)), max_new_tokens=4, do_sample=False, pad_token_id=0)
    finally:
        minikv.unpatch(model)
    assert out.shape == (1, 44)

"""The precision tier (``tier_share``, ``tier_bits``): each head's best-scored kept prompt tokens stored at
wider codes, in a second packed store that decode reads in the same attention as the main store and
the residual."""

import pytest
import torch
import torch._dynamo as dynamo
from models import tiny_model
from test_compile import eager_and_compiled
from torch.library import opcheck

import minikv
from minikv import MiniKVConfig
from minikv.cache import MiniKVLayer
from minikv.compat import cache_key
from minikv.kernels import cpu_ops, native, ops, quant, reference, use_triton_on_cpu
from minikv.rotation import rotate
from minikv.store import QuantizedStore, packed_token_bytes


def _generate(ids, new=10, **knobs):
    model = minikv.patch(tiny_model("llama", head_dim=32), **knobs)
    out = model.generate(
        ids, max_new_tokens=new, do_sample=False, pad_token_id=0, return_dict_in_generate=True, output_scores=True
    )
    return out.sequences, torch.stack(out.scores), getattr(out, cache_key())


def _layers(cache):
    return [layer for layer in cache.layers if isinstance(layer, MiniKVLayer)]


def test_a_whole_tier_at_k4_v4_is_the_k4_v4_store():
    """Every body token in the tier (sinks and the last < G in the residual, as any store) is a K4 V4 store:
    the same groups of the same tokens, so the same logits bit for bit."""
    ids = torch.randint(1, 320, (2, 150), generator=torch.Generator().manual_seed(0))
    seq_a, logits_a, cache_a = _generate(ids, bits=2, v_bits=4, residual_length=32)
    seq_b, logits_b, cache_b = _generate(ids, bits=2, residual_length=32, tier_share=1.0, tier_bits=(4, 4))
    assert torch.equal(seq_a, seq_b) and torch.equal(logits_a, logits_b)
    assert cache_a.memory().used_bytes == cache_b.memory().used_bytes
    assert all(int(layer.store.n_packed.max()) <= 32 for layer in _layers(cache_b))  # the prompt went to the tier


def _store_with_prompt(share, n_keep, seed=0, B=2, H=2, D=32, N=120, G=32, sinks=4):
    cfg = MiniKVConfig(bits=2, q_group_size=G, residual_length=64, sink_tokens=sinks, tier_share=share)
    store = QuantizedStore(cfg, B, H, D, N + 64, torch.float32, "cpu", int((N - sinks) * share), share)
    g = torch.Generator().manual_seed(seed)
    k, v = torch.randn(B, H, N, D, generator=g), torch.randn(B, H, N, D, generator=g)
    scores = torch.rand(B, H, N, generator=g)
    store.write_prompt(k, v, n_keep, scores)
    return store, k, v, scores


def test_the_tier_holds_each_heads_best_scored_body_tokens_in_whole_groups():
    n_keep = torch.tensor([[120, 88], [100, 100]])  # per head; the bodies 116/84 and 96 leave the same remainder
    share, G, S = 0.6, 32, 4
    store, k, v, scores = _store_with_prompt(share, n_keep)
    kr, vr = rotate(k, store.rot_k), rotate(v, store.rot_v)
    tk, tv = store.tier_bits
    for b in range(2):
        for h in range(2):
            n, body = int(n_keep[b, h]), torch.arange(S, int(n_keep[b, h]))
            n_tier = int((n - S) * share) // G * G
            assert int(store.tier[-1][b, h]) == n_tier
            best = body[scores[b, h, S:n].argsort(descending=True, stable=True)[:n_tier]].sort().values
            rest = body[~torch.isin(body, best)]
            # the tier's codes are those of its tokens in temporal order; the main store's those of the rest
            want = quant.quantize_pack(kr[b, h, best].T, tk, G, True)
            for got, w in zip(store.tier[:3], want):
                assert torch.equal(got[b, h, :, : w.shape[-1]], w)
            want = quant.quantize_pack(vr[b, h, best], tv, G, True)
            for got, w in zip(store.tier[3:6], want):
                assert torch.equal(got[b, h, :n_tier], w)
            packed = int(store.n_packed[b, h])
            assert packed == (len(rest) // G) * G
            want = quant.quantize_pack(vr[b, h, rest[:packed]], store.v_bits, G, True)
            for got, w in zip((store.v_codes, store.v_scale, store.v_mn), want):
                assert torch.equal(got[b, h, :packed], w)
            # the residual: the sinks, then the rest's last tokens (< G), in full precision
            r = int(store.res_len[b])
            assert torch.equal(store.res_k[b, h, :S], kr[b, h, :S].half())  # an fp32 model's residual: fp16
            assert torch.equal(store.res_k[b, h, S:r], kr[b, h, rest[packed:]].half())


def test_a_turn_fills_the_tier_after_the_held_tokens_with_its_best_scored_share():
    """A later turn's kept tokens: each head's best-scored share (whole groups) packed after the tier's own
    tokens, which stay byte for byte; the others follow the residual's tokens into the main store."""
    store, *_ = _store_with_prompt(0.6, torch.tensor([[120, 88], [100, 100]]))
    store = store.resized(store.capacity + 64, store.tier_capacity + 64)
    held = [t.clone() for t in store.tier]
    before = {"n_packed": store.n_packed.clone(), "res_len": store.res_len.clone(), "res_k": store.res_k.clone()}
    g = torch.Generator().manual_seed(5)
    N, G, D = 76, 32, 32
    k, v, scores = (
        torch.randn(2, 2, N, D, generator=g),
        torch.randn(2, 2, N, D, generator=g),
        torch.rand(2, 2, N, generator=g),
    )
    store.extend(k, v, scores)
    kr, vr = rotate(k, store.rot_k), rotate(v, store.rot_v)
    n_t = int(N * 0.6) // G * G  # 32 of the 76
    assert (store.tier[-1] == held[-1] + n_t).all()
    tk, tv = store.tier_bits
    for b in range(2):
        for h in range(2):
            n0 = int(held[-1][b, h])
            # the held tokens: byte for byte
            assert torch.equal(store.tier[3][b, h, :n0], held[3][b, h, :n0])
            assert torch.equal(store.tier[0][b, h, :, : n0 // 8], held[0][b, h, :, : n0 // 8])
            best = scores[b, h].argsort(descending=True, stable=True)[:n_t].sort().values
            want = quant.quantize_pack(kr[b, h, best].T, tk, G, True)
            assert torch.equal(store.tier[0][b, h, :, n0 // 8 : (n0 + n_t) // 8], want[0])
            assert torch.equal(store.tier[1][b, h, :, n0 // G : (n0 + n_t) // G], want[1])
            want = quant.quantize_pack(vr[b, h, best], tv, G, True)
            assert torch.equal(store.tier[3][b, h, n0 : n0 + n_t], want[0])
            # the rest: after the residual's body tokens, packed in whole groups, the last < G in the residual
            rest = torch.tensor([i for i in range(N) if i not in set(best.tolist())])
            s, r, p = int(store.n_sink[b]), int(before["res_len"][b]), int(before["n_packed"][b, h])
            body = torch.cat([before["res_k"][b, h, s:r].float(), kr[b, h, rest].half().float()])
            F = len(body) // G * G
            assert int(store.n_packed[b, h]) == p + F and int(store.res_len[b]) == s + len(body) - F
            if F:
                want = quant.quantize_pack(body[:F].T, store.k_bits, G, True)
                assert torch.equal(store.k_codes[b, h, :, p // 8 : (p + F) // 8], want[0])
            assert torch.equal(store.res_k[b, h, s : s + len(body) - F].float(), body[F:])
    assert store.used_bytes() == (
        int(store.tier[-1].sum()) * packed_token_bytes(D, 4, 4, G)
        + int(store.n_packed.sum()) * packed_token_bytes(D, 4, 2, G)
        + 2 * int(store.res_len.sum()) * 2 * D * 2
    )


def test_the_tiers_bytes_are_counted_exactly():
    store, *_ = _store_with_prompt(0.6, torch.tensor([[120, 88], [100, 100]]))
    D, G = 32, 32
    want = (
        int(store.tier[-1].sum()) * packed_token_bytes(D, 4, 4, G)
        + int(store.n_packed.sum()) * packed_token_bytes(D, 4, 2, G)
        + 2 * int(store.res_len.sum()) * 2 * D * 2  # 2 heads, K and V, fp16 (an fp32 model's residual)
    )
    assert store.used_bytes() == want
    k, v, valid = store.dense()
    assert valid.sum(-1).tolist() == store.lengths().tolist() == [[120, 88], [100, 100]]


def _packed(B, H, C, D, bits, G, g):
    """Codes, scales and minimums of ``C`` random tokens per head: keys ``bits[0]``-bit, values ``bits[1]``-bit."""
    k, v = torch.randn(B, H, C, D, generator=g), torch.randn(B, H, C, D, generator=g)
    return [*quant.quantize_pack(k.transpose(-1, -2), bits[0], G), *quant.quantize_pack(v, bits[1], G)]


def _tiered_inputs(B=2, Hq=6, Hkv=3, D=64, G=32, Lq=2, tier_bits=(4, 4), main_bits=(4, 2), seed=0):
    """``(the untiered op's arguments, the tier's arguments)``: a K4 V2 store of 160 slots, a 36-token
    residual and a tier of 64 slots, with per-head fill levels (some empty)."""
    g = torch.Generator().manual_seed(seed)
    main = _packed(B, Hkv, 160, D, main_bits, G, g)
    n_packed = torch.tensor([[64, 96, 32], [128, 0, 64]])
    res_k, res_v = torch.randn(B, Hkv, 36, D, generator=g), torch.randn(B, Hkv, 36, D, generator=g)
    res_len = torch.tensor([5, 9])
    tier = _packed(B, Hkv, 64, D, tier_bits, G, g)
    n_tier = torch.tensor([[64, 32, 0], [32, 64, 64]])
    q = torch.randn(B, Hq, Lq, D, generator=g)
    args = (q, *main, n_packed, res_k, res_v, res_len, D**-0.5, 0.0, *main_bits, G)
    return args, (*tier, n_tier, *tier_bits)


def test_the_reference_reads_the_tier_as_more_tokens_of_one_softmax():
    """A tier of n tokens is n more tokens in the softmax: fp64 attention over their dequantized keys and
    values, the main store's and the residual's."""
    main, tier = _tiered_inputs(Lq=1)
    got = reference.decode_attention(*main, *tier)
    q, kc, ks, km, vc, vs, vm, npk, rk, rv, rl, scale, _, kb, vb, G = main
    tkc, tks, tkm, tvc, tvs, tvm, n_tier, tkb, tvb = tier
    keys = [
        quant.unpack_dequantize(tkc, tks, tkm, tkb, G, torch.float64).transpose(-1, -2),
        quant.unpack_dequantize(kc, ks, km, kb, G, torch.float64).transpose(-1, -2),
        rk.double(),
    ]
    vals = [
        quant.unpack_dequantize(tvc, tvs, tvm, tvb, G, torch.float64),
        quant.unpack_dequantize(vc, vs, vm, vb, G, torch.float64),
        rv.double(),
    ]
    B, Hq, _, D = q.shape
    Hkv = rk.shape[1]
    for b in range(B):
        for h in range(Hkv):
            n = (int(n_tier[b, h]), int(npk[b, h]), int(rl[b]))
            kk = torch.cat([x[b, h, :m] for x, m in zip(keys, n)])
            vv = torch.cat([x[b, h, :m] for x, m in zip(vals, n)])
            for qh in range(h * Hq // Hkv, (h + 1) * Hq // Hkv):
                p = torch.softmax(q[b, qh, 0].double() @ kk.T * scale, -1)
                assert torch.allclose(got[b, qh, 0].double(), p @ vv, atol=1e-5)


@pytest.mark.parametrize("tier_bits", [(4, 4), (2, 4), (4, 2)])
@pytest.mark.parametrize("Lq", [1, 3])
def test_the_cpu_kernel_reads_the_tier_as_the_reference(tier_bits, Lq):
    if not native.available():
        pytest.skip("the C++ CPU kernels did not build")
    main, tier = _tiered_inputs(Lq=Lq, tier_bits=tier_bits)
    want = reference.decode_attention(*main, *tier)
    got = cpu_ops.decode_attention(*main, *tier)
    assert torch.allclose(got, want, atol=2e-5)
    # an empty tier is no tier
    empty = (*tier[:6], torch.zeros_like(tier[6]), *tier[7:])
    assert torch.allclose(cpu_ops.decode_attention(*main, *empty), reference.decode_attention(*main), atol=2e-5)


@pytest.mark.parametrize("tier_bits", [(4, 4), (2, 4)])
def test_the_triton_kernel_reads_the_tier_as_the_reference(tier_bits):
    import os

    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs TRITON_INTERPRET=1")
    from minikv.kernels import triton_decode

    main, tier = _tiered_inputs(Lq=2, tier_bits=tier_bits)
    want = reference.decode_attention(*main, *tier)
    assert torch.allclose(triton_decode.decode_attention(*main, *tier), want, atol=2e-5)
    use_triton_on_cpu(True)
    try:
        assert torch.allclose(ops.decode_attention(*main, *tier), want, atol=2e-5)
        opcheck(ops.decode_attention, (*main, *tier))
    finally:
        use_triton_on_cpu(False)


def test_opcheck_of_the_tiered_decode():
    main, tier = _tiered_inputs(Lq=1)
    opcheck(ops.decode_attention, (*main, *tier))


def test_later_turns_extend_the_tier_and_leave_its_tokens_untouched():
    """A turn adds its best-scored share to the tier after the tokens held, which stay byte for byte (so do
    they through decoding: decoded tokens go to the main store)."""
    model = minikv.patch(tiny_model("llama", head_dim=32), bits=2, residual_length=32, tier_share=0.6)
    ids = torch.randint(1, 320, (1, 160), generator=torch.Generator().manual_seed(1))
    out = model.generate(ids, max_new_tokens=40, do_sample=False, pad_token_id=0, return_dict_in_generate=True)
    cache = getattr(out, cache_key())
    layers = _layers(cache)
    before = [[t.clone() for t in layer.store.tier] for layer in layers]
    assert all(int(t[-1].sum()) > 0 for t in before)
    turn = torch.cat([out.sequences, torch.randint(1, 320, (1, 200), generator=torch.Generator().manual_seed(2))], 1)
    model.generate(turn, max_new_tokens=40, do_sample=False, pad_token_id=0, **{cache_key(): cache})
    grew = 0
    for layer, old in zip(layers, before):
        tier, G = layer.store.tier, layer.store.group
        grew += int((tier[-1] - old[-1]).sum())
        assert ((tier[-1] - old[-1]) % G == 0).all() and (tier[-1] >= old[-1]).all()
        for b, h in ((0, h) for h in range(tier[-1].shape[1])):
            n0 = int(old[-1][b, h])
            for new, held in zip(tier[3:6], old[3:6]):  # values and their scales: the held tokens' rows
                assert torch.equal(new[b, h, :n0], held[b, h, :n0])
            for new, held in zip(tier[:3], old[:3]):  # keys: the held groups' columns
                w = n0 * new.shape[-1] // layer.store.tier_capacity
                assert torch.equal(new[b, h, :, :w], held[b, h, :, :w])
    assert grew > 0  # the turn's kept tokens reached the tier


def test_max_cache_len_reserves_the_tier_for_every_turn():
    """Built with ``max_cache_len``, the tier has room for the turns' share too: a turn fills it in place."""
    from minikv import MiniKVCache

    model = minikv.patch(tiny_model("llama", head_dim=32), bits=2, residual_length=32, tier_share=0.6)
    cache = MiniKVCache(model._minikv_patch.config, model.config, max_cache_len=600)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        model(torch.randint(1, 320, (1, 160), generator=g), **{cache_key(): cache}, use_cache=True)
        layers = _layers(cache)
        buffers = [[t.data_ptr() for t in layer.store.all_state()] for layer in layers]
        held = [int(layer.store.tier[-1].sum()) for layer in layers]
        for n in (200, 1, 150):  # two turns and a decode step between them
            model(torch.randint(1, 320, (1, n), generator=g), **{cache_key(): cache}, use_cache=True)
    assert [[t.data_ptr() for t in layer.store.all_state()] for layer in layers] == buffers
    assert all(int(layer.store.tier[-1].sum()) > h for layer, h in zip(layers, held))


def test_compiled_decode_with_a_tier_is_one_graph_and_matches_eager():
    model = minikv.patch(tiny_model("llama", head_dim=32), bits=2, budget=0.5, residual_length=32, tier_share=0.5)
    eager_toks, eager_logits, toks, logits, cache = eager_and_compiled(model, 150, 40)
    assert all(layer.store.tier for layer in _layers(cache))
    assert torch.equal(toks, eager_toks)
    assert torch.allclose(logits, eager_logits, atol=1e-5)
    assert dynamo.utils.counters["stats"]["unique_graphs"] == 1
    assert not dynamo.utils.counters["graph_break"]


def test_a_tier_by_layer():
    """One share per compressed layer: a layer at 1.0 holds its prompt at the tier's widths, one at 0 none."""
    ids = torch.randint(1, 320, (1, 150), generator=torch.Generator().manual_seed(3))
    *_, cache = _generate(ids, new=4, bits=2, residual_length=32, tier_share=[1.0, 0.0, 0.5])
    tiers = [int(layer.store.tier[-1].sum()) if layer.store.tier else 0 for layer in _layers(cache)]
    assert tiers[0] > tiers[2] > 0 and tiers[1] == 0
    assert int(_layers(cache)[0].store.n_packed.max()) == 0


@pytest.mark.parametrize(
    "knobs,match",
    [
        (dict(tier_share=1.5), r"tier_share .* must be in \[0, 1\]"),
        (dict(tier_share=-0.1), r"tier_share .* must be in \[0, 1\]"),
        (dict(tier_share=True), r"tier_share .* must be in \[0, 1\]"),
        (dict(tier_share=0.5, tier_bits=(4, 8)), r"tier_bits must be \(key bits, value bits\), each one of \[2, 4\]"),
        (dict(tier_share=0.5, tier_bits=4), r"tier_bits must be"),
        (dict(tier_share=0.5, bits=16), r"needs a quantized store"),
        (dict(tier_share=0.5, budget=None), r"needs a quantized store .* and a budget"),
        (dict(tier_share=[1.0, 0.5]), r"tier_share has 2 shares but the model has 3 compressed layers"),
        (dict(tier_share=[1.0, 0.5, 2.0]), r"tier_share .* must be in \[0, 1\], or a sequence"),
    ],
)
def test_bad_tier_knobs_are_refused_before_anything_changes(knobs, match):
    model = tiny_model("llama")
    with pytest.raises(ValueError, match=match):
        minikv.patch(model, **knobs)
    assert not minikv.is_patched(model)


def test_the_default_tier_is_the_models_calibration():
    """``tier_share=None`` (the default): a calibrated model (SmolLM2-135M's architecture) holds its listed
    layers' prompt in the tier; an uncalibrated one, a preset that predates the tier, an explicit share and
    an unquantized cache get none of it."""
    from transformers import LlamaConfig

    from minikv.cache import config_for_model
    from minikv.calibration import V4_LAYERS
    from minikv.config import build_config

    smollm2 = LlamaConfig(
        hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, vocab_size=49152
    )
    layers = V4_LAYERS[("llama", 30, 576, 9, 3, 49152)]
    share = config_for_model(MiniKVConfig(), smollm2).tier_share
    assert share == tuple(1.0 if i in layers else 0.0 for i in range(30))
    assert config_for_model(MiniKVConfig().replace(budget=0.4), smollm2).tier_share == share  # survives replace
    assert config_for_model(MiniKVConfig(tier_share=0.0), smollm2).tier_share == 0.0
    assert config_for_model(MiniKVConfig(bits=16), smollm2).tier_share == 0.0
    assert config_for_model(build_config(preset="paper"), smollm2).tier_share == 0.0
    assert config_for_model(build_config(preset="snapkv"), smollm2).tier_share == 0.0
    assert config_for_model(MiniKVConfig(), tiny_model("llama").config).tier_share == 0.0

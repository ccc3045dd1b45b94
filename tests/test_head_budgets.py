"""Per-head budgets (``head_budgets="adaptive"``, AdaKV): one ranking over the heads' tokens at the
uniform total, a floor per head, whole groups; the store holds a count per KV head, decode reads each
head's own tokens, later turns leave them untouched, and bad combinations are refused."""

import pytest
import torch
from models import tiny_model

import minikv
from minikv import MiniKVCache, MiniKVConfig
from minikv.budget import GLOBAL_SPAN, across_layers, keep_counts
from minikv.cache import MiniKVLayer
from minikv.compat import cache_key
from minikv.kernels import ops, reference
from minikv.store import packed_token_bytes

KEY = cache_key()


def _layers(cache):
    return [layer for layer in cache.layers if isinstance(layer, MiniKVLayer)]


@pytest.mark.parametrize("schedule,L", [("global", 3), ("uniform", 1)])
def test_one_ranking_over_heads_keeps_the_uniform_total_with_a_floor_per_head(schedule, L):
    cfg = MiniKVConfig(
        bits=2, budget=0.5, recent=8, sink_tokens=4, scorer="kvzip", schedule=schedule, head_budgets="adaptive"
    )
    g = torch.Generator().manual_seed(0)
    B, H, T, G = 2, 3, 400, 16
    weights = torch.tensor([[4.0, 1.0, 0.1], [1.0, 1.0, 1.0], [0.2, 0.3, 2.0]])[:L]  # heads that rank high / low
    scores = [torch.rand(B, H, T, generator=g) * w[None, :, None] for w in weights]
    valid = torch.ones(B, T, dtype=torch.bool)
    valid[1, :50] = 0
    keep, recent = keep_counts(cfg.replace(schedule="uniform"), 0, L, valid.sum(-1))
    counts = across_layers(cfg, scores, valid, group=G)
    heavy = keep - recent
    total = sum(k.sum(1) for k, _ in counts)  # [B]
    assert bool((total <= L * H * keep).all()) and bool((total > L * H * keep - L * H * G).all())
    for k, r in counts:
        assert k.shape == (B, H) and torch.equal(r, recent)
        assert bool(((k - 4) % G == 0).all())  # whole groups after the sinks: the residual holds only sinks
        assert bool(((k - r[:, None]) >= (cfg.head_floor * heavy)[:, None].floor() - G).all())
        assert bool(((k - r[:, None]) <= GLOBAL_SPAN[1] * heavy[:, None]).all())
    assert bool((counts[0][0][:, 0] > counts[0][0][:, 2]).all())  # the head whose tokens rank high keeps more


def test_generation_with_per_head_counts_reads_each_heads_own_tokens():
    model = minikv.patch(
        tiny_model("llama"),
        bits=2,
        budget=0.5,
        residual_length=16,
        scorer="kvzip",
        schedule="global",
        head_budgets="adaptive",
        head_floor=0.0,
    )
    ids = torch.randint(1, 320, (2, 96), generator=torch.Generator().manual_seed(4))
    out = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0, return_dict_in_generate=True)
    cache = getattr(out, KEY)
    layers = _layers(cache)
    counts = torch.stack([layer.store.n_packed for layer in layers])  # [L, B, H]
    assert bool((counts != counts[..., :1]).any())  # the heads hold different counts
    for layer in layers:  # every byte counted per head
        st = layer.store
        B, H, D = st.k_codes.shape[:3]
        res = H * int(st.res_len.sum()) * 2 * D * st.res_k.element_size()
        assert st.used_bytes() == int(st.n_packed.sum()) * packed_token_bytes(D, 4, 2, st.group) + res
    # decode equals attention over each head's dequantized tokens (the store's dense view, per-head mask)
    layer = layers[0]
    k, v, valid = layer.store.dense()
    q = torch.randn(2, 4, 1, k.shape[-1])
    got = layer.store.attend(None, q, 0.25, 0.0)[0].transpose(1, 2)
    logits = (q.double() @ k.double().repeat_interleave(2, 1).transpose(-1, -2)) * 0.25
    mask = valid.repeat_interleave(2, 1)[:, :, None]
    want = torch.softmax(logits.masked_fill(~mask, float("-inf")), -1) @ v.double().repeat_interleave(2, 1)
    assert torch.allclose(got.double(), want, atol=1e-5)


@pytest.mark.parametrize("scorer,schedule", [("kvzip", "global"), ("snapkv", "uniform")])
def test_a_later_turn_leaves_each_heads_tokens_untouched(scorer, schedule):
    model = minikv.patch(
        tiny_model("llama"),
        bits=2,
        budget=0.5,
        residual_length=16,
        sink_tokens=4,
        scorer=scorer,
        schedule=schedule,
        head_budgets="adaptive",
        head_floor=0.0,
    )
    cache = MiniKVCache(model._minikv_patch.config, model.config, max_new_tokens=8)
    with torch.no_grad():
        model(
            torch.randint(1, 320, (1, 128), generator=torch.Generator().manual_seed(1)), use_cache=True, **{KEY: cache}
        )
    before = []
    for layer in _layers(cache):
        st = layer.store
        heads = []
        for h, p in enumerate(st.n_packed[0].tolist()):
            heads.append((st.k_codes[0, h, :, : p // 8].clone(), st.v_codes[0, h, :p].clone(), p))
        before.append((heads, st.res_k[0, :, :4].clone()))
    with torch.no_grad():
        model(torch.randint(1, 320, (1, 40)), use_cache=True, **{KEY: cache})
        model(torch.randint(1, 320, (1, 1)), use_cache=True, **{KEY: cache})  # a decode step after the turn
    for layer, (heads, sinks) in zip(_layers(cache), before):
        st = layer.store
        for h, (kc, vc, p) in enumerate(heads):
            assert int(st.n_packed[0, h]) >= p
            assert torch.equal(st.k_codes[0, h, :, : p // 8], kc) and torch.equal(st.v_codes[0, h, :p], vc)
        assert torch.equal(st.res_k[0, :, :4], sinks)


def test_folding_the_heads_into_the_batch_equals_one_call_per_head():
    """A context whose heads hold different tokens (valid [B, Hkv, S]) is attended by folding the KV heads
    into the batch: the same as calling the op on each head alone."""
    from minikv import heads

    g = torch.Generator().manual_seed(2)
    B, Hq, Hkv, S, M, D = 2, 6, 3, 40, 7, 16
    q = torch.randn(B, Hq, M, D, generator=g)
    k, v = torch.randn(B, Hkv, S, D, generator=g), torch.randn(B, Hkv, S, D, generator=g)
    kn, vn = torch.randn(B, Hkv, M, D, generator=g), torch.randn(B, Hkv, M, D, generator=g)
    valid = torch.rand(B, Hkv, S, generator=g) < 0.6
    counted = torch.rand(B, M, generator=g) < 0.7
    out, scores = ops.reconstruct_attention(
        heads.fold_q(q, Hkv),
        heads.fold_kv(k),
        heads.fold_kv(v),
        valid.reshape(B * Hkv, S),
        heads.fold_kv(kn),
        heads.fold_kv(vn),
        heads.fold_rows(counted, Hkv),
        0.25,
        0.0,
    )
    out, scores = heads.unfold(out, B), heads.unfold(scores, B)
    g_ = Hq // Hkv
    for h in range(Hkv):
        rows = slice(h * g_, (h + 1) * g_)
        o, s = reference.reconstruct_attention(
            q[:, rows],
            k[:, h : h + 1],
            v[:, h : h + 1],
            valid[:, h],
            kn[:, h : h + 1],
            vn[:, h : h + 1],
            counted,
            0.25,
            0.0,
        )
        assert torch.allclose(out[:, rows], o, atol=1e-5) and torch.allclose(scores[:, h : h + 1], s, atol=1e-6)


def test_compiled_decode_at_the_defaults_is_one_graph():
    """The defaults (kvzip, layers and heads ranked together: per-head counts): the decode step compiles
    into one graph without breaks and equals eager."""
    import torch._dynamo as dynamo

    model = minikv.patch(tiny_model("llama"), residual_length=16)
    assert (model._minikv_patch.config.scorer, model._minikv_patch.config.head_budgets) == ("kvzip", "adaptive")
    ids = torch.randint(1, 320, (1, 80), generator=torch.Generator().manual_seed(5))
    eager = minikv.generate(model, ids, max_new_tokens=20)
    dynamo.reset()
    dynamo.utils.counters.clear()
    compiled = minikv.generate(model, ids, max_new_tokens=20, compile=True)
    assert torch.equal(eager, compiled)
    assert dynamo.utils.counters["stats"]["unique_graphs"] == 1
    assert not dynamo.utils.counters["graph_break"]


@pytest.mark.parametrize(
    "knobs,needs",
    [
        (dict(bits=16), "quantized store"),
        (dict(budget=None), "a budget"),
        (dict(schedule="pyramid"), "schedule='uniform' or 'global'"),
        (dict(scorer="streaming"), "other than 'streaming'"),
        (dict(crush=0.2), "crush=0"),
    ],
)
def test_per_head_budgets_refuse_what_they_cannot_do(knobs, needs):
    with pytest.raises(ValueError, match=f"head_budgets='adaptive'.*{needs}"):
        MiniKVConfig(**{"bits": 2, "budget": 0.5, "head_budgets": "adaptive", **knobs})


@pytest.mark.parametrize("value", [-0.1, 1.5, "0.2", True])
def test_head_floor_range(value):
    with pytest.raises(ValueError, match=r"head_floor .* must be in \[0, 1\]"):
        MiniKVConfig(head_floor=value)
    with pytest.raises(ValueError, match="head_budgets must be one of"):
        MiniKVConfig(head_budgets="per-head")


def test_a_short_prompt_never_exceeds_the_uniform_total_and_keeps_one_remainder():
    """Too few tokens for whole groups after the sinks in some head: every head's scored part is rounded
    down to whole groups instead, so the heads share the residual's remainder and the total never grows."""
    cfg = MiniKVConfig(bits=2, budget=0.5, sink_tokens=4, scorer="kvzip")
    g = torch.Generator().manual_seed(3)
    for T in (40, 48, 70, 100):
        scores = [torch.rand(1, 2, T, generator=g) for _ in range(3)]
        valid = torch.ones(1, T, dtype=torch.bool)
        keep, _ = keep_counts(cfg.replace(schedule="uniform"), 0, 3, valid.sum(-1))
        counts = across_layers(cfg, scores, valid, group=16)
        assert int(sum(k.sum() for k, _ in counts)) <= 3 * 2 * int(keep)
        rests = {int(x) for k, _ in counts for x in ((k - 4) % 16).flatten()}
        assert len(rests) == 1, (T, rests)

"""The reconstruction scorer (``scorer="kvzip"``): the pass's scores are the attention the re-read
prompt gives each prompt token in an unpatched model, memory is bounded by the chunk, the prompt's own
output is the unpatched model's, later turns leave the tokens held untouched, bad knobs are refused."""

import pytest
import torch
from models import tiny_model

import minikv
from minikv import MiniKVCache
from minikv.cache import MiniKVLayer
from minikv.compat import cache_key
from minikv.kernels import reference
from minikv.reconstruct import OVERLAP

KEY = cache_key()


@pytest.fixture
def captured(monkeypatch):
    """The pending scores of each compressed layer when the pass commits them: ``[[B, H, N], ...]``."""
    seen = []
    commit = MiniKVLayer.commit

    def spy(self, *args, **kwargs):
        seen.append(self.pending.scores.clone())
        return commit(self, *args, **kwargs)

    monkeypatch.setattr(MiniKVLayer, "commit", spy)
    return seen


def _eager_scores(model, ids, chunk, prefix=()):
    """Per layer ``[1, Hkv, T]``: the most attention any counted re-read query gives each prompt token,
    from the unpatched model's eager attention over ``[prompt ; prefix ; re-read chunk]`` (one forward per chunk)."""
    T = ids.shape[1]
    cfg = model.config
    g = cfg.num_attention_heads // cfg.num_key_value_heads
    best = [torch.zeros(1, cfg.num_key_value_heads, T, dtype=torch.float64) for _ in range(cfg.num_hidden_layers)]
    for start in range(0, T, chunk):
        first, end = max(start - OVERLAP, 0), min(start + chunk, T)
        lead = torch.tensor([list(prefix)], dtype=ids.dtype).view(1, -1)
        seq = torch.cat([ids, lead, ids[:, first:end]], 1)
        pos = torch.arange(seq.shape[1])[None]
        with torch.no_grad():
            att = model(seq, position_ids=pos, output_attentions=True).attentions  # [1, Hq, L, L] per layer
        for layer, a in enumerate(att):
            rows = a[
                :, :, T + len(prefix) + (start - first) :, :T
            ].double()  # the counted queries, the prompt's columns
            per_kv = rows.reshape(1, cfg.num_key_value_heads, g, -1, T).amax(dim=(2, 3))
            best[layer] = torch.maximum(best[layer], per_kv)
    return best


@pytest.mark.parametrize("chunk, prefix", [(200, ()), (24, ()), (24, (5, 17, 9))])
def test_scores_are_the_attention_of_the_re_read_prompt_in_the_unpatched_model(captured, chunk, prefix):
    model = tiny_model("llama")
    ids = torch.randint(1, 320, (1, 60), generator=torch.Generator().manual_seed(0))
    model.set_attn_implementation("eager")
    expected = _eager_scores(model, ids, min(chunk, 60), prefix)
    model.set_attn_implementation("sdpa")
    minikv.patch(
        model,
        bits=2,
        budget=0.5,
        residual_length=16,
        scorer="kvzip",
        reconstruct_chunk=chunk,
        reconstruct_prefix=prefix,
    )
    cache = MiniKVCache(model._minikv_patch.config, model.config, max_new_tokens=4)
    with torch.no_grad():
        model(ids, **{KEY: cache}, use_cache=True)
    assert len(captured) == 3
    for got, want in zip(captured, expected):
        assert torch.allclose(got.double(), want, rtol=1e-5, atol=1e-7), float((got - want).abs().max())


def test_the_prompt_is_attended_in_full_precision_and_decode_reads_the_kept_tokens():
    model = tiny_model("llama")
    ids = torch.randint(1, 320, (1, 80), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(ids).logits
    minikv.patch(
        model, bits=2, budget=0.5, residual_length=16, scorer="kvzip", schedule="uniform", head_budgets="uniform"
    )
    cache = MiniKVCache(model._minikv_patch.config, model.config, max_new_tokens=8)
    with torch.no_grad():
        out = model(ids, **{KEY: cache}, use_cache=True).logits
    assert torch.allclose(out, ref, atol=1e-10)  # the pass ran after the prompt and changed nothing of it
    layers = [layer for layer in cache.layers if isinstance(layer, MiniKVLayer)]
    assert all(layer.pending is None for layer in layers)
    assert [layer.store.lengths()[0].tolist() for layer in layers] == [[40] * 2] * 3  # 50% of 80 (sinks included)


def test_a_left_padded_sequence_keeps_what_it_keeps_alone(captured):
    model = minikv.patch(
        tiny_model("llama"), bits=2, budget=0.5, residual_length=16, scorer="kvzip", reconstruct_chunk=16
    )
    ids = torch.randint(1, 320, (2, 50), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[0, :7] = 0
    pos = (mask.cumsum(-1) - 1).clamp_min(0)
    with torch.no_grad():
        model(
            ids,
            attention_mask=mask,
            position_ids=pos,
            use_cache=True,
            **{KEY: MiniKVCache(model._minikv_patch.config, model.config, max_new_tokens=4)},
        )
        batched = [s[0, :, 7:] for s in captured]
        captured.clear()
        model(
            ids[:1, 7:],
            use_cache=True,
            **{KEY: MiniKVCache(model._minikv_patch.config, model.config, max_new_tokens=4)},
        )
    for a, b in zip(batched, captured):
        assert torch.allclose(a, b[0], atol=1e-9)


def test_the_pass_never_builds_a_prompt_by_prompt_map(monkeypatch):
    """Every attention map of the pass is at most QUERY_BLOCK queries by (prompt + chunk + overlap) keys
    (the reference op, whose maps are spied on; the CPU kernel's blocks are as large, or smaller)."""
    shapes = []
    logits = reference._logits

    def spy(q, k, scale, softcap):
        shapes.append((q.shape[-2], k.shape[-2]))
        return logits(q, k, scale, softcap)

    monkeypatch.setattr(reference, "_logits", spy)
    T, chunk = 300, 32
    model = minikv.patch(
        tiny_model("llama"),
        bits=2,
        budget=0.5,
        residual_length=16,
        scorer="kvzip",
        reconstruct_chunk=chunk,
        backend="reference",
    )
    with torch.no_grad():
        model(
            torch.randint(1, 320, (1, T)),
            use_cache=True,
            **{KEY: MiniKVCache(model._minikv_patch.config, model.config, max_new_tokens=4)},
        )
    assert len(shapes) == 3 * -(-T // chunk)  # one map per layer per chunk
    assert max(q for q, _ in shapes) <= chunk + OVERLAP
    assert max(k for _, k in shapes) <= T + chunk + OVERLAP


def test_a_later_turn_is_scored_by_the_pass_and_the_tokens_held_stay(captured):
    model = minikv.patch(tiny_model("llama"), bits=2, budget=0.5, residual_length=16, sink_tokens=4, scorer="kvzip")
    cache = MiniKVCache(model._minikv_patch.config, model.config, max_new_tokens=8)
    with torch.no_grad():
        model(torch.randint(1, 320, (1, 64)), use_cache=True, **{KEY: cache})
    layer = next(layer for layer in cache.layers if isinstance(layer, MiniKVLayer))
    st = layer.store
    p, G, kw = int(st.n_packed[0, 0]), st.group, 32 // st.k_bits
    held = [
        t.clone()
        for t in (
            st.k_codes[..., : p // kw],
            st.k_scale[..., : p // G],
            st.v_codes[:, :, :p],
            st.v_mn[:, :, :p],
            st.res_k[:, :, :4],
        )
    ]
    n_before = int(st.lengths()[0, 0])
    captured.clear()
    with torch.no_grad():
        model(torch.randint(1, 320, (1, 40)), use_cache=True, **{KEY: cache})
    assert [s.shape[-1] for s in captured] == [40] * 3  # the turn's tokens only were scored
    st = layer.store
    assert int(st.lengths()[0, 0]) == n_before + 20
    after = (
        st.k_codes[..., : p // kw],
        st.k_scale[..., : p // G],
        st.v_codes[:, :, :p],
        st.v_mn[:, :, :p],
        st.res_k[:, :, :4],
    )
    assert all(torch.equal(a, b) for a, b in zip(held, after))


@pytest.mark.parametrize("family", ["gemma3_text", "qwen3"])
def test_generates_on_other_families_with_sliding_layers_untouched(family):
    model = tiny_model(family)
    ids = torch.randint(1, 320, (1, 60), generator=torch.Generator().manual_seed(3))
    minikv.patch(model, bits=16, budget=None, scorer="kvzip")  # nothing selected: no pass, HF's tokens
    ref = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
    minikv.unpatch(model)
    assert torch.equal(ref, model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0))
    minikv.patch(model, bits=2, budget=0.5, residual_length=16, scorer="kvzip", reconstruct_chunk=16)
    out = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0, return_dict_in_generate=True)
    cache = getattr(out, KEY)
    sliding = [layer for layer in cache.layers if not isinstance(layer, MiniKVLayer)]
    # the pass's chunks never reached the windows: they hold the prompt and the generated tokens only
    assert all(int(layer.cumulative_length) == 60 + 5 for layer in sliding)


def test_unpatch_removes_the_hook():
    model = tiny_model("llama")
    decoder = model.get_decoder()
    minikv.patch(model, bits=2, budget=0.5, scorer="kvzip")
    assert len(decoder._forward_hooks) == 1
    minikv.unpatch(model)
    assert len(decoder._forward_hooks) == 0


@pytest.mark.parametrize("bad", [0, -3, 2.5, True])
def test_bad_chunk_is_refused(bad):
    with pytest.raises(ValueError, match="reconstruct_chunk must be an integer >= 1"):
        minikv.patch(tiny_model("llama"), bits=2, budget=0.5, scorer="kvzip", reconstruct_chunk=bad)


@pytest.mark.parametrize("bad", ["Repeat", (1, -2), (1.5,), 7])
def test_a_prefix_that_is_not_token_ids_is_refused(bad):
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="reconstruct_prefix must be a sequence of token ids"):
        minikv.patch(model, bits=2, budget=0.5, scorer="kvzip", reconstruct_prefix=bad)
    assert not minikv.is_patched(model)


def test_global_schedule_moves_tokens_to_the_layers_that_rank_highest_at_equal_total():
    from minikv import MiniKVConfig
    from minikv.budget import GLOBAL_SPAN, across_layers, keep_counts

    cfg = MiniKVConfig(
        bits=2, budget=0.5, recent=8, sink_tokens=2, scorer="kvzip", schedule="global", head_budgets="uniform"
    )
    g = torch.Generator().manual_seed(0)
    B, H, T = 2, 3, 100
    scores = [torch.rand(B, H, T, generator=g) * w for w in (1.0, 3.0, 0.2)]  # layer 1 ranks highest
    valid = torch.ones(B, T, dtype=torch.bool)
    valid[1, :10] = 0
    keep, recent = keep_counts(cfg.replace(schedule="uniform"), 0, 3, valid.sum(-1))
    counts = across_layers(cfg, scores, valid)
    total = sum(k for k, _ in counts)
    assert torch.equal(total, 3 * keep)  # the uniform schedule's bytes
    heavy = keep - recent
    for k, r in counts:
        assert torch.equal(r, recent)
        assert bool(((k - r) >= (GLOBAL_SPAN[0] * heavy).floor()).all()) and bool(
            ((k - r) <= GLOBAL_SPAN[1] * heavy).all()
        )
    assert bool((counts[1][0] > keep).all()) and bool((counts[2][0] < keep).all())


def test_global_schedule_generates_and_needs_the_reconstruction_scorer():
    model = minikv.patch(
        tiny_model("llama"),
        bits=2,
        budget=0.5,
        residual_length=16,
        scorer="kvzip",
        schedule="global",
        head_budgets="uniform",
    )
    ids = torch.randint(1, 320, (2, 160), generator=torch.Generator().manual_seed(4))
    out = model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0, return_dict_in_generate=True)
    layers = [layer for layer in getattr(out, KEY).layers if isinstance(layer, MiniKVLayer)]
    prompt = sum(int(layer.store.lengths()[0, 0]) for layer in layers) - 3 * 4  # less the 4 decoded tokens
    assert 3 * 80 - 3 * 16 < prompt <= 3 * 80  # the uniform total, in whole groups of 16 after the sinks
    with pytest.raises(
        ValueError, match="schedule='global' .* needs one of the scorers \\['kvzip', 'kvzip_window', 'expected'\\]"
    ):
        minikv.patch(tiny_model("llama"), bits=2, budget=0.5, scorer="snapkv", schedule="global")


def test_global_schedule_on_a_quantized_store_keeps_whole_groups_after_the_sinks():
    from minikv import MiniKVConfig
    from minikv.budget import across_layers, keep_counts

    cfg = MiniKVConfig(
        bits=2, budget=0.5, recent=8, sink_tokens=4, scorer="kvzip", schedule="global", head_budgets="uniform"
    )
    g = torch.Generator().manual_seed(1)
    B, H, T, G = 2, 2, 300, 16
    scores = [torch.rand(B, H, T, generator=g) * w for w in (1.0, 2.0, 0.5, 1.5)]
    valid = torch.ones(B, T, dtype=torch.bool)
    valid[1, :37] = 0
    keep, _ = keep_counts(cfg.replace(schedule="uniform"), 0, 4, valid.sum(-1))
    counts = across_layers(cfg, scores, valid, group=G)
    for k, _ in counts:
        assert bool(((k - 4) % G == 0).all())  # nothing of the prompt waits in the residual
    total = sum(k for k, _ in counts)
    assert bool((total <= 4 * keep).all()) and bool((total > 4 * keep - 4 * G).all())


def test_shared_schedule_keeps_each_tokens_best_score_in_every_layer_in_whole_groups():
    from minikv import MiniKVConfig
    from minikv.budget import keep_counts, shared_counts, shared_scores

    cfg = MiniKVConfig(bits=2, budget=0.5, recent=8, sink_tokens=4, scorer="kvzip", schedule="shared")
    g = torch.Generator().manual_seed(2)
    B, H, T, G = 2, 2, 300, 16
    scores = [torch.rand(B, H, T, generator=g) * w for w in (1.0, 2.0, 0.5)]
    valid = torch.ones(B, T, dtype=torch.bool)
    valid[1, :37] = 0
    out, counts = shared_scores(cfg, scores), shared_counts(cfg, valid, len(scores), group=G)
    best = torch.stack(scores).amax(dim=(0, 2))  # [B, T]: over the layers and heads, then max-pooled over 7
    best = torch.stack([best[:, max(t - 3, 0) : t + 4].amax(-1) for t in range(T)], -1)
    keep, recent = keep_counts(cfg.replace(schedule="uniform"), 0, 3, valid.sum(-1))
    for s, (k, r) in zip(out, counts):
        assert torch.equal(s, best[:, None].expand(B, H, T))
        assert torch.equal(r, recent) and bool(((k - 4) % G == 0).all())
        assert bool(((k - keep).abs() <= G // 2).all())


def test_shared_schedule_gives_every_layer_and_head_the_same_scores_and_generates(captured):
    model = minikv.patch(tiny_model("llama"), bits=2, budget=0.5, residual_length=16, scorer="kvzip", schedule="shared")
    ids = torch.randint(1, 320, (2, 100), generator=torch.Generator().manual_seed(5))
    out = model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0, return_dict_in_generate=True)
    assert len(captured) == 3 and all(torch.equal(s, captured[0]) for s in captured)
    assert torch.equal(captured[0], captured[0][:, :1].expand_as(captured[0]))  # every head the same
    layers = [layer for layer in getattr(out, KEY).layers if isinstance(layer, MiniKVLayer)]
    held = {int(layer.store.lengths()[b, h]) for layer in layers for b in range(2) for h in range(2)}
    assert len(held) == 1  # one count everywhere: 4 sinks + whole groups of 16 + 3 decoded tokens
    assert (held.pop() - 4 - 3) % 16 == 0
    with pytest.raises(ValueError, match="schedule='shared' .* needs one of the scorers"):
        minikv.patch(tiny_model("llama"), bits=2, budget=0.5, scorer="snapkv", schedule="shared")
    with pytest.raises(ValueError, match="head_budgets='adaptive' .* needs schedule='uniform' or 'global'"):
        minikv.patch(
            tiny_model("llama"), bits=2, budget=0.5, scorer="kvzip", schedule="shared", head_budgets="adaptive"
        )


@pytest.mark.parametrize(
    "family, kv_heads, head_dim, knobs, expected",
    [
        ("llama", 2, 16, {}, ("global", "adaptive", 0.25, 0.5, 16)),
        ("llama", 1, 16, {}, ("shared", "uniform", 64, 0.5, 16)),  # groups of 64 do not fit a 16-wide head
        ("gemma3_text", 1, 16, {}, ("shared", "uniform", 64, 0.5, 16)),
        ("llama", 1, 64, {}, ("shared", "uniform", 64, 0.66, 64)),  # the bytes of 58% in groups of 32
        ("gemma3_text", 1, 64, {"budget": "auto"}, ("shared", "uniform", 64, 0.66, 64)),
        ("llama", 2, 64, {}, ("global", "adaptive", 0.25, 0.5, 32)),
        ("llama", 1, 64, {"budget": 0.5}, ("shared", "uniform", 64, 0.5, 32)),  # a budget given stays
        ("llama", 1, 64, {"q_group_size": 32}, ("shared", "uniform", 64, 0.5, 32)),  # so does a group
        ("llama", 1, 64, {"residual_length": 96}, ("shared", "uniform", 64, 0.5, 32)),  # 64 must divide R
        ("llama", 1, 16, {"budget": 20}, ("shared", "uniform", 20, 20, 16)),  # the window fits in an int budget
        ("llama", 1, 16, {"recent": 0.5}, ("shared", "uniform", 0.5, 0.5, 16)),
        ("llama", 1, 64, {"schedule": "global"}, ("global", "adaptive", 0.25, 0.5, 32)),
        ("llama", 1, 64, {"scorer": "snapkv"}, ("uniform", "uniform", 0.25, 0.5, 32)),
    ],
)
def test_the_default_schedule_shares_the_tokens_on_a_model_with_one_kv_head(
    family, kv_heads, head_dim, knobs, expected
):
    """``schedule``, ``head_budgets``, ``recent`` and ``budget`` left to choose: the shared schedule, a 64-token
    recent window and 66% of the tokens in groups of 64 (where they fit) with one KV head
    (docs/shared-context.md); what the user sets stays."""
    model = tiny_model(family, num_key_value_heads=kv_heads, head_dim=head_dim)
    minikv.patch(model, **knobs)
    cfg = MiniKVCache(model._minikv_patch.config, model.config).cfg
    assert (cfg.schedule, cfg.head_budgets, cfg.recent, cfg.budget, cfg.q_group_size) == expected


@pytest.mark.parametrize("scorer", ["kvzip", "expected"])
def test_the_decode_step_with_the_hook_compiles_into_one_graph(scorer):
    """The hook of a deferred scorer sits on the decoder: a decode step (nothing pending) still compiles
    whole, once (the pass's scorer, and Expected Attention, which the hook keeps without a pass)."""
    import torch._dynamo as dynamo

    model = minikv.patch(
        tiny_model("llama"), bits=2, budget=32, recent=8, residual_length=16, scorer=scorer, schedule="global"
    )
    ids = torch.randint(1, 320, (1, 50), generator=torch.Generator().manual_seed(5))
    eager = minikv.generate(model, ids, max_new_tokens=20)
    dynamo.reset()
    dynamo.utils.counters.clear()
    compiled = minikv.generate(model, ids, max_new_tokens=20, compile=True)
    assert torch.equal(compiled, eager)
    assert dynamo.utils.counters["stats"]["unique_graphs"] == 1
    assert not dynamo.utils.counters["graph_break"]


def test_the_window_merged_scorer_is_the_larger_of_the_pass_and_the_window(captured):
    """``scorer="kvzip_window"``: each token's score is the max of the pass's maximum and SnapKV's window
    attention (summed over the window's queries, averaged over the query heads), so it is never below
    ``kvzip``'s and the window raises some; the prompt's forward and a later turn work as with ``kvzip``."""
    ids = torch.randint(1, 320, (1, 90), generator=torch.Generator().manual_seed(6))
    per_scorer = {}
    for scorer in ("kvzip", "kvzip_window"):
        model = minikv.patch(tiny_model("llama"), bits=2, budget=0.5, residual_length=16, scorer=scorer)
        cache = MiniKVCache(model._minikv_patch.config, model.config, max_new_tokens=8)
        captured.clear()
        with torch.no_grad():
            model(ids, use_cache=True, **{KEY: cache})
            model(torch.randint(1, 320, (1, 30)), use_cache=True, **{KEY: cache})  # a turn: scored the same way
            model(torch.randint(1, 320, (1, 1)), use_cache=True, **{KEY: cache})
        assert len(captured) == 6  # the prompt's 3 layers, then the turn's
        per_scorer[scorer] = [s.clone() for s in captured[:3]]  # the prompt's (a turn's depend on what was kept)
    for plain, merged in zip(per_scorer["kvzip"], per_scorer["kvzip_window"]):
        assert merged.shape == plain.shape
        assert bool((merged >= plain - 1e-6).all())
    assert any(bool((m > p + 1e-4).any()) for p, m in zip(per_scorer["kvzip"], per_scorer["kvzip_window"]))
    window = max(float(s.max()) for s in per_scorer["kvzip_window"])
    assert window <= 32 + 1e-4  # at most one per window query (32) averaged over the query heads

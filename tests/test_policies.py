"""Selection policies (issue 6): scorers, schedules, StreamingLLM and the KVCrush wrapper."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from models import tiny_model

import minikv
from minikv import MiniKVConfig
from minikv.budget import capacity, keep_counts, schedule
from minikv.compat import cache_key
from minikv.kernels import ops
from minikv.selection import SCORERS, a2sf, keydiff, keynorm, snapkv, streaming
from minikv.selection.kvcrush import rescore

KEY = cache_key()  # past_key_values, or cache from transformers 5.24


# the selection tests' baseline: MiniKV's scorer and split, no sinks (the knobs under test override it)
BASE = dict(scorer="minikv", recent=0.5, sink_tokens=0)


def _config(**knobs) -> MiniKVConfig:
    return MiniKVConfig(**{**BASE, **knobs})


def _select(cfg, scores, valid, n_layers=1, rank=0):
    n_keep, n_recent = keep_counts(cfg, rank, n_layers, valid.sum(-1))
    if cfg.crush > 0:
        scores = rescore(scores, valid, n_keep, n_recent, cfg)
    idx = ops.select_tokens(scores, valid, n_keep, n_recent, capacity(cfg, rank, n_layers, valid.shape[1]))
    return [[idx[b, h, : int(n_keep[b])].tolist() for h in range(idx.shape[1])] for b in range(idx.shape[0])]


# ---- scorers ------------------------------------------------------------------------------------
def test_a2sf_weights_decay_with_query_age_hand_computed():
    valid = torch.tensor([[False, True, True, True]])
    w = a2sf.query_weights(valid, _config(scorer="a2sf", a2sf_decay=0.5))
    assert w.tolist() == [[0.0, 0.25, 0.5, 1.0]]


def test_snapkv_weights_are_the_last_window_and_pool_keeps_length():
    valid = torch.tensor([[False, False, True, True, True, True]])
    cfg = _config(scorer="snapkv", snap_window=3, pool_kernel=3)
    assert snapkv.query_weights(valid, cfg).tolist() == [[0, 0, 0, 1, 1, 1]]
    pooled = snapkv.finish(torch.tensor([[[0.0, 5.0, 0.0, 0.0, 1.0, 0.0]]]), cfg)
    assert pooled.tolist() == [[[5.0, 5.0, 5.0, 1.0, 1.0, 1.0]]]


def test_pool_kernel_1_keeps_the_scores():
    scores = torch.tensor([[[0.0, 0.9, 0.1, 0.0, 0.0, 0.2, 0.0]]])
    assert torch.equal(snapkv.finish(scores, _config(scorer="snapkv", pool_kernel=1)), scores)


def test_keydiff_keeps_the_keys_unlike_the_rest():
    # four keys along x (one longer: the norm does not count), two off-axis; a padded slot pointing
    # anywhere must not move the mean direction
    k = torch.tensor([[1.0, 0.0], [3.0, 0.0], [0.0, 1.0], [1.0, 0.1], [-1.0, 0.2], [1.0, 0.0], [0.0, -5.0]])
    valid = torch.tensor([[True] * 6 + [False]])
    s = keydiff.scores(k[None, None], valid, _config(scorer="keydiff"))
    unit = k[:6] / k[:6].norm(dim=-1, keepdim=True)
    mean = unit.mean(0)
    expected = -(unit @ mean) / mean.norm()
    torch.testing.assert_close(s[0, 0, :6], expected)
    cfg = _config(scorer="keydiff", budget=3, recent=1)  # recent {5}; the 2 least aligned older: 4, 2
    assert _select(cfg, s, valid) == [[[2, 4, 5]]]


def test_keynorm_keeps_the_smallest_keys():
    k = torch.zeros(1, 1, 6, 2)
    k[0, 0, :, 0] = torch.tensor([3.0, 1.0, 5.0, 0.5, 2.0, 9.0])
    valid = torch.ones(1, 6, dtype=torch.bool)
    cfg = _config(scorer="keynorm", budget=3, recent=1)  # recent {5}; the 2 smallest older: 3, 1
    assert _select(cfg, keynorm.scores(k, valid, cfg), valid) == [[[1, 3, 5]]]


@settings(max_examples=40, deadline=None)
@given(T=st.integers(6, 80), pad=st.integers(0, 5), budget=st.integers(5, 40), sinks=st.integers(0, 4))
def test_streaming_keeps_the_sinks_and_the_window(T, pad, budget, sinks):
    pad = min(pad, T - 1)
    valid = (torch.arange(T) >= pad)[None]
    budget = min(budget, T - pad)
    cfg = _config(scorer="streaming", budget=budget, sinks=min(sinks, budget))
    s = streaming.scores(torch.zeros(1, 2, T, 4), valid, cfg)
    kept = _select(cfg, s, valid)
    n_sinks = min(sinks, budget)
    want = sorted(set(range(pad, pad + n_sinks)) | set(range(T - (budget - n_sinks), T)))
    assert kept == [[want, want]]


# ---- schedules ------------------------------------------------------------------------------------
def test_pyramidkv_schedule_hand_computed():
    cfg = _config(schedule="pyramidkv", pyramid_beta=20)
    heavy, room = torch.tensor([100.0]), torch.tensor([1000.0])
    # min = 100 // 20 = 5, max = 195, step = 190 / 3
    assert [int(schedule(cfg, r, 4, heavy, room)) for r in range(4)] == [195, 132, 68, 5]
    # max clipped to the room (150): min = 200 - 150 = 50, step = 100 / 3
    assert [int(schedule(cfg, r, 4, heavy, torch.tensor([150.0]))) for r in range(4)] == [150, 117, 83, 50]


def test_schedules_keep_the_average_budget():
    lengths = torch.tensor([1000])
    for sched in ("uniform", "pyramid", "pyramidkv"):
        cfg = _config(budget=0.3, schedule=sched)
        total = sum(int(keep_counts(cfg, r, 30, lengths)[0]) for r in range(30))
        assert abs(total / 30 - 300) <= 2, (sched, total / 30)


# ---- KVCrush ---------------------------------------------------------------------------------------
def test_kvcrush_hand_computed():
    scores = torch.tensor([[[6.0, 5, 4, 3, 2, 1, 0, 0], [1.0, 2, 3, 4, 5, 6, 0, 0]]])  # B=1, H=2, T=8
    valid = torch.ones(1, 8, dtype=torch.bool)
    cfg = _config(budget=6, recent=2, crush=0.5, crush_anchor="alternate")
    # heads keep {0,1,2,3} / {2,3,4,5} with the whole budget -> bits (1,0) (1,0) (1,1) (1,1) (0,1) (0,1);
    # anchor (0,1): distances 2 2 1 1 0 0. Importance (top 2): {0,1} / {4,5}. Evicted by (distance, time):
    # head 0: 4 5 2 3 -> picks 0, 2 -> {4, 2}; head 1: 2 3 0 1 -> {2, 0}
    assert _select(cfg, scores, valid) == [[[0, 1, 2, 4, 6, 7], [0, 2, 4, 5, 6, 7]]]


@settings(max_examples=40, deadline=None)
@given(
    B=st.integers(1, 3),
    H=st.integers(1, 4),
    T=st.integers(4, 90),
    frac=st.floats(0.1, 1.0),
    crush=st.floats(0.0, 0.9),
    anchor=st.sampled_from(["alternate", "zeros", "ones", "mean", "random"]),
    seed=st.integers(0, 2**31 - 1),
)
def test_kvcrush_invariants(B, H, T, frac, crush, anchor, seed):
    g = torch.Generator().manual_seed(seed)
    pad = torch.randint(0, T // 2, (B,), generator=g)
    valid = torch.arange(T)[None] >= pad[:, None]
    cfg = _config(budget=frac, crush=crush, crush_anchor=anchor)
    n_keep, n_recent = keep_counts(cfg, 0, 1, valid.sum(-1))
    scores = torch.rand(B, H, T, generator=g)
    s = rescore(scores, valid, n_keep, n_recent, cfg)
    kept = _select(cfg, scores, valid)
    for b in range(B):
        n, r = int(n_keep[b]), int(n_recent[b])
        n_crush = int(crush * (n - r))
        older = [t for t in range(T) if valid[b, t] and t < T - r]
        for h in range(H):
            imp = [t for t in older if s[b, h, t] == 2]
            rep = [t for t in older if s[b, h, t] == 1]
            assert len(imp) == n - r - n_crush and len(rep) == n_crush  # the budget split
            top = sorted(older, key=lambda t: -float(scores[b, h, t]))[: n - r - n_crush]
            assert sorted(imp) == sorted(top)  # importance part = the base scorer's best
            assert not set(rep) & set(imp)  # representatives come from the evicted set
            assert kept[b][h] == sorted(imp + rep + list(range(T - r, T)))  # + the recent window


def test_kvcrush_with_no_share_is_the_base_selection():
    g = torch.Generator().manual_seed(0)
    scores, valid = torch.rand(2, 3, 50, generator=g), torch.ones(2, 50, dtype=torch.bool)
    base = _select(_config(budget=0.4), scores, valid)
    assert _select(_config(budget=0.4, crush=0.0), scores, valid) == base
    assert _select(_config(budget=0.4, crush=0.5), scores, valid) != base


# ---- config -------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "bad, match",
    [
        (dict(scorer="h3o"), "scorer must be one of"),
        (dict(schedule="cone"), "schedule must be one of"),
        (dict(crush=1.0), r"crush .* must be in \[0, 1\)"),
        (dict(crush=-0.1), "crush"),
        (dict(crush_anchor="median"), "crush_anchor must be one of"),
        (dict(a2sf_decay=0.0), r"a2sf_decay must be in \(0, 1\]"),
        (dict(sinks=-1), "sinks must be an integer >= 0"),
        (dict(scorer="streaming", budget=3, sinks=4), "sinks=4 is larger"),
        (dict(pyramid_beta=0.5), "pyramid_beta must be a number >= 1"),
    ],
)
def test_policy_knobs_are_validated(bad, match):
    with pytest.raises(ValueError, match=match):
        _config(**bad)


# ---- end to end -----------------------------------------------------------------------------------------
POLICIES = [dict(scorer=s) for s in SCORERS] + [
    dict(scorer="snapkv", schedule="pyramidkv"),
    dict(scorer="snapkv", crush=0.25),
    dict(scorer="minikv", crush=0.5),
]


@pytest.mark.parametrize("bits", [2, 4, 16])
@pytest.mark.parametrize("policy", POLICIES, ids=lambda p: "-".join(f"{k}={v}" for k, v in p.items()))
def test_every_policy_generates_with_every_bit_width(policy, bits):
    model = tiny_model("llama")
    ids = torch.randint(1, 300, (2, 48), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[0, :5] = 0
    minikv.patch(model, bits=bits, budget=0.5, residual_length=16, **policy)
    try:
        cache = minikv.MiniKVCache(model._minikv_patch.config, model.config, max_new_tokens=20)
        out = model.generate(
            ids, attention_mask=mask, **{KEY: cache}, max_new_tokens=20, do_sample=False, pad_token_id=0
        )
    finally:
        minikv.unpatch(model)
    assert out.shape == (2, 68)
    cfg, lengths = cache.cfg, mask.sum(-1)
    if cfg.schedule == "global":  # ranked across layers (and heads): the uniform total, less whole-group rounding
        n_keep, _ = keep_counts(cfg.replace(schedule="uniform"), 0, 3, lengths)
        held = sum(layer.store.lengths() - 19 for layer in cache.layers).sum(-1)  # [B] over layers and heads
        slack = 3 * 2 * (cfg.q_group_size if cfg.quantized else 1)
        assert bool((held <= 3 * 2 * n_keep).all()) and bool((held > 3 * 2 * n_keep - slack).all())
        return
    for layer in cache.layers:  # each layer holds its kept prompt tokens + the 19 appended ones
        n_keep, _ = keep_counts(cfg, layer.rank, layer.num_compressed, lengths)
        assert layer.store.lengths().tolist() == (n_keep + 19)[:, None].expand(-1, 2).tolist()


def test_snapkv_always_keeps_its_observation_window():
    """A short prompt (a chat question) keeps its last snap_window tokens even when the recent share is smaller."""
    cfg = _config(scorer="snapkv", budget=0.5, recent=0.25, snap_window=32)
    n_keep, n_recent = keep_counts(cfg, 0, 1, torch.tensor([40, 2000]))
    assert n_keep.tolist() == [20, 1000] and n_recent.tolist() == [20, 250]

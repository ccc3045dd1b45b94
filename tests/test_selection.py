"""Token selection invariants and the layer budget schedules."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from minikv import MiniKVConfig
from minikv.budget import capacity, keep_counts
from minikv.kernels import ops

# the selection tests' baseline: MiniKV's scorer and split, no sinks (the knobs under test override it)
BASE = dict(scorer="minikv", recent=0.5, sink_tokens=0)


def _config(**knobs) -> MiniKVConfig:
    return MiniKVConfig(**{**BASE, **knobs})


@settings(max_examples=60, deadline=None)
@given(
    B=st.integers(1, 3),
    H=st.integers(1, 4),
    T=st.integers(1, 90),
    frac=st.floats(0.01, 1.0),
    recent=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**31 - 1),
)
def test_kept_indices_sorted_unique_with_recent_window_and_exact_count(B, H, T, frac, recent, seed):
    g = torch.Generator().manual_seed(seed)
    pad = torch.randint(0, T, (B,), generator=g)
    valid = torch.arange(T)[None] >= pad[:, None]  # left padding
    lengths = valid.sum(-1)
    cfg = _config(budget=frac, recent=recent)
    n_keep, n_recent = keep_counts(cfg, 0, 1, lengths)
    n_max = capacity(cfg, 0, 1, T)
    scores = torch.rand(B, H, T, generator=g)
    idx = ops.select_tokens(scores, valid, n_keep, n_recent, n_max)
    assert idx.shape == (B, H, n_max)
    for b in range(B):
        n, r = int(n_keep[b]), int(n_recent[b])
        assert n == min(max(int(frac * int(lengths[b])), 1), int(lengths[b]))
        for h in range(H):
            kept = idx[b, h, :n]
            assert torch.all(kept[1:] > kept[:-1])  # sorted and unique
            assert bool(valid[b, kept].all())  # never a padding token
            assert set(range(T - r, T)) <= set(kept.tolist())  # the recent window
            older = [p for p in range(T) if valid[b, p] and p < T - r]
            heavy = [p for p in kept.tolist() if p < T - r]
            if heavy:  # the heavy part is the top of the older tokens
                worst_kept = scores[b, h, heavy].min()
                dropped = [p for p in older if p not in heavy]
                assert all(scores[b, h, p] <= worst_kept for p in dropped)


def test_hand_computed_selection():
    scores = torch.tensor([[[5.0, 1.0, 9.0, 0.5, 7.0, 3.0, 2.0, 8.0]]])  # B=1, H=1, T=8
    valid = torch.tensor([[False, True, True, True, True, True, True, True]])
    # keep 5: recent 2 -> {6, 7}; heavy 3 among valid older {1..5}: 9 (2), 7 (4), 3 (5)
    idx = ops.select_tokens(scores, valid, torch.tensor([5]), torch.tensor([2]), 6)
    assert idx[0, 0, :5].tolist() == [2, 4, 5, 6, 7]


@pytest.mark.parametrize("budget", [64, 0.25, 0.5])
@pytest.mark.parametrize("L", [2, 5, 30])
def test_pyramid_keeps_the_budget_on_average_and_decreases(budget, L):
    T = 1000
    lengths = torch.tensor([T])
    uni = _config(budget=budget)
    pyr = _config(budget=budget, schedule="pyramid")
    u = [int(keep_counts(uni, l, L, lengths)[0]) for l in range(L)]
    p = [int(keep_counts(pyr, l, L, lengths)[0]) for l in range(L)]
    assert len(set(u)) == 1
    assert all(a >= b for a, b in zip(p, p[1:])) and p[0] > p[-1]
    assert abs(sum(p) / L - u[0]) <= 1.0  # rounding of each layer
    # MiniKV: the heavy part goes from 2h - h/7 to h/7, the recent part is the same everywhere
    h = u[0] - int(keep_counts(uni, 0, L, lengths)[1])
    r = int(keep_counts(pyr, 0, L, lengths)[1])
    assert abs(p[0] - r - (2 * h - h / 7)) <= 1 and abs(p[-1] - r - h / 7) <= 1


def test_int_budget_and_recent_in_tokens():
    cfg = _config(budget=100, recent=30)
    n, r = keep_counts(cfg, 0, 1, torch.tensor([500, 80]))
    assert n.tolist() == [100, 80] and r.tolist() == [30, 30]


def test_budget_none_keeps_everything():
    n, r = keep_counts(_config(budget=None), 3, 10, torch.tensor([7, 300]))
    assert n.tolist() == [7, 300]


def test_snapkv_prompt_shorter_than_window_is_kept_whole():
    cfg = _config(budget=0.5, scorer="snapkv", snap_window=32)
    n, _ = keep_counts(cfg, 0, 1, torch.tensor([20, 32, 100]))
    assert n.tolist() == [20, 32, 50]

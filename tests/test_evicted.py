"""MiKV's low-precision tier (``evicted_bits``): the tokens selection leaves out, kept at 1-2 bits.

The tiers partition the prompt (every valid token in exactly one), the tier's reconstruction and its
bytes, decode and later turns reading both tiers, what it buys on a random model, and bad input.
"""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from models import tiny_model

import minikv
from minikv import MiniKVCache, MiniKVConfig
from minikv.cache import MiniKVLayer
from minikv.compat import cache_key
from minikv.evicted import EvictedStore

KEY = cache_key()


def _layers(cache):
    return [layer for layer in cache.layers if isinstance(layer, MiniKVLayer)]


@settings(max_examples=25, deadline=None)
@given(
    bits=st.sampled_from([1, 2]),
    G=st.sampled_from([32, 64]),
    n=st.integers(1, 150),
    short=st.integers(0, 40),
    seed=st.integers(0, 2**16),
)
def test_the_tier_reconstructs_within_half_a_step_and_counts_its_padding(bits, G, n, short, seed):
    g = torch.Generator().manual_seed(seed)
    B, H, D = 2, 2, 64
    k, v = torch.randn(B, H, n, D, generator=g), torch.randn(B, H, n, D, generator=g)
    counts = torch.tensor([n, max(n - short, 1)])
    tier = EvictedStore(bits, G, clip=False, rot_k=None, rot_v=None, dtype=torch.float32)
    tier.write(k, v, counts)
    k_hat, v_hat, valid = tier.dense()
    padded = -(-n // G) * G
    assert k_hat.shape == (B, H, padded, D) and valid.shape == (B, padded)
    assert valid.sum(-1).tolist() == counts.tolist()
    for x, x_hat in ((k, k_hat), (v, v_hat)):
        for b in range(B):
            c = int(counts[b])
            err = (x[b, :, :c] - x_hat[b, :, :c]).abs().max()
            # a group's step is at most the whole range / (2**bits - 1); no element is further than half a
            # step from its reconstruction (+ the fp16 rounding of scale and minimum)
            step = (x[b, :, :c].amax() - x[b, :, :c].amin()) / (2**bits - 1)
            assert err <= step / 2 * 1.01 + 1e-3
    per_token = 2 * (D * bits // 8 + 2 * (D // G) * 2)  # K and V codes + fp16 scale and minimum per group
    assert tier.used_bytes() == B * H * padded * per_token


def test_the_tiers_partition_the_prompt():
    """Every valid token is in exactly one tier: kept (the first ``n_keep`` of ``idx``) or evicted."""
    cfg = MiniKVConfig(bits=2, budget=0.5, evicted_bits=2).for_head_dim(64)
    layer = MiniKVLayer(cfg, 0, 1)
    B, H, T, D = 2, 2, 40, 64
    k = torch.arange(T, dtype=torch.float32)[None, None, :, None].expand(B, H, T, D).contiguous()
    valid = torch.ones(B, T, dtype=torch.bool)
    valid[1, :6] = False  # left padding
    g = torch.Generator().manual_seed(0)
    n_keep = torch.tensor([15, 11])
    idx = torch.stack(
        [torch.stack([torch.randperm(T - 6 * b, generator=g)[:20] + 6 * b for _ in range(H)]) for b in range(B)]
    )  # [B, H, 20]: the first n_keep are kept, the rest ignored
    seen = {}
    layer.evicted = EvictedStore(2, 32, False, None, None, torch.float32)
    layer.evicted.write = lambda kk, vv, counts: seen.update(k=kk, counts=counts)
    layer._keep_evicted(k, k.clone(), idx, n_keep, valid, torch.zeros(B, H, T))
    for b in range(B):
        assert int(seen["counts"][b]) == int(valid[b].sum()) - int(n_keep[b])
        for h in range(H):
            kept = set(idx[b, h, : n_keep[b]].tolist())
            evicted = seen["k"][b, h, : seen["counts"][b], 0].long().tolist()
            assert evicted == sorted(evicted)  # temporal order
            assert kept.isdisjoint(evicted)
            assert kept | set(evicted) == set(torch.nonzero(valid[b])[:, 0].tolist())


def test_a_share_of_the_evicted_tokens_keeps_the_best_scored_ones():
    """``evicted_share``: that share of the evicted tokens (floored), the best by score, in temporal order."""
    cfg = MiniKVConfig(bits=2, budget=0.5, evicted_bits=2, evicted_share=0.5).for_head_dim(64)
    layer = MiniKVLayer(cfg, 0, 1)
    B, H, T, D = 1, 2, 40, 64
    k = torch.arange(T, dtype=torch.float32)[None, None, :, None].expand(B, H, T, D).contiguous()
    valid = torch.ones(B, T, dtype=torch.bool)
    idx = torch.arange(10)[None, None].expand(B, H, 10)  # tokens 0-9 kept: 30 evicted
    scores = torch.rand(B, H, T, generator=torch.Generator().manual_seed(1))
    seen = {}
    layer.evicted = EvictedStore(2, 32, False, None, None, torch.float32)
    layer.evicted.write = lambda kk, vv, counts: seen.update(k=kk, counts=counts)
    layer._keep_evicted(k, k.clone(), idx, torch.tensor([10]), valid, scores)
    assert seen["counts"].tolist() == [15]
    for h in range(H):
        best = sorted((torch.argsort(scores[0, h, 10:], descending=True)[:15] + 10).tolist())
        assert seen["k"][0, h, :15, 0].long().tolist() == best


@pytest.mark.parametrize("bits", [1, 2])
def test_decode_and_later_turns_read_both_tiers_and_count_their_bytes(bits):
    model = tiny_model("llama", head_dim=64)
    ids = torch.randint(0, 320, (2, 90), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :11] = 0
    minikv.patch(model, bits=2, budget=0.5, evicted_bits=bits, evicted_group_size=64)
    try:
        cache = MiniKVCache(
            MiniKVConfig(bits=2, budget=0.5, evicted_bits=bits, evicted_group_size=64), model.config, max_new_tokens=24
        )
        out = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, **{KEY: cache})
        for layer in _layers(cache):  # the new tokens but the last are held: 5 of them, plus the prompt
            assert layer.held()[2].sum(-1).tolist() == [[90 + 5] * 2, [79 + 5] * 2]  # per KV head
            assert layer.memory().used_bytes == layer.store.used_bytes() + layer.evicted.used_bytes()
        turn = torch.cat([out, torch.randint(0, 320, (2, 20))], 1)
        model.generate(
            turn,
            attention_mask=torch.cat([mask, torch.ones(2, turn.shape[1] - 90, dtype=mask.dtype)], 1),
            max_new_tokens=2,
            do_sample=False,
            **{KEY: cache},
        )
        for layer in _layers(cache):  # the turn's tokens the policy drops went to the tier too
            assert layer.held()[2].sum(-1).tolist() == [[90 + 26 + 1] * 2, [79 + 26 + 1] * 2]
    finally:
        minikv.unpatch(model)


def _last_logprobs(model, ids, **knobs):
    """Log-probabilities of the last 4 positions: the prompt but those 4 prefilled into a compressed
    cache, the 4 through it (teacher forcing)."""
    minikv.patch(model, **knobs)
    try:
        cache = MiniKVCache(MiniKVConfig(**knobs), model.config, max_new_tokens=8)
        model(ids[:, :-4], use_cache=True, **{KEY: cache})
        logits = model(ids[:, -4:], use_cache=True, **{KEY: cache}).logits
    finally:
        minikv.unpatch(model)
    return torch.log_softmax(logits.double(), -1)


def test_the_tier_brings_the_output_closer_to_the_full_cache():
    """At 20% kept, the evicted tokens at 2 bits move the next-token distributions towards the full
    cache's (KL) compared with dropping them."""
    model = tiny_model("llama", head_dim=64)
    ids = torch.randint(0, 320, (1, 160), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = torch.log_softmax(model(ids).logits[:, -4:].double(), -1)
    kl = {}
    for bits in (None, 2):
        logp = _last_logprobs(model, ids, bits=2, budget=0.2, evicted_bits=bits)
        kl[bits] = float((full.exp() * (full - logp)).sum(-1).mean())
    assert kl[2] < 0.5 * kl[None], kl


@pytest.mark.parametrize(
    "kwargs, words",
    [
        (dict(evicted_bits=3), "evicted_bits must be one of [1, 2]"),
        (dict(evicted_bits=1, bits=16), "needs a quantized store"),
        (dict(evicted_bits=1, budget=None), "and a budget"),
        (dict(evicted_group_size=64), "evicted_group_size needs evicted_bits"),
        (dict(evicted_bits=1, evicted_group_size=48), "evicted_group_size must be a multiple of 32"),
        (dict(evicted_bits=2, evicted_group_size=0), "evicted_group_size must be an integer >= 1"),
        (dict(evicted_bits=2, evicted_share=0.0), "the share of the evicted tokens kept in the low tier"),
        (dict(evicted_bits=2, evicted_share=1.5), "the share of the evicted tokens kept in the low tier"),
        (dict(evicted_share=0.5), "evicted_share needs evicted_bits"),
    ],
)
def test_bad_evicted_knobs_are_refused(kwargs, words):
    with pytest.raises(ValueError, match=words.replace("[", r"\[").replace("]", r"\]")):
        MiniKVConfig(**kwargs)


def test_the_tier_group_must_fit_the_head_and_the_bits():
    with pytest.raises(ValueError, match="evicted_group_size=64 must divide the model's head_dim=32"):
        MiniKVConfig(evicted_bits=1, evicted_group_size=64).for_head_dim(32)
    with pytest.raises(ValueError, match="must be a multiple of 32 at evicted_bits=1"):
        MiniKVConfig(evicted_bits=1, q_group_size=16).for_head_dim(64)  # the tier inherits G 16
    model = tiny_model("llama")  # head_dim 16
    with pytest.raises(ValueError, match="head_dim=16"):
        minikv.patch(model, evicted_bits=1, evicted_group_size=32)


def test_compiling_a_decode_step_that_reads_the_tier_is_refused_before_any_work():
    model = tiny_model("llama", head_dim=64)
    minikv.patch(model, bits=2, budget=0.5, evicted_bits=2)
    try:
        with pytest.raises(
            ValueError, match="compile=True cannot compile a decode step that reads MiKV's evicted tier"
        ):
            minikv.generate(model, torch.randint(0, 320, (1, 40)), max_new_tokens=4, compile=True)
    finally:
        minikv.unpatch(model)

"""The MiniKV cache: memory accounting, residual flushes, capacity and bad-input errors."""

import pytest
import torch
from models import tiny_model

import minikv
from minikv import MiniKVCache, MiniKVConfig
from minikv.cache import MiniKVLayer
from minikv.compat import cache_key

KEY = cache_key()  # past_key_values, or cache from transformers 5.24


def _prefill_and_decode(model, cache, T=70, steps=0, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 320, (1, T), generator=g)
    with torch.no_grad():
        out = model(ids, **{KEY: cache}, use_cache=True)
        for _ in range(steps):
            nxt = out.logits[:, -1:].argmax(-1)
            out = model(nxt, **{KEY: cache}, use_cache=True)
    return out


def _layers(cache):
    return [layer for layer in cache.layers if isinstance(layer, MiniKVLayer)]


def test_memory_accounting_matches_a_hand_computation():
    model = minikv.patch(
        tiny_model("llama", dtype=torch.float32),
        bits=2,
        k_bits=2,
        budget=40,
        recent=8,
        residual_length=32,
        sink_tokens=0,
        scorer="snapkv",  # one count per layer and head: the hand computation below
    )  # (sinks and K4 V2: tests/test_fidelity_knobs.py)
    cache = MiniKVCache(model._minikv_patch.config, model.config, max_new_tokens=8)
    _prefill_and_decode(model, cache, T=70, steps=5)
    L, H, D = 3, 2, 16
    # per layer: 40 kept -> 32 packed + 8 residual; 5 decode tokens -> residual 13 (< R = 32)
    packed = 32 * H * 2 * (D * 2 // 8 + 2 * (D // 16) * 2)  # K and V: 2-bit codes + fp16 scale & min
    residual = 13 * H * 2 * D * 2  # fp32 model: the residual in fp16 (residual_dtype=None)
    fp16 = (70 + 5) * H * D * 2 * 2
    mem = cache.memory()
    assert mem.used_bytes == L * (packed + residual)
    assert mem.fp16_bytes == L * fp16
    assert mem.ratio == pytest.approx((packed + residual) / fp16)
    assert mem.allocated_bytes >= mem.used_bytes
    for layer in _layers(cache):
        assert layer.store.n_packed.tolist() == [[32] * H] and layer.store.res_len.tolist() == [13]


def test_residual_flushes_at_exactly_R():
    R = 32
    model = minikv.patch(
        tiny_model("llama"), bits=4, budget=40, recent=8, residual_length=R, sink_tokens=0, scorer="snapkv"
    )
    cache = MiniKVCache(model._minikv_patch.config, model.config, max_new_tokens=64)
    _prefill_and_decode(model, cache, T=70, steps=R - 8 - 1)  # residual: 8 + 23 = 31
    layer = _layers(cache)[0]
    assert (layer.store.n_packed.tolist(), layer.store.res_len.tolist()) == ([[32, 32]], [R - 1])
    with torch.no_grad():
        model(torch.tensor([[5]]), **{KEY: cache}, use_cache=True)
    assert (layer.store.n_packed.tolist(), layer.store.res_len.tolist()) == ([[32 + R] * 2], [0])
    assert int(cache.get_seq_length()) == 70 + R - 8


def test_generating_past_capacity_is_refused_before_any_state_changes():
    model = minikv.patch(tiny_model("llama"), bits=2, budget=0.5, residual_length=16)
    cache = MiniKVCache(model._minikv_patch.config, model.config, max_new_tokens=3)
    _prefill_and_decode(model, cache, T=40, steps=3)
    layer = _layers(cache)[0]
    before = [t.clone() for t in layer.store.buffers()]
    with pytest.raises(ValueError, match="longer than the cache was built for"):
        with torch.no_grad():
            model(torch.tensor([[5]]), **{KEY: cache}, use_cache=True)
    assert all(torch.equal(a, b) for a, b in zip(before, layer.store.buffers()))


def test_generate_longer_than_a_user_cache_is_refused():
    model = minikv.patch(tiny_model("llama"), bits=2, budget=0.5)
    cache = MiniKVCache(model._minikv_patch.config, model.config, max_new_tokens=4)
    with pytest.raises(ValueError, match="longer than the cache was built for"):
        model.generate(torch.randint(1, 320, (1, 30)), **{KEY: cache}, max_new_tokens=10, do_sample=False)


def test_int_budget_larger_than_the_prompt_is_refused():
    model = minikv.patch(tiny_model("llama"), bits=2, budget=500)
    with pytest.raises(ValueError, match=r"budget=500 tokens is larger than the prompt \(30 tokens\)"):
        model.generate(torch.randint(1, 320, (1, 30)), max_new_tokens=3, do_sample=False)


def test_beam_search_and_assisted_decoding_are_refused():
    model = minikv.patch(tiny_model("llama"), bits=2, budget=0.5)
    ids = torch.randint(1, 320, (1, 30))
    with pytest.raises(ValueError, match="beam_search is not supported on a MiniKV-compressed cache"):
        model.generate(ids, max_new_tokens=3, num_beams=2, do_sample=False)
    with pytest.raises(ValueError, match="assisted_generation is not supported"):
        model.generate(ids, max_new_tokens=3, do_sample=False, prompt_lookup_num_tokens=2)
    with pytest.raises(ValueError, match="beam search is not supported"):
        MiniKVLayer(MiniKVConfig(), 0, 1).reorder_cache(torch.tensor([0]))


def test_prompt_shorter_than_the_snap_window_keeps_everything():
    model = minikv.patch(tiny_model("llama"), bits=16, budget=0.5, scorer="snapkv", snap_window=32)
    cache = MiniKVCache(model._minikv_patch.config, model.config, max_new_tokens=4)
    _prefill_and_decode(model, cache, T=20, steps=1)
    assert _layers(cache)[0].store.length.tolist() == [21]


def test_sliding_layers_are_static_rings_and_are_counted():
    from minikv.sliding import SlidingLayer

    model = minikv.patch(tiny_model("gemma2"), bits=2, budget=0.5, residual_length=16)
    cache = MiniKVCache(model._minikv_patch.config, model.config, max_new_tokens=4)
    _prefill_and_decode(model, cache, T=60, steps=2)
    kinds = [type(layer) for layer in cache.layers]
    assert SlidingLayer in kinds and MiniKVLayer in kinds
    ours, every = cache.memory(), cache.memory("all")
    assert 0 < ours.used_bytes < every.used_bytes < every.fp16_bytes * 4  # fp32 model: the windows hold fp32
    sliding = [layer for layer in cache.layers if isinstance(layer, SlidingLayer)]
    window = model.config.sliding_window
    held = len(sliding) * window * 2 * 16 * 2 * 4  # the window's tokens, K and V, H=2, D=16, fp32
    assert every.used_bytes - ours.used_bytes == held  # every byte of the uncompressed layers, and only those
    assert all(int((layer.positions >= 0).sum()) == window for layer in sliding)
    assert all(sorted(layer.positions[0].tolist()) == list(range(62 - window, 62)) for layer in sliding)
    assert ours.fp16_bytes == sum(layer.memory().fp16_bytes for layer in _layers(cache))
    with pytest.raises(ValueError, match="scope must be 'compressed' or 'all'"):
        cache.memory("some")
    assert "% of fp16" in str(ours)

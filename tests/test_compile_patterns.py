"""The torch.compile patterns of the transformers docs on a patched model: each gives the eager
tokens with no recompiles from token to token, or is refused with an error that says what to do.
(``generation_config.compile_config``: tests/test_compile.py.)"""

import pytest
import torch
import torch._dynamo as dynamo
from models import tiny_model

import minikv

PROMPT = torch.randint(1, 320, (1, 50), generator=torch.Generator().manual_seed(1))


def _model():
    return minikv.patch(tiny_model("llama"), bits=2, budget=0.5, residual_length=16)


def _graphs(fn) -> tuple[torch.Tensor, int]:
    """``fn()``'s output and the graphs dynamo compiled for it, from a clean slate."""
    dynamo.reset()
    dynamo.utils.counters.clear()
    out = fn()
    return out, dynamo.utils.counters["stats"]["unique_graphs"]


@pytest.mark.parametrize("mode", [None, "reduce-overhead"])
def test_compiled_forward_generates_the_eager_tokens_with_no_recompiles_per_token(mode):
    model = _model()
    eager = model.generate(PROMPT, max_new_tokens=30, do_sample=False, pad_token_id=0)
    model.forward = torch.compile(model.forward, mode=mode)
    few, graphs_few = _graphs(lambda: model.generate(PROMPT, max_new_tokens=3, do_sample=False, pad_token_id=0))
    many, graphs_many = _graphs(lambda: model.generate(PROMPT, max_new_tokens=30, do_sample=False, pad_token_id=0))
    assert torch.equal(many, eager) and torch.equal(few, eager[:, : PROMPT.shape[1] + 3])
    assert graphs_many == graphs_few  # 27 more tokens, a residual flush included: no new graph


def test_compiled_forward_with_fullgraph_is_refused_with_what_to_do():
    model = _model()
    model.forward = torch.compile(model.forward, fullgraph=True)
    with pytest.raises(Exception, match=r"(?s)MiniKV prefill .* runs eagerly.*compile=True"):
        model.generate(PROMPT, max_new_tokens=3, do_sample=False, pad_token_id=0)


def test_compiled_module_through_minikv_generate():
    model = _model()
    eager = minikv.generate(model, PROMPT, max_new_tokens=20)
    out, graphs = _graphs(lambda: minikv.generate(torch.compile(model), PROMPT, max_new_tokens=20))
    assert torch.equal(out, eager)
    assert graphs > 0

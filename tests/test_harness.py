"""lm-eval integration (issue 5): ``minikv_hf`` scores through the compressed cache, and resolves
from lm-eval's own command line."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from models import tiny_model

import minikv

ROOT = Path(__file__).resolve().parents[1]
lm_eval = pytest.importorskip("lm_eval")
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.api.registry import get_model  # noqa: E402

from minikv.harness.model import MiniKVLM  # noqa: E402
from minikv.harness.scoring import score_group  # noqa: E402


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    from minikv.models import embedded_gguf

    path = embedded_gguf()
    t = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    t.pad_token = t.pad_token or t.eos_token
    return t


@pytest.fixture(scope="module")
def model(tok):
    return tiny_model("llama", vocab_size=len(tok), max_position_embeddings=4096)  # fp64


def _text(n_words, seed):
    g = torch.Generator().manual_seed(seed)
    words = "river stone cloud seven quiet orange market window silver north".split()
    return " ".join(words[int(i)] for i in torch.randint(0, len(words), (n_words,), generator=g))


def _ll_requests():
    ctx = _text(300, 0)
    return [
        Instance("loglikelihood", {}, (ctx, c), i) for i, c in enumerate([" river stone", " seven", " north quiet"])
    ] + [Instance("loglikelihood", {}, (_text(150, 1), " cloud window market"), 3)]


def _lm(model, tok, **kw):
    return MiniKVLM(pretrained=model, tokenizer=tok, batch_size=1, **kw)


@pytest.fixture
def unpatch_after(model):
    yield
    if minikv.is_patched(model):
        minikv.unpatch(model)


def test_compression_off_equals_the_stock_hf_model(model, tok, unpatch_after):
    stock = get_model("hf")(pretrained=model, tokenizer=tok, batch_size=1)
    want = stock.loglikelihood(_ll_requests())
    assert _lm(model, tok, cache="full").loglikelihood(_ll_requests()) == want  # lm-eval's path, exactly
    through_cache = _lm(model, tok, bits=16, budget=None).loglikelihood(_ll_requests())  # our path, nothing dropped
    for (a, ga), (b, gb) in zip(through_cache, want):
        assert a == pytest.approx(b, abs=1e-6) and ga == gb
    docs = [Instance("loglikelihood_rolling", {}, (_text(400, 2),), 0)]
    minikv.unpatch(model)  # patched by the lm above
    rolled = _lm(model, tok, bits=16, budget=None)
    assert rolled.loglikelihood_rolling(docs)[0] == pytest.approx(stock.loglikelihood_rolling(docs)[0], abs=1e-6)


def test_compression_changes_the_loglikelihoods_and_is_recorded(model, tok, unpatch_after):
    stock = get_model("hf")(pretrained=model, tokenizer=tok, batch_size=1).loglikelihood(_ll_requests())
    lm = _lm(model, tok, bits=2, budget=0.25)
    got = lm.loglikelihood(_ll_requests())
    assert all(torch.isfinite(torch.tensor(a)) for a, _ in got)
    assert max(abs(a - b) for (a, _), (b, _) in zip(got, stock)) > 1e-3
    assert lm.kv.caches == 2  # one prefill per distinct context: the three choices share one
    assert 0 < lm.kv.ratio < 0.6  # fp64 residual included


def test_choices_sharing_one_prefill_score_as_separate_prefills(model, tok, unpatch_after):
    lm = _lm(model, tok, bits=2, budget=0.3, scorer="snapkv")
    ctx = tok(_text(200, 3)).input_ids
    conts = [tok(c).input_ids for c in (" river", " seven north", " quiet orange market")]
    shared = score_group(lm.model, lm.new_cache, True, ctx, conts, lm.max_length)
    alone = score_group(lm.model, lm.new_cache, False, ctx, conts, lm.max_length)
    assert shared == alone


def test_generate_until_with_left_padding_and_compression_off_matches_stock(model, tok, unpatch_after):
    reqs = [
        Instance("generate_until", {}, (_text(n, n), {"until": ["\n\n"], "max_gen_toks": 6}), i)
        for i, n in enumerate((120, 60, 90))
    ]
    want = get_model("hf")(pretrained=model, tokenizer=tok, batch_size=3).generate_until(reqs)
    assert MiniKVLM(pretrained=model, tokenizer=tok, batch_size=3, bits=16, budget=None).generate_until(reqs) == want
    minikv.unpatch(model)
    # 2-bit keys and values, no sinks: the saving shows even on these short prompts (residual in fp16)
    lm = MiniKVLM(
        pretrained=model, tokenizer=tok, batch_size=3, bits=2, k_bits=2, sink_tokens=0, budget=0.5, residual_length=16
    )
    got = lm.generate_until(reqs)
    assert len(got) == 3 and all(isinstance(g, str) for g in got)
    assert lm.kv.caches == 1 and lm.kv.ratio < 0.6


@pytest.mark.parametrize(
    "args, match",
    [
        (dict(bits=3), "bits must be one of"),
        (dict(budget=-1), "budget must be at least 1 token"),
        (dict(cache="dense"), "cache must be one of"),
        (dict(cache="quanto", budget=0.5), "only apply to cache=minikv"),
        (dict(cache="quanto", bits=16), "with cache=quanto"),
    ],
)
def test_bad_model_args_are_refused_before_loading(args, match):
    with pytest.raises(ValueError, match=match):
        MiniKVLM(pretrained="/nonexistent/never-loaded", **args)


def test_quanto_on_a_model_with_sliding_layers_is_refused_before_any_request(tok):
    gemma = tiny_model("gemma3_text", vocab_size=len(tok), dtype=torch.float32)
    with pytest.raises(ValueError, match="cache=quanto: .* \\['sliding_attention'\\] layers"):
        MiniKVLM(pretrained=gemma, tokenizer=tok, batch_size=1, cache="quanto", bits=4)
    assert not minikv.is_patched(gemma)


def test_registration_keeps_the_builtin_models_and_imports_nothing_at_startup():
    code = (
        "import sys; assert 'torch' not in sys.modules and 'minikv' not in sys.modules; "
        "from lm_eval.api.registry import get_model, model_registry; "
        "print(get_model('minikv_hf').__name__, get_model('hf').__name__, 'vllm' in model_registry)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["MiniKVLM", "HFLM", "True"]


def test_stock_lm_eval_command_line_resolves_minikv_hf(model, tok, tmp_path):
    model.to(torch.float32).save_pretrained(tmp_path / "tiny")
    model.to(torch.float64)
    tok.save_pretrained(tmp_path / "tiny")
    cli = Path(sys.executable).parent / "lm_eval"
    cmd = [
        str(cli),
        "--model",
        "minikv_hf",
        "--model_args",
        f"pretrained={tmp_path / 'tiny'},bits=2,budget=0.5",
        "--tasks",
        "minikv_passkey,minikv_passkey_choice",
        "--include_path",
        str(ROOT / "evals" / "tasks"),
        "--metadata",
        json.dumps({"tokens": 200, "samples": 2}),
        "--device",
        "cpu",
        "--batch_size",
        "1",
        "--output_path",
        str(tmp_path / "out"),
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "minikv_hf" in out.stdout and "minikv_passkey_choice" in out.stdout
    results = json.loads(next((tmp_path / "out").rglob("results_*.json")).read_text())
    assert results["results"]["minikv_passkey_choice"]["acc,none"] >= 0.0
    assert results["config"]["model_args"]["bits"] == 2


def test_hf_arguments_map_short_names_and_gguf_paths_and_keep_the_rest():
    from minikv.harness.model import hf_arguments
    from minikv.models import dense_copy, embedded_gguf

    path = embedded_gguf()
    dense = str(dense_copy("smollm2"))
    for name in ("smollm2", None, "SmolLM2-135M-Instruct", str(path)):
        args = hf_arguments(name, None, "cpu", {"revision": "main"})
        source = dict(pretrained=str(path.parent), gguf_file=path.name) if name == str(path) else dict(pretrained=dense)
        assert args == dict(**source, dtype="float32", device="cpu", revision="main")
    given = hf_arguments("org/model", "bfloat16", None, {"trust_remote_code": True})
    assert given["pretrained"] == "org/model" and given["dtype"] == "bfloat16" and given["trust_remote_code"]
    assert hf_arguments("org/model", None, "cpu", {})["dtype"] == "auto"  # as lm-eval's hf model
    with pytest.raises(ValueError, match="model must be a short name"):
        hf_arguments("smollm3", None, "cpu", {})


@pytest.mark.slow
def test_stock_lm_eval_loads_a_gguf_file_the_way_hf_does(tmp_path):
    """``--model_args pretrained=DIR,gguf_file=FILE``: HFLM's own loading of the model and its tokenizer."""
    from minikv.models import embedded_gguf

    path = embedded_gguf()
    cli = Path(sys.executable).parent / "lm_eval"
    cmd = [
        str(cli),
        "--model",
        "minikv_hf",
        "--model_args",
        f"pretrained={path.parent},gguf_file={path.name},bits=2",
        "--tasks",
        "minikv_passkey_choice",
        "--include_path",
        str(ROOT / "evals" / "tasks"),
        "--metadata",
        json.dumps({"tokens": 300, "samples": 2}),
        "--device",
        "cpu",
        "--batch_size",
        "1",
        "--output_path",
        str(tmp_path / "out"),
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    results = json.loads(next((tmp_path / "out").rglob("results_*.json")).read_text())
    assert results["config"]["model_args"]["gguf_file"] == path.name
    assert results["results"]["minikv_passkey_choice"]["acc,none"] == 1.0  # SmolLM2 picks the key at 300 tokens

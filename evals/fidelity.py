"""Fidelity of a compressed cache: next-token distributions through it vs through the full cache.

    python evals/fidelity.py --model smollm2 --grid quant          # a named group of configurations
    python evals/fidelity.py --knobs '{"bits": 2, "sink_tokens": 4}' # one configuration

Teacher forcing on real long prompts, deterministic, ~1 min per configuration on 2 CPU cores:

- **text**: documents of the Python reference manual (``minikv_reference_ppl``'s text): the first
  ``--tokens`` tokens are the context, the next ``--continuation`` tokens are scored;
- **retrieval**: the suite's generators (pass key, NIAH single / multikey, variable tracking): the
  prompt is the context, the gold answer is scored.

The context but its last token is prefilled into a fresh cache (which compresses it); the last
context token and the continuation go through the cache in one forward pass, so every scored token
is predicted from the compressed context (as ``minikv_hf`` scores log-likelihoods). The full cache's
logits come from one uncompressed forward pass. Reported per configuration: mean KL(full || compressed)
per token on text and on answers, top-1 agreement, the text perplexity ratio, answers still greedy-
correct under teacher forcing, and the KV bytes held (% of fp16, the cache's own report). Rows are
appended to ``evals/results/fidelity_<model>.csv`` and the whole file is rendered to ``.md``.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "tasks"))

from fidelity_configs import GRIDS  # noqa: E402

RETRIEVAL = ("passkey", "niah_single", "niah_multikey", "variable_tracking")


def build_prompts(tok, tokens: int, continuation: int, samples: int, seed: int = 0):
    """``[(kind, context ids, continuation ids)]``: ``samples`` text documents, ``samples`` of each retrieval task."""
    import minikv_data

    prompts = []
    for row in minikv_data.reference_text(tokens=int(1.6 * tokens), samples=samples, seed=seed)["test"]:
        ids = tok(row["text"]).input_ids  # the model's own special tokens (Gemma's <bos>, none for SmolLM2)
        if len(ids) >= tokens + continuation:
            prompts.append(("text", ids[:tokens], ids[tokens : tokens + continuation]))
    for name in RETRIEVAL:
        for row in getattr(minikv_data, name)(tokens=tokens, samples=samples, seed=seed)["test"]:
            answer = " " + " ".join(row["outputs"])
            prompts.append(("retrieval", tok(row["input"]).input_ids, tok(answer, add_special_tokens=False).input_ids))
    return prompts


def full_logprobs(model, context, cont):
    """Log-probabilities ``[N, V]`` (fp64) of the full model at the positions predicting ``cont``."""
    import torch

    ids = torch.tensor([context + cont[:-1]])
    with torch.inference_mode():  # only the last len(cont) positions go through the LM head
        logits = model(ids, use_cache=False, logits_to_keep=len(cont)).logits[0]
    return torch.log_softmax(logits.double(), -1)


def compressed_logprobs(model, cfg, context, cont):
    """Log-probabilities ``[N, V]`` through a MiniKV cache holding the compressed context; and its memory."""
    import torch

    import minikv
    from minikv.compat import cache_key

    cache = minikv.MiniKVCache(cfg, model.config, max_new_tokens=len(cont))
    ids = torch.tensor([context + cont[:-1]])
    with torch.inference_mode():
        model(ids[:, : len(context) - 1], use_cache=True, logits_to_keep=1, **{cache_key(): cache})
        logits = model(ids[:, len(context) - 1 :], use_cache=True, **{cache_key(): cache}).logits[0]
    return torch.log_softmax(logits.double(), -1), cache.memory()


def measure(model, cfg, prompts, reference) -> dict:
    """Fidelity metrics of configuration ``cfg`` over ``prompts`` (``reference``: the full cache's log-probs)."""
    import torch

    import minikv

    stats = {
        kind: dict(kl=0.0, agree=0, n=0, nll_full=0.0, nll=0.0, correct=0, prompts=0) for kind in ("text", "retrieval")
    }
    used = fp16 = 0
    minikv.patch(model, config=cfg)
    try:
        for (kind, context, cont), ref in zip(prompts, reference):
            logp, mem = compressed_logprobs(model, cfg, context, cont)
            used, fp16 = used + mem.used_bytes, fp16 + mem.fp16_bytes
            target = torch.tensor(cont)[:, None]
            s = stats[kind]
            s["kl"] += float((ref.exp() * (ref - logp)).sum(-1).sum())
            s["agree"] += int((ref.argmax(-1) == logp.argmax(-1)).sum())
            s["n"] += len(cont)
            s["nll_full"] -= float(ref.gather(-1, target).sum())
            s["nll"] -= float(logp.gather(-1, target).sum())
            s["correct"] += bool((logp.argmax(-1) == target[:, 0]).all())
            s["prompts"] += 1
    finally:
        minikv.unpatch(model)
    t, r = stats["text"], stats["retrieval"]
    return dict(
        kl_text=t["kl"] / max(t["n"], 1),
        kl_answer=r["kl"] / max(r["n"], 1),
        top1_text=t["agree"] / max(t["n"], 1),
        top1_answer=r["agree"] / max(r["n"], 1),
        ppl_ratio=math.exp((t["nll"] - t["nll_full"]) / max(t["n"], 1)),
        answers_correct=f"{r['correct']}/{r['prompts']}",
        kv_percent_of_fp16=100.0 * used / fp16 if fp16 else 0.0,
    )


def full_cache_answers(prompts, reference) -> str:
    """Answers greedy-correct under teacher forcing with the full cache (the ceiling of the column)."""
    import torch

    hits = [
        bool((ref.argmax(-1) == torch.tensor(c)).all())
        for (k, _, c), ref in zip(prompts, reference)
        if k == "retrieval"
    ]
    return f"{sum(hits)}/{len(hits)}"


FIELDS = [
    "model",
    "name",
    "knobs",
    "kv_percent_of_fp16",
    "kl_text",
    "kl_answer",
    "top1_text",
    "top1_answer",
    "ppl_ratio",
    "answers_correct",
    "tokens",
    "seconds",
    "machine",
    "torch",
    "transformers",
]


def write_markdown(csv_path: Path) -> None:
    with open(csv_path) as f:
        rows = list(csv.DictReader(f))
    lines = [
        "| config | knobs | KV % of fp16 | KL text | KL answer | top-1 text | top-1 answer | ppl ratio | answers |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        knobs = ", ".join(f"{k}={v}" for k, v in json.loads(r["knobs"]).items())
        lines.append(
            f"| {r['name']} | {knobs} | {float(r['kv_percent_of_fp16']):.1f} | {float(r['kl_text']):.4f} | "
            f"{float(r['kl_answer']):.4f} | {float(r['top1_text']):.3f} | {float(r['top1_answer']):.3f} | "
            f"{float(r['ppl_ratio']):.4f} | {r['answers_correct']} |"
        )
    if rows:
        r = rows[-1]
        lines.append(
            f"\n{r['model']}, ~{r['tokens']}-token contexts, {r['machine']}, torch {r['torch']}, "
            f"transformers {r['transformers']}."
        )
    csv_path.with_suffix(".md").write_text("\n".join(lines) + "\n")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2", help="smollm2 or gemma3-270m (or a path / hub id)")
    p.add_argument("--grid", default=None, help=f"a named group of configurations: {sorted(GRIDS)}")
    p.add_argument("--knobs", default=None, help="one configuration as JSON (MiniKVConfig fields, or preset)")
    p.add_argument("--tokens", type=int, default=2000, help="context length in tokens")
    p.add_argument("--continuation", type=int, default=64, help="text tokens scored after each document")
    p.add_argument("--samples", type=int, default=2, help="documents, and samples of each retrieval task")
    p.add_argument("--skip-done", action="store_true", help="skip configurations already in the CSV (same tokens)")
    p.add_argument("--out", default=None, help="CSV to append to (default evals/results/fidelity_<model>.csv)")
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    import transformers

    from minikv.config import build_config
    from minikv.models import load_model

    configs = list(GRIDS[args.grid]) if args.grid else []
    if args.knobs:
        configs.append(("custom", json.loads(args.knobs)))
    if not configs:
        p.error("give --grid or --knobs")
    built = [(name, knobs, build_config(**knobs)) for name, knobs in configs]  # all validated before loading
    torch.set_grad_enabled(False)
    model, tok = load_model(args.model)
    prompts = build_prompts(tok, args.tokens, args.continuation, args.samples)
    reference = [full_logprobs(model, c, n) for _, c, n in prompts]
    print(f"{len(prompts)} prompts; full cache answers correct: {full_cache_answers(prompts, reference)}", flush=True)
    out = Path(args.out or HERE / "results" / f"fidelity_{args.model}.csv")
    out.parent.mkdir(parents=True, exist_ok=True)
    new_file = not out.exists()
    meta = dict(
        model=args.model,
        tokens=args.tokens,
        machine=f"{platform.machine()} {os.cpu_count()} CPUs",
        torch=torch.__version__,
        transformers=transformers.__version__,
    )
    done = set()
    if args.skip_done and out.exists():
        with open(out) as f:
            done = {(r["name"], r["knobs"], int(r["tokens"])) for r in csv.DictReader(f)}
    for name, knobs, cfg in built:
        if (name, json.dumps(knobs), args.tokens) in done:
            continue
        t = time.perf_counter()
        row = dict(name=name, knobs=json.dumps(knobs), **measure(model, cfg, prompts, reference))
        row.update(meta, seconds=round(time.perf_counter() - t, 1))
        with open(out, "a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=FIELDS)
            if new_file:
                w.writeheader()
                new_file = False
            w.writerow({k: round(v, 5) if isinstance(v, float) else v for k, v in row.items()})
        write_markdown(out)
        print(json.dumps({k: row[k] for k in FIELDS[1:11]}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

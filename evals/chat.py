"""Multi-turn chat on one cache: does the third turn still find the first turn's pass key?

    python evals/chat.py                                   # SmolLM2, 5 seeds, the configurations below
    python evals/chat.py --seeds 10 --tokens 2000

The conversation of :data:`minikv.prompts.CHAT_TURNS` (a document with a pass key, a question about
something else, a question about the sky, then the pass key) through :class:`minikv.chat.Conversation`,
once per configuration and seed; writes ``evals/results/chat_<model>.csv`` (one row per configuration:
keys found, mean KV bytes as % of fp16 over the compressed layers) and prints a markdown table.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent

CONFIGS = [  # (label, minikv.patch knobs; None: the unpatched model)
    ("full cache", None),
    ("minikv defaults", {}),
    ("snapkv preset (the defaults until issue 20)", dict(preset="snapkv")),
    ("snapkv preset, 75% kept", dict(preset="snapkv", budget=0.75)),
    ("minikv K4V2, every token kept", dict(budget=None)),
    ("MiniKV paper recipe", dict(preset="paper")),
    ("kvzip 50%, global schedule", dict(scorer="kvzip", schedule="global")),
    ("kvzip 50%, global, adaptive heads", dict(scorer="kvzip", schedule="global", head_budgets="adaptive")),
    (
        "kvzip + window sum 50%, global, adaptive heads",
        dict(scorer="kvzip_window", schedule="global", head_budgets="adaptive"),
    ),
]


def run(model, tok, knobs, doc: str):
    import minikv
    from minikv.chat import Conversation
    from minikv.prompts import CHAT_TURNS

    if knobs is not None:
        minikv.patch(model, **knobs)
    try:
        chat = Conversation(model, tok)
        answers = [chat.ask(q.format(doc=doc), max_new_tokens=n) for q, n in CHAT_TURNS]
    finally:
        if knobs is not None:
            minikv.unpatch(model)
    ratio = chat.cache.memory().ratio if knobs is not None else 1.0
    return answers, ratio


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2", help="a chat model: minikv.models.load_model name")
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--tokens", type=int, default=1200, help="document length in tokens")
    p.add_argument("--out", help="CSV path (default evals/results/chat_<model>.csv)")
    p.add_argument("--only", help="run only the configurations whose label contains this text")
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    import transformers

    from minikv.models import load_model
    from minikv.prompts import document

    model, tok = load_model(args.model)
    rows = []
    for label, knobs in CONFIGS:
        if args.only and args.only not in label:
            continue
        found, ratios = 0, []
        for seed in range(args.seeds):
            doc, key = document(tok, args.tokens, seed=seed)
            answers, ratio = run(model, tok, knobs, doc)
            found += key in answers[-1]
            ratios.append(ratio)
            print(json.dumps(dict(config=label, seed=seed, key=key, answers=answers, kv=round(ratio, 4))), flush=True)
        rows.append(
            dict(
                config=label,
                knobs=json.dumps(knobs),
                keys_found=found,
                seeds=args.seeds,
                kv_percent_of_fp16=round(100 * sum(ratios) / len(ratios), 1),
                doc_tokens=args.tokens,
                model=args.model,
                machine=f"{platform.machine()} {os.cpu_count()} CPUs",
                torch=torch.__version__,
                transformers=transformers.__version__,
            )
        )
    out = Path(args.out or HERE / "results" / f"chat_{args.model}.csv")
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.only and out.exists():  # keep the other configurations' rows, replace the ones run now
        ran = {r["config"] for r in rows}
        rows = [r for r in csv.DictReader(open(out)) if r["config"] not in ran] + rows
    with open(out, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    print("| configuration | pass keys found in turn 3 | KV % of fp16 |\n|---|---|---|")
    for r in rows:
        print(f"| {r['config']} | {r['keys_found']}/{r['seeds']} | {r['kv_percent_of_fp16']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

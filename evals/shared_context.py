"""Shared-context multi-turn (SCBench style): compress a document once, before any question, then ask
several different questions on the same cache.

    python evals/shared_context.py --model smollm2 --tokens 2000 --samples 10 --configs core
    python evals/shared_context.py --model gemma3-270m --knobs '{"scorer": "kvzip"}' --label kvzip

Each sample is a document of ``--tokens`` tokens of natural prose (the Python reference manual, as the
suite's haystacks) holding four "special magic number" needles (random key words, random 7-digit
values) and a 5-digit pass key. The document alone is prefilled into the cache (compressed there: the
cache has seen no question), then five turns follow on that cache, in an order rotated per sample:

- ``key1``/``key2``/``key3``: the magic number of one of the four keys (multi-key retrieval; each turn a
  different key, so a cache that kept what one question needed must still hold the others);
- ``passkey``: the pass key;
- ``quote``: the rest of a sentence of the document quoted from its first words (text no other
  question touches; scored over its first ``QUOTE_TOKENS`` tokens).

A turn is the question and its gold answer, teacher-forced through the cache in one forward (and then
compressed with the conversation, as a chat turn is); a number is right when every scored token is the
model's greedy choice, i.e. greedy decoding would have produced it; a quote scores the share of its
tokens that are the greedy choice (teacher-forced copy accuracy). Reported per turn and per
task: accuracy with Wilson 95% intervals, and the KV bytes held over the compressed layers (% of fp16,
the cache's own report: after the document, the compressed context every question reads, and after
the last turn). Rows go to ``evals/results/shared_context_<model>.csv``.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import random
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "tasks"))
sys.path.insert(0, str(HERE))

TASKS = ("key1", "key2", "key3", "passkey", "quote")
QUOTE_WORDS, QUOTE_TOKENS = 6, 12

CONFIGS = {  # name -> [(label, minikv.patch knobs; None: the unpatched model's own cache; {"cache": "quanto",
    # "bits": b}: transformers' QuantizedCache, the quantization-only baseline of the judge)]
    "core": [
        ("full cache", None),
        ("defaults (snapkv, 50%)", dict(preset="snapkv")),  # the defaults until issue 20
        ("kvzip 50%", dict(scorer="kvzip")),
        ("K4V2 every token", dict(budget=None)),
    ],
    "kvzip": [
        ("kvzip 50%, recent 32", dict(scorer="kvzip", recent=32)),
        ("kvzip 50%, global, whole groups", dict(scorer="kvzip", schedule="global")),
        ("kvzip 55%, global, whole groups", dict(scorer="kvzip", schedule="global", budget=0.55)),
        (
            "kvzip 50%, global, repeat prefix",
            dict(scorer="kvzip", schedule="global", reconstruct_prefix="Repeat the previous context exactly."),
        ),
        ("kvzip 57%, global, G64", dict(scorer="kvzip", schedule="global", budget=0.57, q_group_size=64)),
        ("kvzip 50%, global, 16 bits", dict(scorer="kvzip", schedule="global", bits=16)),
    ],
    # "tiers" (MiKV's evicted tier at 2 bits, last at commit fd5e768) went with the tier: docs/shared-context.md
    "heads": [  # per-head budgets (AdaKV) on top of the global ranking, at the same total
        ("kvzip 50%, global, adaptive heads", dict(scorer="kvzip", schedule="global", head_budgets="adaptive")),
        (
            "kvzip 50%, global, adaptive heads, no floor",
            dict(scorer="kvzip", schedule="global", head_budgets="adaptive", head_floor=0.0),
        ),
    ],
    "window": [  # the pass's maxima merged with SnapKV's window (the prompt's last tokens here: no question yet)
        (
            "kvzip + window sum 50%, global, adaptive heads",
            dict(scorer="kvzip_window", schedule="global", head_budgets="adaptive"),
        ),
    ],
    "tails": [  # the full-precision tails at the best setting: a shorter residual, fewer or more sinks
        (
            "kvzip 50%, global, adaptive heads, R 32",
            dict(scorer="kvzip", schedule="global", head_budgets="adaptive", residual_length=32),
        ),
        (
            "kvzip 50%, global, adaptive heads, no sinks",
            dict(scorer="kvzip", schedule="global", head_budgets="adaptive", sink_tokens=0),
        ),
        (
            "kvzip 50%, global, adaptive heads, recent 32",
            dict(scorer="kvzip", schedule="global", head_budgets="adaptive", recent=32),
        ),
    ],
    "agnostic": [  # cheaper question-agnostic scores at the defaults' 50% (the document alone: no question yet)
        ("key norm 50%", dict(scorer="keynorm")),
        ("KeyDiff 50% (keys least like their head's mean)", dict(scorer="keydiff")),
        ("StreamingLLM 50% (sinks + recent)", dict(scorer="streaming")),
        ("H2O / MiniKV 50% (attention accumulated over the prompt)", dict(scorer="minikv")),
        ("A2SF 50% (accumulated, forgetting)", dict(scorer="a2sf")),
    ],
    "expected": [  # Expected Attention (no pass), one count per layer as the rows above, and ranked as the defaults
        ("Expected Attention 50%", dict(scorer="expected", schedule="uniform", head_budgets="uniform")),
        (
            "Expected Attention, layers and heads ranked together",
            dict(scorer="expected", schedule="global", head_budgets="adaptive"),
        ),
        ("Expected Attention, one set of tokens for every layer", dict(scorer="expected", schedule="shared")),
    ],
    "sinks": [  # the sink count at the defaults (4): none, 1, 16
        ("minikv defaults, no sinks", dict(sink_tokens=0)),
        ("minikv defaults, 1 sink", dict(sink_tokens=1)),
        ("minikv defaults, 16 sinks", dict(sink_tokens=16)),
    ],
    "gemma_recent": [  # Gemma 3's recent window around its default (32 with the shared schedule), and one sink
        ("minikv defaults, recent 0", dict(recent=0)),
        ("minikv defaults, recent 16", dict(recent=16)),
        ("minikv defaults, recent 64", dict(recent=64)),
        ("minikv defaults (recent 32), 1 sink", dict(sink_tokens=1)),
    ],
    "baselines": [  # KIVI-2 (every token, K2 V2 G32, none of minikv's fidelity knobs)
        (
            "KIVI-2 every token (K2V2 G32)",
            dict(budget=None, bits=2, k_bits=2, v_bits=2, q_group_size=32, sink_tokens=0, clip=False, rotate="none"),
        ),
        ("HF QuantizedCache (quanto) int4", dict(cache="quanto", bits=4)),
        ("HF QuantizedCache (quanto) int2", dict(cache="quanto", bits=2)),
    ],
    "heads_floor": [  # the default floor (0.25 of the uniform count, as the layers')
        (
            "kvzip 50%, global, adaptive heads, floor 0.25",
            dict(scorer="kvzip", schedule="global", head_budgets="adaptive"),
        ),
    ],
    "heads_budget": [  # the bytes left under 15% spent on more tokens
        (
            "kvzip 55%, global, adaptive heads",
            dict(scorer="kvzip", schedule="global", head_budgets="adaptive", budget=0.55),
        ),
    ],
    "gemma": [
        ("full cache", None),
        ("defaults (snapkv, 50%)", dict(preset="snapkv")),  # the defaults until issue 20
        ("kvzip 50%, global, whole groups", dict(scorer="kvzip", schedule="global")),
        ("K4V2 every token", dict(budget=None)),
    ],
    "gemma_frontier": [
        (
            "kvzip 90%, global, K2V2 G128",
            dict(scorer="kvzip", schedule="global", budget=0.9, k_bits=2, v_bits=2, q_group_size=128),
        ),
        (
            "kvzip 85%, global, K2V2 G64",
            dict(scorer="kvzip", schedule="global", budget=0.85, k_bits=2, v_bits=2, q_group_size=64),
        ),
        ("kvzip 58%, global", dict(scorer="kvzip", schedule="global", budget=0.58)),
    ],
    "gemma_global": [  # the global schedule's knobs on Gemma 3 (its defaults until the shared schedule)
        ("kvzip 50%, uniform schedule", dict(scorer="kvzip", schedule="uniform", head_budgets="uniform")),
        ("kvzip 50%, global, floor 0.5", dict(scorer="kvzip", schedule="global", head_floor=0.5)),
        ("kvzip 50%, global, floor 0.75", dict(scorer="kvzip", schedule="global", head_floor=0.75)),
        ("kvzip 50%, global, recent 32", dict(scorer="kvzip", schedule="global", recent=32)),
        (
            "kvzip 50%, global, recent 32, floor 0.75",
            dict(scorer="kvzip", schedule="global", recent=32, head_floor=0.75),
        ),
        ("kvzip 50%, global, 16 bits (the selection alone)", dict(scorer="kvzip", schedule="global", bits=16)),
    ],
    "gemma_shared": [  # one set of tokens for every layer (the defaults on a model with one KV head per layer)
        ("minikv defaults (one KV head: kvzip 50%, shared schedule)", {}),
        ("kvzip 58%, shared schedule", dict(scorer="kvzip", schedule="shared", budget=0.58)),
        ("kvzip 50%, shared schedule, recent 32", dict(scorer="kvzip", schedule="shared", recent=32)),
        ("kvzip 55%, shared schedule, recent 32", dict(scorer="kvzip", schedule="shared", recent=32, budget=0.55)),
        ("kvzip 58%, shared schedule, recent 32", dict(scorer="kvzip", schedule="shared", recent=32, budget=0.58)),
    ],
    "gemma_pool": [  # the shared schedule's pooling width (7 by default, SnapKV's)
        ("kvzip 50%, shared schedule, pool 1 (none)", dict(schedule="shared", pool_kernel=1)),
        ("kvzip 50%, shared schedule, pool 3", dict(schedule="shared", pool_kernel=3)),
        ("kvzip 50%, shared schedule, pool 11", dict(schedule="shared", pool_kernel=11)),
        ("kvzip 50%, shared schedule, pool 15", dict(schedule="shared", pool_kernel=15)),
    ],
    "gemma_pass": [  # the reconstruction pass's chunk and prefix under the shared schedule
        ("kvzip 50%, shared schedule, chunks of 256", dict(schedule="shared", reconstruct_chunk=256)),
        ("kvzip 50%, shared schedule, chunks of 1024", dict(schedule="shared", reconstruct_chunk=1024)),
        (
            "kvzip 50%, shared schedule, repeat prefix",
            dict(schedule="shared", reconstruct_prefix="Repeat the previous context exactly."),
        ),
    ],
    "groups": [  # larger quantization groups (fewer fp16 scales per token) spent on more kept tokens, <= 15%
        ("minikv defaults, G64, 66% kept", dict(q_group_size=64, budget=0.66)),
        ("minikv defaults, G128, 70% kept", dict(q_group_size=128, budget=0.70)),
        ("minikv defaults, G128, every token", dict(q_group_size=128, budget=None)),
        ("minikv defaults, G64, 62% kept", dict(q_group_size=64, budget=0.62)),
        ("minikv defaults, 55% kept", dict(budget=0.55)),  # SmolLM2: the bytes under 15% as more G32 tokens
    ],
    "gemma2bit": [
        ("K2V2 G128 every token", dict(budget=None, k_bits=2, v_bits=2, q_group_size=128)),
        (
            "kvzip 75%, global, K2V2 G128",
            dict(scorer="kvzip", schedule="global", budget=0.75, k_bits=2, v_bits=2, q_group_size=128),
        ),
    ],
    "tiers": [  # SmolLM2: a precision tier by layer (its calibration, minikv/calibration.py) and by token
        (
            "tier by layer: layers 2, 7, 18 at K4V4 (evals/value_layers.py)",
            dict(tier_share=[1.0 if i in (2, 7, 18) else 0.0 for i in range(30)]),
        ),
        ("tier 0.6 (K4V4) of the kept, K4V2 rest", dict(tier_share=0.6)),
        ("defaults before the tier (no tier)", dict(tier_share=0.0)),
    ],
}


def make_sample(tok, tokens: int, seed: int, index: int):
    """``(document, [(task, question, answer prefix, scored answer)])`` for sample ``index``."""
    import minikv_data

    rng = random.Random(f"shared-context-{seed}-{index}")
    keys = minikv_data._keys(rng, 4)
    values = [minikv_data._number(rng) for _ in keys]
    passkey = str(rng.randint(10000, 99999))
    needles = [f"One of the special magic numbers for {k} is: {v}." for k, v in zip(keys, values)]
    needles.append(f"The pass key is {passkey}. Remember it. {passkey} is the pass key.")
    text = minikv_data.haystack(rng, int(tokens * minikv_data.CHARS_PER_TOKEN) - 150, needles)
    sentences = [
        s for s in text.split(". ") if len(s.split()) > QUOTE_WORDS + 12 and "magic" not in s and "pass key" not in s
    ]
    sentence = rng.choice(sentences[len(sentences) // 10 : -len(sentences) // 10 or None])
    start, rest = " ".join(sentence.split()[:QUOTE_WORDS]), " " + " ".join(sentence.split()[QUOTE_WORDS:])
    rest = tok.decode(tok(rest, add_special_tokens=False).input_ids[:QUOTE_TOKENS])
    asked = rng.sample(range(4), 3)
    turns = [
        (
            f"key{i + 1}",
            f"What is the special magic number for {keys[j]} mentioned in the document?",
            f"The special magic number for {keys[j]} is: ",
            values[j],
        )
        for i, j in enumerate(asked)
    ]
    turns.append(("passkey", "What is the pass key in the document?", "The pass key is ", passkey))
    turns.append(("quote", f'Quote the sentence of the document that begins with "{start}".', f'"{start}', rest))
    shift = index % len(turns)
    return text, turns[shift:] + turns[:shift]


class Dialogue:
    """Token ids of the document and of each turn, in the model's chat format (plain text for a base model)."""

    def __init__(self, tok):
        self.tok = tok
        self.chat = getattr(tok, "chat_template", None) is not None

    def ids(self, text: str, special: bool = False):
        return self.tok(text, add_special_tokens=special).input_ids

    def document(self, doc: str):
        if self.chat:
            msgs = [
                {"role": "user", "content": f"Read this document. I will ask you questions about it.\n\n{doc}"},
                {"role": "assistant", "content": "I have read the document."},
            ]
            return self.ids(self.tok.apply_chat_template(msgs, tokenize=False))
        return self.ids(f"Read this document. Questions about it follow.\n\n{doc}\n", special=True)

    def turn(self, question: str, prefix: str, answer: str):
        """``(ids, n_scored)``: the turn's ids, its last ``n_scored`` being the scored answer."""
        if self.chat:
            head = self.tok.apply_chat_template(
                [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
            )
            head = head[head.index("<|im_start|>user") :] if "<|im_start|>user" in head else head
        else:
            head = f"\nQuestion: {question}\nAnswer: "
        first = self.ids(head + prefix)
        scored = self.ids(head + prefix + answer)[len(first) :]
        if self.ids(head + prefix + answer)[: len(first)] != first:  # tokenization merged across the cut
            scored = self.ids(answer)
        return first + scored, len(scored)


def run_sample(model, dialogue, knobs, doc, turns, max_new: int = 64):
    """Per turn ``(task, score, nll)``: the score is 1 if every scored token is the greedy choice (a quote: the
    share that is), the nll the scored tokens' mean negative log-likelihood (a continuous measure of the same
    answer, for paired comparisons of configurations); and the cache's KV ratio after the document and at the end."""
    import torch

    from minikv.cache import MiniKVCache
    from minikv.compat import cache_key

    doc_ids = torch.tensor([dialogue.document(doc)])
    if knobs is None:
        from transformers import DynamicCache

        cache = DynamicCache(config=model.config)
    elif "cache" in knobs:  # transformers' QuantizedCache (optimum-quanto): HF's defaults, G 64, R 128
        from transformers import QuantizedCache

        cache = QuantizedCache("quanto", model.config, nbits=knobs["bits"])
    else:
        cache = MiniKVCache(model._minikv_patch.config, model.config, max_new_tokens=max_new)
    results, pos = [], 0
    with torch.inference_mode():
        for ids in [doc_ids] + [None] * len(turns):
            if ids is None:
                break
            model(
                ids,
                position_ids=torch.arange(pos, pos + ids.shape[1])[None],
                use_cache=True,
                **{cache_key(): cache},
                logits_to_keep=1,
            )
            pos += ids.shape[1]
        doc_ratio = kv_ratio(model, cache, knobs, pos)
        for task, question, prefix, answer in turns:
            ids, n = dialogue.turn(question, prefix, answer)
            ids = torch.tensor([ids])
            logits = model(
                ids, position_ids=torch.arange(pos, pos + ids.shape[1])[None], use_cache=True, **{cache_key(): cache}
            ).logits[0]
            pos += ids.shape[1]
            pred = logits[-n - 1 : -1].argmax(-1)
            hits = (pred == ids[0, -n:]).float()
            nll = -logits[-n - 1 : -1].float().log_softmax(-1).gather(-1, ids[0, -n:, None]).mean()
            results.append((task, float(hits.mean()) if task == "quote" else float(hits.min()), float(nll)))
    return results, (doc_ratio, kv_ratio(model, cache, knobs, pos)), int(doc_ids.shape[1])


def kv_ratio(model, cache, knobs, tokens: int) -> float:
    """Bytes held over an fp16 cache's: minikv's own report, quanto's tensors (every layer), 1 for the full cache."""
    if knobs is None:
        return 1.0
    if "cache" in knobs:
        from minikv.harness.caches import fp16_bytes, quantized_cache_bytes

        return quantized_cache_bytes(cache) / fp16_bytes(model.config, 1, tokens)
    return cache.memory().ratio


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2")
    p.add_argument("--tokens", type=int, default=2000)
    p.add_argument("--samples", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--first", type=int, default=0, help="index of the first sample (the suite's samples are seeded by index)"
    )
    p.add_argument("--configs", default="core", help=f"a named group: {list(CONFIGS)}")
    p.add_argument("--knobs", help="one configuration instead of a group: minikv.patch knobs as JSON")
    p.add_argument("--label", help="the label of --knobs' row")
    p.add_argument("--out", help="CSV path (default evals/results/shared_context_<model>.csv; rows appended)")
    p.add_argument(
        "--records", help="JSONL path: one line per configuration and sample, every turn's (task, score, nll)"
    )
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    import transformers
    from stats import wilson

    import minikv
    from minikv.models import load_model

    model, tok = load_model(args.model)
    dialogue = Dialogue(tok)
    configs = [(args.label or args.knobs, json.loads(args.knobs))] if args.knobs else CONFIGS[args.configs]
    out = Path(args.out or HERE / "results" / f"shared_context_{args.model}.csv")
    out.parent.mkdir(parents=True, exist_ok=True)
    indices = range(args.first, args.first + args.samples)
    samples = [make_sample(tok, args.tokens, args.seed, i) for i in indices]
    for label, knobs in configs:
        if knobs is not None and "cache" not in knobs:
            if isinstance(knobs.get("reconstruct_prefix"), str):  # an instruction, in this model's tokens
                knobs = dict(knobs, reconstruct_prefix=dialogue.ids("\n" + knobs["reconstruct_prefix"] + "\n"))
            minikv.patch(model, **knobs)
        t0 = time.time()
        try:
            per_turn = [[] for _ in TASKS]
            per_task = {t: [] for t in TASKS}
            ratios, lengths = [], []
            nlls = []
            for index, (doc, turns) in zip(indices, samples):
                results, ratio, n = run_sample(model, dialogue, knobs, doc, turns)
                ratios.append(ratio)
                lengths.append(n)
                for i, (task, score, nll) in enumerate(results):
                    per_turn[i].append(score)
                    per_task[task].append(score)
                    nlls.append(nll)
                if args.records:
                    with open(args.records, "a") as f:
                        f.write(json.dumps(dict(config=label, sample=index, seed=args.seed, turns=results)) + "\n")
        finally:
            if knobs is not None and "cache" not in knobs:
                minikv.unpatch(model)
        every = [x for xs in per_turn for x in xs]
        doc_percent = 100 * sum(r[0] for r in ratios) / len(ratios)
        row = dict(
            config=label,
            knobs=json.dumps(knobs),
            mean=round(sum(every) / len(every), 3),
            mean_ci="[%.3f, %.3f]" % wilson(sum(every) / len(every), len(every)),
            **{f"turn{i + 1}": round(sum(xs) / len(xs), 3) for i, xs in enumerate(per_turn)},
            **{t: round(sum(xs) / len(xs), 3) for t, xs in per_task.items()},
            nll=round(sum(nlls) / len(nlls), 4),  # mean over every answer of its tokens' mean
            kv_percent_of_fp16=round(doc_percent, 1),
            kv_percent_after_turns=round(100 * sum(r[1] for r in ratios) / len(ratios), 1),
            kv_percent_exact=round(doc_percent, 2),
            kv_percent_largest=round(100 * max(r[0] for r in ratios), 2),  # the document held in most bytes
            samples=args.samples,
            first_sample=args.first,
            doc_tokens=round(sum(lengths) / len(lengths)),
            seconds=round(time.time() - t0),
            model=args.model,
            machine=f"{platform.machine()} {os.cpu_count()} CPUs",
            torch=torch.__version__,
            transformers=transformers.__version__,
        )
        print(json.dumps(row), flush=True)
        append_row(out, row)
    return 0


def append_row(path: Path, row: dict) -> None:
    """Add ``row`` to the CSV at ``path`` (the columns of every row so far, in order), and render it as ``.md``."""
    rows = list(csv.DictReader(open(path))) if path.exists() else []
    rows.append({k: str(v) for k, v in row.items()})
    fields = list(dict.fromkeys(k for r in rows for k in r))
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, restval="")
        w.writeheader()
        w.writerows(rows)
    cols = [
        "config",
        "kv_percent_of_fp16",
        "kv_percent_after_turns",
        "mean",
        "mean_ci",
        *[f"turn{i + 1}" for i in range(len(TASKS))],
        *TASKS,
    ]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(r.get(c, "") for c in cols) + " |" for r in rows]
    path.with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())

"""Why the shared-context suite's quote is lost: which of the quoted tokens the cache kept, and which it
predicts right, kept or not.

    python evals/quote_coverage.py --model gemma3-270m --knobs '{}' --samples 10

For each sample of ``evals/shared_context.py`` the document is compressed (``--knobs``: minikv.patch
knobs as JSON) and the quote turn alone is asked; each scored token of the quote is matched to its
position in the document, marked kept or dropped by the first compressed layer's selection (with
``schedule="shared"`` every layer keeps the same tokens), and scored as the suite scores it (the greedy
choice, teacher-forced). Prints each sample's tokens (``K``/``-`` kept/dropped, ``+``/``x`` right/wrong)
and the accuracy over kept and over dropped tokens.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "tasks"))
sys.path.insert(0, str(HERE))

import shared_context as sc  # noqa: E402

KEPT: list = []


def record_selection() -> None:
    """Wrap the kernels' ``select_tokens`` so the first compressed layer's kept positions are recorded."""
    from minikv import cache as C

    implementation = C.implementation

    class Recording:
        def __init__(self, impl):
            self.impl = impl

        def __getattr__(self, name):
            return getattr(self.impl, name)

        def select_tokens(self, scores, valid, n_keep, n_recent, n_max):
            idx = self.impl.select_tokens(scores, valid, n_keep, n_recent, n_max)
            if not KEPT:
                KEPT.append(set(idx[0, 0, : int(n_keep.view(-1)[0])].tolist()))
            return idx

    C.implementation = lambda *a, **k: Recording(implementation(*a, **k))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="gemma3-270m")
    p.add_argument("--knobs", default="{}")
    p.add_argument("--samples", type=int, default=10)
    p.add_argument("--tokens", type=int, default=2000)
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    import minikv
    from minikv.cache import MiniKVCache
    from minikv.compat import cache_key
    from minikv.models import load_model

    record_selection()
    model, tok = load_model(args.model)
    dialogue = sc.Dialogue(tok)
    minikv.patch(model, **json.loads(args.knobs))
    totals = {"kept": [0, 0], "dropped": [0, 0]}  # [right, all]
    for i in range(args.samples):
        doc, turns = sc.make_sample(tok, args.tokens, 0, i)
        _, question, prefix, answer = next(t for t in turns if t[0] == "quote")
        doc_ids = dialogue.document(doc)
        text = tok.decode(doc_ids)
        enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
        if len(enc.input_ids) != len(doc_ids):
            raise RuntimeError("the document does not re-tokenize to its own ids: no offsets")
        ids, n = dialogue.turn(question, prefix, answer)
        KEPT.clear()
        cache = MiniKVCache(model._minikv_patch.config, model.config, max_new_tokens=64)
        with torch.inference_mode():
            model(torch.tensor([doc_ids]), use_cache=True, **{cache_key(): cache}, logits_to_keep=1)
            pos = torch.arange(len(doc_ids), len(doc_ids) + len(ids))[None]
            logits = model(torch.tensor([ids]), position_ids=pos, use_cache=True, **{cache_key(): cache}).logits[0]
        right = (logits[-n - 1 : -1].argmax(-1) == torch.tensor(ids[-n:])).tolist()
        after = text.index(prefix[1:]) + len(prefix[1:])  # the quote's first words, then the scored rest
        source = [j for j, (a, _) in enumerate(enc.offset_mapping) if a >= after][:n]
        marks = []
        for j, ok, gold in zip(source, right, ids[-n:]):
            kind = "kept" if j in KEPT[0] else "dropped"
            totals[kind][0] += ok
            totals[kind][1] += 1
            marks.append(f"{tok.decode([gold])!r}:{'K' if kind == 'kept' else '-'}{'+' if ok else 'x'}")
        print(f"sample {i}: {sum(right) / n:.2f}", " ".join(marks), flush=True)
    for kind, (ok, total) in totals.items():
        print(f"{kind}: {ok}/{total} right ({ok / max(total, 1):.3f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

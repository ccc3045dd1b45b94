"""Long-context prompts generated locally: a pass key hidden in filler text."""

from __future__ import annotations

import random

FILLER = (
    "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
)


def passkey_prompt(tokenizer, n_tokens: int = 4000, seed: int = 0, depth: float | None = None):
    """A chat prompt of about ``n_tokens`` tokens with a 5-digit pass key at ``depth`` (0-1).

    Returns ``(text, key)``; the text asks for the key at the end.
    """
    rng = random.Random(seed)
    key = str(rng.randint(10000, 99999))
    depth = rng.uniform(0.2, 0.8) if depth is None else depth
    needle = f" The pass key is {key}. Remember it. {key} is the pass key. "
    per = len(tokenizer(FILLER, add_special_tokens=False).input_ids)
    reps = max(1, (n_tokens - 80) // per)
    before = int(reps * depth)
    haystack = FILLER * before + needle + FILLER * (reps - before)
    question = (
        "There is important info hidden inside a lot of irrelevant text. Find it and memorize it.\n"
        + haystack
        + "\nWhat is the pass key?"
    )
    messages = [{"role": "user", "content": question}]
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        text += "The pass key is"
    else:
        text = question + "\nThe pass key is"
    return text, key

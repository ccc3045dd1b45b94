"""Long-context prompts generated locally: a pass key hidden in filler text."""

from __future__ import annotations

import random

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
INTRO = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
    "I will quiz you about the important information there. "
)


def passkey_prompt(tokenizer, n_tokens: int = 4000, seed: int = 0, depth: float | None = None):
    """About ``n_tokens`` tokens of filler with a 5-digit pass key at ``depth`` (0-1, default random
    in [0.2, 0.8]), ending with the question and the start of the answer. Returns ``(text, key)``.
    """
    rng = random.Random(seed)
    key = str(rng.randint(10000, 99999))
    depth = rng.uniform(0.2, 0.8) if depth is None else depth
    per = len(tokenizer(FILLER, add_special_tokens=False).input_ids)
    reps = max(1, (n_tokens - 60) // per)
    before = int(reps * depth)
    needle = f"The pass key is {key}. Remember it. {key} is the pass key. "
    text = INTRO + FILLER * before + needle + FILLER * (reps - before) + "What is the pass key? The pass key is"
    return text, key

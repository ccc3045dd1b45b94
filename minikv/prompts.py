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
    body, key = document(tokenizer, n_tokens - 60, seed, depth)
    return INTRO + body + "What is the pass key? The pass key is", key


def document(tokenizer, n_tokens: int = 1000, seed: int = 0, depth: float | None = None):
    """About ``n_tokens`` tokens of filler with a 5-digit pass key at ``depth`` (as
    :func:`passkey_prompt`, without the instructions and the question). Returns ``(text, key)``."""
    rng = random.Random(seed)
    key = str(rng.randint(10000, 99999))
    depth = rng.uniform(0.2, 0.8) if depth is None else depth
    per = len(tokenizer(FILLER, add_special_tokens=False).input_ids)
    reps = max(1, n_tokens // per)
    before = int(reps * depth)
    needle = f"The pass key is {key}. Remember it. {key} is the pass key. "
    return FILLER * before + needle + FILLER * (reps - before), key


# a three-turn chat about a document (:func:`document`) whose last question needs its pass key:
# (question, tokens to generate); the first question is about something else, so a cache that keeps
# what the first turn's question attends to must still hold the key two turns later
CHAT_TURNS = (
    ("Here is a document.\n\n{doc}\n\nIn one sentence, what is this document about?", 24),
    ("What color is the sky according to the document?", 16),
    ("What is the pass key in the document? Answer with the number only.", 12),
)

"""Long-context tasks generated locally from a seed (nothing downloaded), for lm-eval.

Every generator takes lm-eval's task metadata as keyword arguments: ``tokens`` (approximate prompt
length, default 1500), ``samples`` (default 10), ``seed`` (default 0); pass them with
``--metadata '{"tokens": 4000, "samples": 20}'``. Lengths are approximate: ~4 characters per token
(SmolLM2's tokenizer gives 3.6-4.3 on these texts; the sweep records the real counts).

Haystack text is the English prose of the Python reference manual shipped with every CPython
(``pydoc_data.topics``), so the tasks need no download and the filler is natural, varied text,
like RULER's essays; the pass-key task keeps the classic repetitive filler.
"""

from __future__ import annotations

import random
import re
import string

CHARS_PER_TOKEN = 4.0
WORDS = (
    "apple amber anchor arrow autumn badge bamboo beacon birch bison blossom breeze bronze cactus candle canyon "
    "cedar cherry cobalt comet coral cotton crystal dawn delta desert dolphin dragon eagle echo ember falcon "
    "fern forest fossil galaxy garnet glacier granite harbor hazel heron horizon iris island ivory jade jasmine "
    "jungle kettle lagoon lantern lemon lilac lotus maple marble meadow meteor mint nectar oasis ocean olive "
    "onyx orchid otter panda pearl pepper pine planet plum quartz raven reef river ruby saffron salmon sapphire "
    "shadow silver spruce summit sunset thistle thunder tiger topaz tulip velvet violet walnut willow zephyr"
).split()


def _dataset(rows):
    import datasets

    return {"test": datasets.Dataset.from_list(rows)}


def _prose() -> list[str]:
    """Sentences of the Python reference manual's prose (code, grammar and headings dropped)."""
    from pydoc_data.topics import topics

    sentences = []
    for name in sorted(topics):
        for para in topics[name].split("\n\n"):
            lines = para.splitlines()
            if not lines or any(ln.startswith(" ") for ln in lines) or set(lines[-1]) <= set("*=-^~"):
                continue
            text = " ".join(ln.strip() for ln in lines)
            sentences += [s for s in re.split(r"(?<=[.!?])\s+", text) if len(s) > 20]
    return sentences


def haystack(rng: random.Random, n_chars: int, needles: list[str]) -> str:
    """~``n_chars`` of prose from a random start, with ``needles`` inserted at random sentence breaks."""
    prose = _prose()
    start = rng.randrange(len(prose))
    chunk, size = [], 0
    while size < n_chars:
        s = prose[(start + len(chunk)) % len(prose)]
        chunk.append(s)
        size += len(s) + 1
    for needle in needles:
        chunk.insert(rng.randint(int(0.1 * len(chunk)), int(0.9 * len(chunk))), needle)
    return " ".join(chunk)


def _number(rng: random.Random) -> str:
    return str(rng.randint(1_000_000, 9_999_999))


def _keys(rng: random.Random, n: int) -> list[str]:
    return ["-".join(rng.sample(WORDS, 2)) for _ in range(n)]


def _niah(tokens, samples, seed, n_keys, n_values, n_queries):
    rows = []
    for i in range(samples):
        rng = random.Random(f"niah-{seed}-{i}-{n_keys}-{n_values}-{n_queries}")
        keys = _keys(rng, n_keys)
        values = {k: [_number(rng) for _ in range(n_values)] for k in keys}
        needles = [f"One of the special magic numbers for {k} is: {v}." for k in keys for v in values[k]]
        queried = keys[:n_queries]
        text = haystack(rng, int(tokens * CHARS_PER_TOKEN) - 200, needles)
        what = ", ".join(queried[:-1]) + (" and " if len(queried) > 1 else "") + queried[-1]
        plural = n_values > 1 or n_queries > 1
        question = (
            f"What {'are all the special magic numbers' if plural else 'is the special magic number'} "
            f"for {what} mentioned in the provided text?"
        )
        prefix = (
            f"The special magic {'numbers' if plural else 'number'} for {what} mentioned in the provided "
            f"text {'are' if plural else 'is'}"
        )
        rows.append(
            dict(
                input=f"Some special magic numbers are hidden within the following text. Make sure to "
                f"memorize it. I will quiz you about the numbers afterwards.\n{text}\n{question}\n"
                f"{prefix}",
                outputs=[v for k in queried for v in values[k]],
            )
        )
    return _dataset(rows)


def niah_single(tokens=1500, samples=10, seed=0, **_):
    """One needle; retrieve its number."""
    return _niah(tokens, samples, seed, n_keys=1, n_values=1, n_queries=1)


def niah_multikey(tokens=1500, samples=10, seed=0, **_):
    """Four needles with different keys; retrieve the number of one of them."""
    return _niah(tokens, samples, seed, n_keys=4, n_values=1, n_queries=1)


def niah_multivalue(tokens=1500, samples=10, seed=0, **_):
    """One key with two numbers at different depths; retrieve both."""
    return _niah(tokens, samples, seed, n_keys=1, n_values=2, n_queries=1)


def niah_multiquery(tokens=1500, samples=10, seed=0, **_):
    """Two needles with different keys; retrieve both numbers."""
    return _niah(tokens, samples, seed, n_keys=2, n_values=1, n_queries=2)


def passkey(tokens=1500, samples=10, seed=0, **_):
    """The classic pass key in repetitive filler (Mohtashami & Jaggi)."""
    filler = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
    rows = []
    for i in range(samples):
        rng = random.Random(f"passkey-{seed}-{i}")
        key = str(rng.randint(10_000, 99_999))
        n = max(1, int(tokens * CHARS_PER_TOKEN / len(filler)))
        at = rng.randint(int(0.2 * n), int(0.8 * n))
        body = filler * at + f"The pass key is {key}. Remember it. {key} is the pass key. " + filler * (n - at)
        rows.append(
            dict(
                input=f"There is important info hidden inside a lot of irrelevant text. Find it and "
                f"memorize it. I will quiz you about the important information there.\n{body}\n"
                f"What is the pass key? The pass key is",
                outputs=[key],
            )
        )
    return _dataset(rows)


def variable_tracking(tokens=1500, samples=10, seed=0, hops=3, **_):
    """A chain ``VAR A = 12345. VAR B = VAR A. ...`` hidden in prose; name every variable holding the value."""
    rows = []
    for i in range(samples):
        rng = random.Random(f"vt-{seed}-{i}")
        names = ["".join(rng.choices(string.ascii_uppercase, k=5)) for _ in range(hops + 1)]
        value = str(rng.randint(10_000, 99_999))
        chain = [f"VAR {names[0]} = {value}."] + [f"VAR {names[j]} = VAR {names[j - 1]}." for j in range(1, hops + 1)]
        text = haystack(rng, int(tokens * CHARS_PER_TOKEN) - 200, [])
        parts = text.split(" ")
        spots = sorted(rng.sample(range(len(parts)), len(chain)))
        for spot, stmt in zip(reversed(spots), reversed(chain)):  # keep the chain in order
            parts.insert(spot, stmt)
        rows.append(
            dict(
                input=f"Memorize and track the chain(s) of variable assignment hidden in the following "
                f"text.\n{' '.join(parts)}\nQuestion: Find all variables that are assigned the value "
                f"{value} in the text above. Answer: According to the chain(s) of variable "
                f"assignment in the text above, {len(names)} variables are assigned the value "
                f"{value}, they are:",
                outputs=names,
            )
        )
    return _dataset(rows)


def common_words(tokens=1500, samples=10, seed=0, n_common=5, common_reps=12, **_):
    """A numbered word list: ``n_common`` words repeated ``common_reps`` times among words seen once."""
    rows = []
    for i in range(samples):
        rng = random.Random(f"cwe-{seed}-{i}")
        vocab = rng.sample(WORDS, len(WORDS))
        common, rare = vocab[:n_common], vocab[n_common:]
        n_words = max(int(tokens / 5.2), n_common * common_reps + 10)  # "12. word" is ~5 tokens
        words = common * common_reps + [rng.choice(rare) for _ in range(n_words - n_common * common_reps)]
        rng.shuffle(words)
        listing = " ".join(f"{j + 1}. {w}" for j, w in enumerate(words))
        rows.append(
            dict(
                input=f"Below is a numbered list of words. In these words, some appear more often than "
                f"others. Memorize the ones that appear most often.\n{listing}\nQuestion: What are "
                f"the {n_common} most common words in the above list? Answer: The top {n_common} "
                f"words that appear most often in the list are:",
                outputs=common,
            )
        )
    return _dataset(rows)


def frequent_words(tokens=1500, samples=10, seed=0, n_top=3, alpha=2.0, **_):
    """Coded words drawn from a Zipf law; name the ``n_top`` most frequent ones."""
    rows = []
    for i in range(samples):
        rng = random.Random(f"fwe-{seed}-{i}")
        vocab = ["".join(rng.choices(string.ascii_lowercase, k=5)) for _ in range(200)]
        weights = [1 / (r + 1) ** alpha for r in range(len(vocab))]
        words = rng.choices(vocab, weights=weights, k=max(int(tokens / 4), 50))  # a 5-letter code is ~4 tokens
        rows.append(
            dict(
                input=f"Read the following coded text and track the frequency of each coded word. Find "
                f"the {n_top} most frequently appeared coded words.\n{' '.join(words)}\nQuestion: Do "
                f"not provide any explanation. Please ignore the dots '....'. What are the {n_top} "
                f"most frequently appeared words in the above coded text? Answer: According to the "
                f"coded text above, the {n_top} most frequently appeared words are:",
                outputs=vocab[:n_top],
            )
        )
    return _dataset(rows)


def passkey_choice(tokens=1500, samples=10, seed=0, **_):
    """The pass-key prompt as a 4-way multiple choice (the true key and three others)."""
    rows = []
    for i, row in enumerate(passkey(tokens, samples, seed)["test"]):
        rng = random.Random(f"passkey-choice-{seed}-{i}")
        key = row["outputs"][0]
        choices = [key] + [str(rng.randint(10_000, 99_999)) for _ in range(3)]
        rng.shuffle(choices)
        rows.append(dict(input=row["input"], choices=choices, label=choices.index(key)))
    return _dataset(rows)


def reference_text(tokens=2000, samples=10, seed=0, **_):
    """Documents of ~``tokens`` tokens of the Python reference manual, for perplexity."""
    from pydoc_data.topics import topics

    n_chars = int(tokens * CHARS_PER_TOKEN)
    long_ones = sorted(name for name, text in topics.items() if len(text) >= n_chars)
    rng = random.Random(f"text-{seed}")
    chosen = rng.sample(long_ones, min(samples, len(long_ones)))
    return _dataset([dict(name=name, text=topics[name][:n_chars]) for name in chosen])

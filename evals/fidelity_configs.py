"""The configurations of ``evals/fidelity.py``: named groups of (label, ``MiniKVConfig`` knobs)."""

ALL = dict(budget=None)  # every token kept: the quantizer alone
Q64 = dict(bits=2, k_bits=2, q_group_size=64)  # 2-bit keys and values, groups of 64

GRIDS = {
    # the quantizer alone, each technique by itself and combined (every token kept)
    "quant": [
        ("16-bit (no compression)", dict(bits=16, budget=None)),
        ("2-bit G16 (KIVI)", dict(bits=2, k_bits=2, q_group_size=16, clip=False, rotate="none", sink_tokens=0, **ALL)),
        ("2-bit G64", dict(Q64, clip=False, rotate="none", sink_tokens=0, **ALL)),
        ("2-bit G64 + 4 sinks", dict(Q64, clip=False, rotate="none", **ALL)),
        ("2-bit G64 + clip", dict(Q64, clip=True, rotate="none", sink_tokens=0, **ALL)),
        ("2-bit G64 + rotate v", dict(Q64, clip=False, rotate="v", sink_tokens=0, **ALL)),
        ("2-bit G64 + rotate kv", dict(Q64, clip=False, rotate="kv", sink_tokens=0, **ALL)),
        ("2-bit G64 + 4 sinks + clip + rotate kv", dict(Q64, clip=True, rotate="kv", **ALL)),
        ("K4 V2 G32", dict(bits=2, k_bits=4, q_group_size=32, clip=False, rotate="none", sink_tokens=0, **ALL)),
        (
            "K4 V2 G32 + 4 sinks + clip + rotate kv",
            dict(bits=2, k_bits=4, q_group_size=32, clip=True, rotate="kv", **ALL),
        ),
        ("4-bit G32", dict(bits=4, q_group_size=32, clip=False, rotate="none", sink_tokens=0, **ALL)),
    ],
}

# token selection at MiniKV's memory point (<= 15% of fp16 at ~2-4k tokens) with the best quantizers
K4V2_G32 = dict(bits=2, k_bits=4, q_group_size=32)
BEST_Q = dict(sink_tokens=4, clip=True, rotate="kv")
GRIDS["select"] = [
    ("MiniKV paper recipe", dict(preset="paper")),
    (
        "snapkv 50%, 2-bit",
        dict(bits=2, k_bits=2, budget=0.5, recent=0.5, scorer="snapkv", sink_tokens=0, clip=False, rotate="none"),
    ),
    (
        "snapkv 50%, K4V2 G32 + sinks",
        dict(budget=0.5, recent=0.5, scorer="snapkv", sink_tokens=4, clip=False, rotate="none", **K4V2_G32),
    ),
    (
        "snapkv 50%, 2-bit + sinks/clip/rot-kv",
        dict(bits=2, k_bits=2, budget=0.5, recent=0.5, scorer="snapkv", **BEST_Q),
    ),
    ("snapkv 50%, K4V2 G32 + sinks/clip/rot-kv", dict(budget=0.5, recent=0.5, scorer="snapkv", **K4V2_G32, **BEST_Q)),
    (
        "snapkv 50% recent 25%, K4V2 G32 + sinks/clip/rot-kv",
        dict(budget=0.5, recent=0.25, scorer="snapkv", **K4V2_G32, **BEST_Q),
    ),
    (
        "pyramidkv 50%, K4V2 G32 + sinks/clip/rot-kv",
        dict(budget=0.5, recent=0.5, scorer="snapkv", schedule="pyramidkv", **K4V2_G32, **BEST_Q),
    ),
    (
        "minikv scorer 50%, K4V2 G32 + sinks/clip/rot-kv",
        dict(budget=0.5, recent=0.5, scorer="minikv", **K4V2_G32, **BEST_Q),
    ),
    ("all tokens, K4V2 G32 + sinks/clip/rot-kv", dict(budget=None, **K4V2_G32, **BEST_Q)),
]

# the recent / scored split and the GQA reduction, with the K4V2 G32 quantizer (<= 15% at ~4k tokens)
Q = dict(**K4V2_G32, **BEST_Q)
GRIDS["split"] = [
    ("snapkv 50% recent 64, K4V2 G32 + sinks/clip/rot-kv", dict(budget=0.5, recent=64, scorer="snapkv", **Q)),
    ("snapkv 50% recent 10%, K4V2 G32 + sinks/clip/rot-kv", dict(budget=0.5, recent=0.1, scorer="snapkv", **Q)),
    (
        "snapkv 55% recent 25%, K4V2 G64 + sinks/clip/rot-kv",
        dict(budget=0.55, recent=0.25, scorer="snapkv", **{**Q, "q_group_size": 64}),
    ),
]

# more tokens kept, at more bytes
GRIDS["lowbits"] = [
    (
        "snapkv 90% recent 25%, K4V2 G64 + sinks/clip/rot-kv",
        dict(budget=0.9, recent=0.25, scorer="snapkv", bits=2, k_bits=4, q_group_size=64, **BEST_Q),
    ),
    (
        "snapkv 75% recent 25%, K4V2 G32 + sinks/clip/rot-kv",
        dict(budget=0.75, recent=0.25, scorer="snapkv", bits=2, k_bits=4, q_group_size=32, **BEST_Q),
    ),
    (
        "snapkv 65% recent 25%, K4V2 G64 + sinks/clip/rot-kv",
        dict(budget=0.65, recent=0.25, scorer="snapkv", bits=2, k_bits=4, q_group_size=64, **BEST_Q),
    ),
]

# the 2-bit G64 / G32 formats at <= 15% of fp16 on ~4k-token prompts (the residual in fp32 included)
GRIDS["lowbits2"] = [
    (
        "snapkv 70% recent 25%, 2-bit G64 + sinks/clip/rot-kv",
        dict(budget=0.7, recent=0.25, scorer="snapkv", bits=2, k_bits=2, q_group_size=64, **BEST_Q),
    ),
    (
        "snapkv 65% recent 25%, 2-bit G32 + sinks/clip/rot-kv",
        dict(budget=0.65, recent=0.25, scorer="snapkv", bits=2, k_bits=2, q_group_size=32, **BEST_Q),
    ),
]

# the library's defaults until issue 20 (preset "snapkv"), spelled out: these grids were measured with them
DEFAULTS = dict(
    bits=2,
    k_bits=4,
    q_group_size=32,
    sink_tokens=4,
    clip=True,
    rotate="kv",
    budget=0.5,
    recent=0.25,
    scorer="snapkv",
    schedule="uniform",
)
GRIDS["defaults"] = [
    ("16-bit (no compression)", dict(bits=16, budget=None)),
    ("minikv defaults", DEFAULTS),
    ("minikv defaults, every token kept", dict(DEFAULTS, budget=None)),
    ("minikv defaults, 75% kept", dict(DEFAULTS, budget=0.75)),
    ("MiniKV paper recipe", dict(preset="paper")),
    ("2-bit G16 (KIVI), every token kept", GRIDS["quant"][1][1]),
]

# the defaults with one fidelity knob off at a time, at the operating point (50% kept)
GRIDS["ablate"] = [
    ("minikv defaults, no clipping", dict(DEFAULTS, clip=False)),
    ("minikv defaults, no rotation", dict(DEFAULTS, rotate="none")),
    ("minikv defaults, no sinks", dict(DEFAULTS, sink_tokens=0)),
    ("minikv defaults, 2-bit keys", dict(DEFAULTS, k_bits=2)),
]

# MiKV (the evicted tokens kept at 1-2 bits, ``evicted_bits``) was measured here (grid "mikv", last at
# commit fd5e768: docs/fidelity.md) and removed with its tier in issue 20: it never paid for its bytes.

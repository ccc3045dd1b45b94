"""The configurations of ``evals/sweep.py``, by group: (line in the plot, ``minikv_hf`` model args).

Add a group with ``GROUPS["name"] = [...]`` and run it with ``--configs name``; a file of its own
with a ``GROUPS`` dict runs with ``--configs FILE.py`` or ``--configs FILE.py:name``.
"""

FULL = ("full cache", dict(cache="full"))
# the rows measured before the fidelity defaults: the paper's recipe with a uniform schedule, the
# library's defaults of that time, so that every row keeps its meaning when the defaults change
OLD = dict(cache="minikv", preset="paper", schedule="uniform")

GROUPS = {
    "baselines": [
        FULL,
        ("HF QuantizedCache (quanto)", dict(cache="quanto", bits=4)),
        ("HF QuantizedCache (quanto)", dict(cache="quanto", bits=2)),
    ],
    "minikv": [
        ("minikv 2-bit, minikv scorer", dict(**OLD, bits=2, budget=0.75)),
        ("minikv 2-bit, minikv scorer", dict(**OLD, bits=2, budget=0.5)),
        ("minikv 2-bit, minikv scorer", dict(**OLD, bits=2, budget=0.25)),
        ("minikv 2-bit, minikv scorer, pyramid", dict(OLD, bits=2, budget=0.5, schedule="pyramid")),
        ("minikv 2-bit, snapkv scorer", dict(**OLD, bits=2, budget=0.75, scorer="snapkv")),
        ("minikv 2-bit, snapkv scorer", dict(**OLD, bits=2, budget=0.5, scorer="snapkv")),
        ("minikv 2-bit, snapkv scorer", dict(**OLD, bits=2, budget=0.25, scorer="snapkv")),
        ("minikv 2-bit, snapkv scorer, pyramid", dict(OLD, bits=2, budget=0.5, scorer="snapkv", schedule="pyramid")),
        ("minikv 2-bit, all tokens", dict(**OLD, bits=2, budget=None)),
        ("minikv 4-bit, snapkv scorer", dict(**OLD, bits=4, budget=0.5, scorer="snapkv")),
        ("minikv 4-bit, snapkv scorer", dict(**OLD, bits=4, budget=0.25, scorer="snapkv")),
    ],
}

# issue 6: every selection policy at 2 bits and three memory levels (the MiniKV/H2O and SnapKV
# scorers' rows are in "minikv"); KVCrush wraps SnapKV, whose plain rows are its "without" line.
LEVELS = (0.75, 0.5, 0.25)
GROUPS["policies"] = [
    (name, dict(OLD, bits=2, budget=level, **knobs))
    for name, knobs in [
        ("PyramidKV (snapkv scorer, pyramidkv schedule)", dict(scorer="snapkv", schedule="pyramidkv")),
        ("StreamingLLM (4 sinks + window)", dict(scorer="streaming")),
        ("A2SF (decay 0.95)", dict(scorer="a2sf")),
        ("key norm", dict(scorer="keynorm")),
        ("KVCrush 25% around SnapKV", dict(scorer="snapkv", crush=0.25)),
    ]
    for level in LEVELS
]

# the judge of the fidelity defaults: the baselines, minikv with the library's defaults and with
# MiniKV's paper recipe (``preset`` goes to minikv_hf unchanged)
GROUPS["fidelity"] = [
    FULL,
    ("minikv defaults", dict(cache="minikv", preset="snapkv")),  # the defaults until issue 20: SnapKV 50%
    ("MiniKV paper recipe", dict(cache="minikv", preset="paper")),
    ("HF QuantizedCache (quanto)", dict(cache="quanto", bits=4)),
    ("HF QuantizedCache (quanto)", dict(cache="quanto", bits=2)),
]

# what the quantizer alone costs at the defaults (no token evicted); the Gemma 3 judge adds it because
# transformers' QuantizedCache refuses models with sliding layers (no quanto rows there)
GROUPS["fidelity_extra"] = [("minikv defaults, every token kept", dict(cache="minikv", preset="snapkv", budget=None))]

# MiKV (issue 10; group "mikv", last at commit fd5e768) was removed with its tier in issue 20: docs/fidelity.md

# the frontier at more bytes (issue 10): the defaults keeping 75% of the tokens (22.5% of fp16 in the fidelity rows)
GROUPS["frontier"] = [("minikv defaults, 75% kept", dict(cache="minikv", preset="snapkv", budget=0.75))]

# a KIVI-style baseline where HF's QuantizedCache cannot run (Gemma 3's sliding layers): minikv keeping every
# token at plain 2-bit K and V, G 32, no sinks, no clipping, no rotation (KIVI-2 without its residual's size)
GROUPS["kivi"] = [
    (
        "KIVI-2 style (every token, K2 V2 G32, no fidelity knobs)",
        dict(
            cache="minikv",
            budget=None,
            bits=2,
            k_bits=2,
            v_bits=2,
            sink_tokens=0,
            clip=False,
            rotate="none",
            q_group_size=32,
        ),
    )
]

# issue 20: the question-agnostic reconstruction scorer (KVzip-style) with the layers ranked together, at the
# defaults' quantizer and budget (the shared-context suite, evals/shared_context.py, has it at 14.3% of fp16)
GROUPS["kvzip"] = [("kvzip 50%, global schedule", dict(cache="minikv", scorer="kvzip", schedule="global"))]
# the window's scores were a mean over its queries at commit 65692b1 (Gemma 3: 64.9% of full, the row
# "kvzip + window 50%, global schedule"), summed since
GROUPS["kvzip_window"] = [
    ("kvzip + window sum 50%, global schedule", dict(cache="minikv", scorer="kvzip_window", schedule="global"))
]
GROUPS["kvzip_window_heads"] = [
    (
        "kvzip + window sum 50%, global, adaptive heads",
        dict(cache="minikv", scorer="kvzip_window", schedule="global", head_budgets="adaptive"),
    )
]
# the defaults on a model with one KV head per layer (Gemma 3): every layer keeps the same tokens, each
# token's best score over the layers, max-pooled over 7 (docs/shared-context.md)
GROUPS["shared"] = [("kvzip 50%, shared schedule", dict(cache="minikv", scorer="kvzip", schedule="shared"))]
GROUPS["shared_recent"] = [  # with a 32-token recent window (the five-question suite's best on Gemma 3)
    ("kvzip 50%, shared schedule, recent 32", dict(cache="minikv", scorer="kvzip", schedule="shared", recent=32))
]
GROUPS["shared_recent64"] = [  # a 64-token recent window (the five-question suite's best over 30 samples on Gemma 3)
    ("kvzip 50%, shared schedule, recent 64", dict(cache="minikv", scorer="kvzip", schedule="shared", recent=64))
]
GROUPS["shared_g64"] = [  # quantization groups of 64 and 66% kept (<= 15% of fp16: the five-question suite's best)
    (
        "kvzip 66%, shared schedule, recent 64, G64",
        dict(cache="minikv", scorer="kvzip", schedule="shared", recent=64, q_group_size=64, budget=0.66),
    )
]
GROUPS["heads_g64"] = [  # the same bytes on a model with several KV heads per layer (per-head budgets)
    (
        "kvzip 66%, global, adaptive heads, G64",
        dict(cache="minikv", scorer="kvzip", schedule="global", head_budgets="adaptive", q_group_size=64, budget=0.66),
    )
]
GROUPS["heads"] = [
    (
        "kvzip 50%, global, adaptive heads",
        dict(cache="minikv", scorer="kvzip", schedule="global", head_budgets="adaptive"),
    )
]
# a precision tier by layer (issue 20): SmolLM2's three layers whose 2-bit values cost the answers most
# (`python evals/value_layers.py --model smollm2 --layers 30`) hold their kept prompt at K4 V4
SMOLLM2_V4_LAYERS = (2, 7, 18)
GROUPS["tier_layers"] = [
    (
        "kvzip 50%, global, adaptive heads, layers 2, 7, 18 at K4 V4",
        dict(cache="minikv", tier_share=[1.0 if i in SMOLLM2_V4_LAYERS else 0.0 for i in range(30)]),
    )
]
GROUPS["tier_tokens"] = [  # a tier by token at about the same bytes as the defaults + 2 points
    ("kvzip 50%, global, adaptive heads, 60% of the kept at K4 V4", dict(cache="minikv", tier_share=0.6))
]
GROUPS["residual_fp16"] = [  # the defaults since residual_dtype (an fp32 model's residual in fp16)
    ("minikv defaults, fp16 residual", dict(cache="minikv")),
]

"""The configurations of ``evals/sweep.py``: (line in the plot, ``minikv_hf`` model args)."""

FULL = ("full cache", dict(cache="full"))

GROUPS = {
    "baselines": [
        FULL,
        ("HF QuantizedCache (quanto)", dict(cache="quanto", bits=4)),
        ("HF QuantizedCache (quanto)", dict(cache="quanto", bits=2)),
    ],
    "minikv": [
        ("minikv 2-bit, minikv scorer", dict(cache="minikv", bits=2, budget=0.75)),
        ("minikv 2-bit, minikv scorer", dict(cache="minikv", bits=2, budget=0.5)),
        ("minikv 2-bit, minikv scorer", dict(cache="minikv", bits=2, budget=0.25)),
        ("minikv 2-bit, minikv scorer, pyramid", dict(cache="minikv", bits=2, budget=0.5, schedule="pyramid")),
        ("minikv 2-bit, snapkv scorer", dict(cache="minikv", bits=2, budget=0.75, scorer="snapkv")),
        ("minikv 2-bit, snapkv scorer", dict(cache="minikv", bits=2, budget=0.5, scorer="snapkv")),
        ("minikv 2-bit, snapkv scorer", dict(cache="minikv", bits=2, budget=0.25, scorer="snapkv")),
        ("minikv 2-bit, snapkv scorer, pyramid", dict(cache="minikv", bits=2, budget=0.5, scorer="snapkv",
                                                      schedule="pyramid")),
        ("minikv 2-bit, all tokens", dict(cache="minikv", bits=2, budget=None)),
        ("minikv 4-bit, snapkv scorer", dict(cache="minikv", bits=4, budget=0.5, scorer="snapkv")),
        ("minikv 4-bit, snapkv scorer", dict(cache="minikv", bits=4, budget=0.25, scorer="snapkv")),
    ],
}

# issue 6: every selection policy at 2 bits and three memory levels (the MiniKV/H2O and SnapKV
# scorers' rows are in "minikv"); KVCrush wraps SnapKV, whose plain rows are its "without" line.
LEVELS = (0.75, 0.5, 0.25)
GROUPS["policies"] = [
    (name, dict(cache="minikv", bits=2, budget=level, **knobs))
    for name, knobs in [
        ("PyramidKV (snapkv scorer, pyramidkv schedule)", dict(scorer="snapkv", schedule="pyramidkv")),
        ("StreamingLLM (4 sinks + window)", dict(scorer="streaming")),
        ("A2SF (decay 0.95)", dict(scorer="a2sf")),
        ("key norm", dict(scorer="keynorm")),
        ("KVCrush 25% around SnapKV", dict(scorer="snapkv", crush=0.25)),
    ]
    for level in LEVELS
]

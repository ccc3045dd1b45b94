"""Every knob of minikv in one validated dataclass.

Names follow HF's quantized cache where they mean the same thing (``q_group_size``,
``residual_length``); ``bits`` is the bit width (16 = no quantization).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

SUPPORTED_BITS = (2, 4, 16)
QUANT_BITS = (2, 4)  # k_bits / v_bits of a quantized store
RESIDUAL_DTYPES = ("model", "float16", "bfloat16")  # the full-precision residual's (sinks and recent tokens)
ROTATIONS = ("none", "v", "k", "kv")
AUTO_GROUP_SIZES = (32, 16)  # q_group_size=None: the first that divides head_dim and residual_length
CLIP_GRID = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7)  # clip ratios tried per group (1.0 = min-max)
SCORERS = ("minikv", "snapkv", "a2sf", "keynorm", "keydiff", "streaming", "kvzip", "kvzip_window", "expected")
PASS_SCORERS = ("kvzip", "kvzip_window")  # scored by the reconstruction pass after the whole prompt
DEFERRED_SCORERS = (*PASS_SCORERS, "expected")  # kept once every layer is scored: rankable across layers
SCHEDULES = ("uniform", "pyramid", "pyramidkv", "global", "shared")
HEAD_BUDGETS = ("uniform", "adaptive")
CRUSH_ANCHORS = ("alternate", "zeros", "ones", "mean", "random")
POOLS = ("max", "avg")
BACKENDS = ("auto", "reference", "triton")


def codes_per_word(bits: int) -> int:
    """How many ``bits``-wide codes one int32 word holds (16 at 2 bits, 8 at 4 bits)."""
    return 32 // bits


@dataclass(frozen=True)
class MiniKVConfig:
    """Configuration of the compressed KV cache.

    bits: 2 or 4 (KIVI-style grouped asymmetric quantization) or 16 (no quantization): the values'
        bit width, and the keys' too when they are given a width of their own (``k_bits``).
    k_bits, v_bits: bit width of keys and of values (2 or 4). ``None``: keys take 4 bits and values
        ``bits`` (keys decide where attention goes: K4 V2 measured best at equal bytes, docs/fidelity.md).
    sink_tokens: the first ``sink_tokens`` tokens of every sequence are never evicted and stay in
        full precision, outside every quantization group (attention sinks).
    clip: per quantization group, pick the clip ratio of ``CLIP_GRID`` that minimises the squared
        reconstruction error (1.0 = plain min-max, so never worse); quantize time only. ``None``:
        on when quantized.
    rotate: a fixed orthonormal rotation (Hadamard with fixed signs) of ``"v"`` values, ``"k"``
        keys or ``"kv"`` both, per head, before quantization; undone exactly in attention.
        ``None``: ``"kv"`` when quantized, else ``"none"``.
    budget: tokens kept per KV head per layer, on average over layers. An ``int`` is a token
        count, a ``float`` in (0, 1] a fraction of each prompt, ``None`` keeps every token. ``"auto"``
        (default): half of each prompt (``BUDGET``), or, where the schedule chooses ``"shared"`` and
        ``q_group_size`` is automatic, 66% of it in quantization groups of 64 (``SHARED_BUDGET``,
        ``SHARED_GROUP``: the same <= 15% of fp16 spent on more tokens; :meth:`for_model`).
    recent: the recent window kept on top of the scored tokens: an ``int`` is a token count,
        a ``float`` in [0, 1] a fraction of the budget (MiniKV's default splits it in halves).
        ``None`` (default): 0.25 of the budget, or 64 tokens where the schedule chooses ``"shared"``
        (a model with one KV head per layer: :meth:`for_model`).
    scorer: (default ``"kvzip"``, with ``schedule="global"`` and ``head_budgets="adaptive"``: the best
        measured on one-question and many-question suites, docs/shared-context.md)
        ``"minikv"`` (cumulative attention of every prompt query, H2O-style),
        ``"snapkv"`` (attention of the last ``snap_window`` queries, smoothed by a 1-D pool),
        ``"a2sf"`` (attention accumulated with forgetting factor ``a2sf_decay``), ``"keynorm"``
        (small key norms first), ``"keydiff"`` (keys least like their head's mean direction first),
        ``"streaming"`` (``sinks`` first tokens + the recent window) or
        ``"kvzip"`` (question-agnostic: the most attention a token receives while the model re-reads
        the prompt after itself, in chunks of ``reconstruct_chunk`` tokens; one more pass at prefill,
        :mod:`minikv.reconstruct`), or ``"kvzip_window"`` (the larger of ``kvzip``'s score and SnapKV's
        window score: a question at the prompt's end is seen too), or ``"expected"`` (Expected Attention:
        the attention a Gaussian fit of the prompt's queries, moved to the next 512 positions, is
        expected to pay; question-agnostic, no pass; far below ``"kvzip"`` on the shared-context suite,
        docs/shared-context.md). See :mod:`minikv.selection`.
    schedule: ``None`` (with a reconstruction scorer and a budget: ``"shared"`` on a model with one KV
        head per layer, ``"global"`` on others (:meth:`for_model`); else ``"uniform"``),
        ``"uniform"``, ``"pyramid"`` (MiniKV's layer-discriminative budget: the scored
        part falls linearly from ``2h - h/delta`` at layer 0 to ``h/delta`` at the last layer) or
        ``"pyramidkv"`` (PyramidKV's integer series with ``pyramid_beta``) or ``"global"`` (with
        ``scorer="kvzip"``: the layers' tokens ranked together, at the uniform schedule's total;
        :func:`minikv.budget.across_layers`) or ``"shared"`` (with ``scorer="kvzip"``: every compressed
        layer and KV head keeps the same tokens, ranked by their best score over the layers and heads,
        the uniform count in whole quantization groups; :func:`minikv.budget.shared_scores`,
        :func:`minikv.budget.shared_counts`).
    head_budgets: ``None`` (``"adaptive"`` with a reconstruction scorer on a quantized store with a budget,
        else ``"uniform"``), ``"uniform"`` (every KV head of a layer keeps the same count) or ``"adaptive"``
        (AdaKV: one ranking over the heads' scored tokens, of one layer with ``schedule="uniform"``, of
        every layer with ``"global"``; each head keeps at least ``head_floor`` times the uniform count,
        at most twice it, in whole quantization groups; the total is the uniform one). Needs a
        quantized store and a scorer whose scores compare across heads.
    crush: fraction of the scored budget given to KVCrush representatives (0 = off, < 1);
        ``crush_anchor`` / ``crush_seed`` pick the Hamming anchor (see :mod:`minikv.selection.kvcrush`).
    q_group_size: quantization group G (keys: G tokens per channel; values: G channels per token);
        ``None`` picks the first of ``AUTO_GROUP_SIZES`` (32, then 16) that divides the model's head_dim
        and ``residual_length``.
    residual_length: R, full-precision tokens buffered at decode before they are quantized.
    residual_dtype: the dtype of the full-precision residual (the sinks and the tokens not yet
        quantized): ``"model"`` (the model's), ``"float16"`` or ``"bfloat16"``; ``None`` (default):
        ``"float16"`` for a float32 model, else the model's (:func:`residual_dtype`).
    tier_share: a precision tier (0 = none): of each KV head's kept prompt tokens (sinks aside), the
        best-scored ``tier_share`` (in [0, 1], rounded down to whole quantization groups) are stored at
        ``tier_bits`` instead of ``k_bits``/``v_bits``; decode reads both in one attention. A sequence
        gives each compressed layer its own share (``1.0``: the layer's whole prompt at ``tier_bits``,
        ``0``: none): a tier by token, by layer, or both. Needs a quantized store and a budget (the
        scores rank the tier). A later turn's kept tokens are tiered the same way, after the tokens held;
        decoded tokens are stored at ``k_bits``/``v_bits``.
        ``None`` (default): a model's calibrated tier by layer (:meth:`for_model`), else none.
    tier_bits: ``(key bits, value bits)`` of the tier, each 2 or 4.
    max_new_tokens: how many new tokens the cache must hold; ``None`` lets ``generate`` size it.
    backend: kernel implementation, ``"auto"`` picks Triton on CUDA when available and the C++ kernels
        on CPU (built on first use; the PyTorch references if they cannot be); ``"reference"``: the
        PyTorch references everywhere.
    """

    bits: int = 2
    k_bits: int | None = None
    v_bits: int | None = None
    sink_tokens: int = 4
    clip: bool | None = None
    rotate: str | None = None
    budget: int | float | str | None = "auto"
    recent: int | float | None = None
    scorer: str = "kvzip"
    snap_window: int = 32
    reconstruct_chunk: int = 512
    reconstruct_prefix: tuple[int, ...] = ()
    pool_kernel: int = 7
    pool: str = "max"
    schedule: str | None = None
    head_budgets: str | None = None
    head_floor: float = 0.25  # = budget.GLOBAL_SPAN[0], the layers' floor: one head per layer ranks as the layers do
    pyramid_delta: float = 7.0
    pyramid_beta: float = 20.0
    a2sf_decay: float = 0.95
    sinks: int = 4
    crush: float = 0.0
    crush_anchor: str = "alternate"
    crush_seed: int = 0
    q_group_size: int | None = None
    residual_length: int = 128
    residual_dtype: str | None = None
    tier_share: float | tuple[float, ...] | None = None
    tier_bits: tuple[int, int] = (4, 4)
    max_new_tokens: int | None = None
    backend: str = "auto"

    def __post_init__(self) -> None:
        self._resolve_auto()
        _check_choice("bits", self.bits, SUPPORTED_BITS)
        for name in ("k_bits", "v_bits"):
            value = getattr(self, name)
            if value is not None:
                _check_choice(name, value, QUANT_BITS)
                if not self.quantized:
                    raise ValueError(
                        f"{name}={value} needs a quantized store: bits=16 stores keys and values "
                        f"unquantized (use bits=2 or 4 with {name})"
                    )
        if self.clip is not None and not isinstance(self.clip, bool):
            raise ValueError(f"clip must be True, False or None (on when quantized), got {self.clip!r}")
        if self.rotate is not None:
            _check_choice("rotate", self.rotate, ROTATIONS)
        if not self.quantized and (self.clip or self.rotate not in (None, "none")):
            raise ValueError(
                "clip and rotate shape the quantizer: they need bits=2 or 4 (bits=16 stores "
                "keys and values unquantized)"
            )
        _check_budget(self.budget)
        if self.recent is not None:
            _check_recent(self.recent, self.budget)
        _check_int("sink_tokens", self.sink_tokens, low=0)
        if isinstance(self.budget, int) and self.sink_tokens > self.budget:
            raise ValueError(
                f"sink_tokens={self.sink_tokens} is larger than budget={self.budget}: "
                f"sink_tokens must be in [0, {self.budget}]"
            )
        _check_choice("scorer", self.scorer, SCORERS)
        _check_choice("schedule", self.schedule, SCHEDULES)
        _check_choice("pool", self.pool, POOLS)
        _check_choice("backend", self.backend, BACKENDS)
        _check_int("snap_window", self.snap_window, low=1)
        _check_int("reconstruct_chunk", self.reconstruct_chunk, low=1)
        if not isinstance(self.reconstruct_prefix, (tuple, list)) or not all(
            isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in self.reconstruct_prefix
        ):
            raise ValueError(
                f"reconstruct_prefix must be a sequence of token ids (ints >= 0), got {self.reconstruct_prefix!r}"
            )
        object.__setattr__(self, "reconstruct_prefix", tuple(self.reconstruct_prefix))
        if self.schedule in ("global", "shared") and self.scorer not in DEFERRED_SCORERS:
            what = "ranks every layer's tokens together" if self.schedule == "global" else "keeps one set of tokens"
            raise ValueError(
                f"schedule={self.schedule!r} {what} once all layers are scored: it needs one of the scorers "
                f"{list(DEFERRED_SCORERS)} (kept after every layer is scored), got scorer={self.scorer!r}"
            )
        self._check_head_budgets()
        _check_int("pool_kernel", self.pool_kernel, low=1)
        if self.pool_kernel % 2 == 0:
            raise ValueError(f"pool_kernel must be odd (got {self.pool_kernel}) so the pool keeps positions")
        if not isinstance(self.pyramid_delta, (int, float)) or self.pyramid_delta < 1:
            raise ValueError(f"pyramid_delta must be a number >= 1, got {self.pyramid_delta!r}")
        if not isinstance(self.pyramid_beta, (int, float)) or self.pyramid_beta < 1:
            raise ValueError(f"pyramid_beta must be a number >= 1, got {self.pyramid_beta!r}")
        if (
            isinstance(self.a2sf_decay, bool)
            or not isinstance(self.a2sf_decay, (int, float))
            or not 0.0 < self.a2sf_decay <= 1.0
        ):
            raise ValueError(f"a2sf_decay must be in (0, 1], got {self.a2sf_decay!r}")
        _check_int("sinks", self.sinks, low=0)
        if isinstance(self.crush, bool) or not isinstance(self.crush, (int, float)) or not 0.0 <= self.crush < 1.0:
            raise ValueError(f"crush (the KVCrush share of the scored budget) must be in [0, 1), got {self.crush!r}")
        _check_choice("crush_anchor", self.crush_anchor, CRUSH_ANCHORS)
        _check_int("crush_seed", self.crush_seed, low=0)
        if self.scorer == "streaming" and isinstance(self.budget, int) and self.sinks > self.budget:
            raise ValueError(
                f"sinks={self.sinks} is larger than budget={self.budget}: the sinks must fit in the budget"
            )
        if self.q_group_size is not None:
            _check_int("q_group_size", self.q_group_size, low=1)
        _check_int("residual_length", self.residual_length, low=1)
        if self.residual_dtype is not None:
            _check_choice("residual_dtype", self.residual_dtype, RESIDUAL_DTYPES)
        self._check_tier()
        if self.max_new_tokens is not None:
            _check_int("max_new_tokens", self.max_new_tokens, low=0)
        if self.quantized and self.q_group_size is not None:
            bits = self.narrowest_bits
            per_word = codes_per_word(bits)
            if self.q_group_size % per_word:
                raise ValueError(
                    f"q_group_size must be a multiple of {per_word} (the {bits}-bit codes packed in one "
                    f"int32 word), got {self.q_group_size}"
                )
        if self.quantized:
            group = self.q_group_size or AUTO_GROUP_SIZES[-1]  # auto: at least the smallest must fit
            if self.residual_length % group:
                raise ValueError(
                    f"residual_length must be a multiple of q_group_size={group}, got {self.residual_length}"
                )

    def _check_tier(self) -> None:
        share, widths = self.tier_share, self.tier_bits
        shares = tuple(share) if isinstance(share, (tuple, list)) else (share,)
        if not shares or any(
            isinstance(x, bool) or not isinstance(x, (int, float)) or not 0.0 <= x <= 1.0 for x in shares
        ):
            raise ValueError(
                "tier_share (the kept tokens' share in the precision tier) must be in [0, 1], or a sequence of "
                f"such shares, one per compressed layer; got {share!r}"
            )
        if isinstance(share, list):
            object.__setattr__(self, "tier_share", tuple(share))
        if (
            not isinstance(widths, (tuple, list))
            or len(widths) != 2
            or any(isinstance(b, bool) or b not in QUANT_BITS for b in widths)
        ):
            raise ValueError(
                f"tier_bits must be (key bits, value bits), each one of {list(QUANT_BITS)}, got {widths!r}"
            )
        object.__setattr__(self, "tier_bits", tuple(widths))
        if any(shares) and not (self.quantized and self.budget is not None):
            raise ValueError(
                f"tier_share={share} needs a quantized store (bits=2 or 4) and a budget (the scores rank the "
                f"tier); got bits={self.bits}, budget={self.budget}"
            )

    def _check_head_budgets(self) -> None:
        _check_choice("head_budgets", self.head_budgets, HEAD_BUDGETS)
        floor = self.head_floor
        if isinstance(floor, bool) or not isinstance(floor, (int, float)) or not 0.0 <= floor <= 1.0:
            raise ValueError(f"head_floor (a head's least share of the uniform count) must be in [0, 1], got {floor!r}")
        if self.head_budgets == "uniform":
            return
        needs = {
            "a quantized store (bits=2 or 4)": self.quantized,
            "a budget": self.budget is not None,
            "schedule='uniform' or 'global'": self.schedule in ("uniform", "global"),
            "a scorer other than 'streaming' (no scores to rank)": self.scorer != "streaming",
            "crush=0": not self.crush,
        }
        missing = [what for what, ok in needs.items() if not ok]
        if missing:
            raise ValueError(
                f"head_budgets='adaptive' (per-head counts) needs {', '.join(missing)}; got bits={self.bits}, "
                f"budget={self.budget}, schedule={self.schedule!r}, scorer={self.scorer!r}, crush={self.crush}"
            )

    @property
    def quantized(self) -> bool:
        return self.bits < 16

    @property
    def narrowest_bits(self) -> int:
        """The narrowest stored code (keys, values, the tier's): what a quantization group must pack."""
        return min(self.key_bits, self.value_bits, *(self.tier_bits if self.tiered else ()))

    @property
    def tiered(self) -> bool:
        """Whether any layer has a precision tier."""
        share = self.tier_share
        return any(share) if isinstance(share, tuple) else share > 0

    def tier_share_of(self, rank: int, num_compressed: int) -> float:
        """The tier share of compressed layer ``rank`` of ``num_compressed``."""
        share = self.tier_share
        if not isinstance(share, tuple):
            return share
        if len(share) != num_compressed:
            raise ValueError(
                f"tier_share has {len(share)} shares but the model has {num_compressed} compressed layers: give one "
                f"share per compressed layer, or one share for all"
            )
        return share[rank]

    @property
    def key_bits(self) -> int:
        """Bit width of the stored keys: ``k_bits``, else 4 when quantized (16 when not)."""
        return self.k_bits if self.k_bits is not None else (4 if self.quantized else self.bits)

    @property
    def value_bits(self) -> int:
        """Bit width of the stored values: ``v_bits``, else ``bits``."""
        return self.v_bits if self.v_bits is not None else self.bits

    @property
    def clips(self) -> bool:
        """Whether quantization scales are clipped (``clip``, else on when quantized)."""
        return self.clip if self.clip is not None else self.quantized

    @property
    def rotation(self) -> str:
        """What is rotated before quantization (``rotate``, else ``"kv"`` when quantized)."""
        return self.rotate if self.rotate is not None else ("kv" if self.quantized else "none")

    @property
    def selects(self) -> bool:
        return self.budget is not None

    def _resolve_auto(self) -> None:
        """``schedule=None`` / ``head_budgets=None`` (the defaults): what measured best for the scorer. With
        a reconstruction scorer on a quantized store with a budget, every layer's and head's tokens ranked
        together (``"global"``, ``"adaptive"``: docs/shared-context.md); otherwise ``"uniform"``. The knobs
        left to choose themselves are remembered, so :meth:`replace` chooses them again."""
        auto = frozenset(n for n in ("schedule", "head_budgets", "recent", "tier_share") if getattr(self, n) is None)
        if "tier_share" in auto:  # no tier, unless the model has a calibration (:meth:`for_model`)
            object.__setattr__(self, "tier_share", 0.0)
        if isinstance(self.budget, str) and self.budget == "auto":
            auto |= {"budget"}
            object.__setattr__(self, "budget", BUDGET)
        object.__setattr__(self, "_auto", auto)
        if "recent" in auto:
            object.__setattr__(self, "recent", RECENT)
        # Expected Attention ranks better per layer (SmolLM2's shared-context suite, 10 samples: 0.168 per
        # layer, 0.060 ranked together; docs/shared-context.md): ranked together only when asked
        ranked = self.scorer in PASS_SCORERS and self.budget is not None
        if "schedule" in auto:
            object.__setattr__(self, "schedule", "global" if ranked else "uniform")
        if "head_budgets" in auto:
            fits = ranked and self.bits in QUANT_BITS and not self.crush
            object.__setattr__(
                self, "head_budgets", "adaptive" if fits and self.schedule in ("uniform", "global") else "uniform"
            )

    def replace(self, **changes) -> "MiniKVConfig":
        """This configuration with ``changes``; knobs left to their automatic choice choose again."""
        current = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        current.update({name: "auto" if name == "budget" else None for name in getattr(self, "_auto", ())})
        return MiniKVConfig(**{**current, **changes})

    def for_model(
        self, kv_heads: int, head_dim: int | None = None, tier_layers: tuple[int, ...] | None = None, layers: int = 0
    ) -> "MiniKVConfig":
        """This configuration for a model with ``kv_heads`` KV heads per layer: ``schedule=None`` (``"global"``
        with per-head budgets) becomes ``"shared"`` with one KV head (per-head budgets have nothing to rank,
        and each layer's scores see a different part of a fact: Gemma 3 270M keeps 0.737 of the full
        cache's 0.920 over five questions with ``"shared"``, 0.382 with ``"global"``; SmolLM2, 3 KV heads,
        0.620 with ``"global"`` and per-head budgets, 0.435 with ``"shared"``: docs/shared-context.md);
        with it ``recent=None`` keeps a 64-token recent window (Gemma 3 over five questions, 30 samples:
        0.762 against 0.736 with 32 tokens and 0.687 with 25% of the budget; single-turn suite 0.596
        against 0.583 and 0.576); ``budget="auto"`` with an automatic ``q_group_size`` keeps 66% of the
        tokens in groups of 64 where ``head_dim`` allows (the same bytes as 58% in groups of 32; Gemma 3
        over five questions, 30 samples: 0.810 = 94.4% of full at 14.8% of fp16 against 0.762 keeping
        50% in groups of 32 at 12.9%; SmolLM2 under ``"global"`` is better off with 50% in groups of 32:
        0.593 against 0.584).

        ``tier_share=None`` with a quantized store and a budget: the compressed layers ``tier_layers`` (of
        ``layers``; a model's calibration, :mod:`minikv.calibration`) hold their kept prompt at ``tier_bits``,
        the others none (SmolLM2 over five questions, 100 samples: docs/shared-context.md). Call it before
        :meth:`for_head_dim`."""
        cfg, auto = self, getattr(self, "_auto", ())
        if "schedule" in auto and self.schedule == "global" and kv_heads == 1:
            changes = dict(schedule="shared")
            if "recent" in auto:
                changes["recent"] = min(SHARED_RECENT, self.budget) if isinstance(self.budget, int) else SHARED_RECENT
            grouped = self.quantized and self.q_group_size is None and head_dim is not None
            if "budget" in auto and grouped and self._group_fits(head_dim, SHARED_GROUP):
                changes.update(budget=SHARED_BUDGET, q_group_size=SHARED_GROUP)
            cfg = self.replace(**changes)
        if "tier_share" in auto and tier_layers and self.quantized and self.selects:
            cfg = cfg.replace(tier_share=tuple(1.0 if i in tier_layers else 0.0 for i in range(layers)))
        return cfg

    def _group_fits(self, head_dim: int, group: int) -> bool:
        """Whether groups of ``group`` tile ``head_dim`` channels, whole packed words and ``residual_length``."""
        per_word = codes_per_word(self.narrowest_bits) if self.quantized else 1
        return head_dim % group == 0 and group % per_word == 0 and self.residual_length % group == 0

    def for_head_dim(self, head_dim: int) -> "MiniKVConfig":
        """This configuration with a concrete group size for ``head_dim``; raises if nothing fits."""
        cfg = self
        if self.q_group_size is None:
            per_word = codes_per_word(self.narrowest_bits) if self.quantized else 1
            fits = [g for g in AUTO_GROUP_SIZES if self._group_fits(head_dim, g)]
            if self.quantized and not fits:
                raise ValueError(
                    f"no automatic q_group_size in {list(AUTO_GROUP_SIZES)} divides the model's "
                    f"head_dim={head_dim}: pass q_group_size (a divisor of {head_dim} that is a "
                    f"multiple of {per_word})"
                )
            cfg = self.replace(q_group_size=fits[0] if fits else AUTO_GROUP_SIZES[0])
        cfg.check_head_dim(head_dim)
        return cfg

    def check_head_dim(self, head_dim: int) -> None:
        """Raise if the group size cannot tile a head of ``head_dim`` channels. (Any head a group tiles is
        even, which is all the rotation needs: its Hadamard blocks are the largest power of two dividing it.)"""
        if self.quantized and self.q_group_size is not None and head_dim % self.q_group_size:
            per_word = codes_per_word(self.narrowest_bits)
            raise ValueError(
                f"q_group_size={self.q_group_size} must divide the model's head_dim={head_dim} "
                f"(valid: divisors of {head_dim} that are multiples of {per_word})"
            )


def residual_dtype(choice: str | None, model_dtype: torch.dtype) -> torch.dtype:
    """The residual's dtype for ``residual_dtype=choice`` on a model computing in ``model_dtype``."""
    if choice is None:
        return torch.float16 if model_dtype == torch.float32 else model_dtype
    return model_dtype if choice == "model" else getattr(torch, choice)


def _check_choice(name, value, choices) -> None:
    if isinstance(value, bool) or value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")


def _check_int(name, value, low) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")


def _check_budget(budget) -> None:
    if budget is None:
        return
    if isinstance(budget, bool):
        raise ValueError(f"budget must be an int >= 1, a float in (0, 1], None or 'auto', got {budget!r}")
    if isinstance(budget, int):
        if budget < 1:
            raise ValueError(f"budget must be at least 1 token (an int >= 1), got {budget}")
    elif isinstance(budget, float):
        if not 0.0 < budget <= 1.0:
            raise ValueError(f"budget as a fraction of the prompt must be in (0, 1], got {budget}")
    else:
        raise ValueError(f"budget must be an int >= 1, a float in (0, 1], None or 'auto', got {budget!r}")


BUDGET = 0.5  # budget="auto": half of each prompt
SHARED_BUDGET, SHARED_GROUP = 0.66, 64  # budget="auto" under the automatic "shared" schedule (for_model)
RECENT = 0.25  # recent=None: a quarter of the budget (the scored tokens hold the rest)
SHARED_RECENT = 64  # recent=None under the automatic "shared" schedule (one KV head per layer)


def _check_recent(recent, budget) -> None:
    if isinstance(recent, bool) or not isinstance(recent, (int, float)):
        raise ValueError(f"recent must be an int >= 0 or a float in [0, 1], got {recent!r}")
    if isinstance(recent, int):
        if recent < 0:
            raise ValueError(f"recent must be >= 0 tokens, got {recent}")
        if isinstance(budget, int) and recent > budget:
            raise ValueError(f"recent={recent} is larger than budget={budget}: the window must fit in the budget")
    elif not 0.0 <= recent <= 1.0:
        raise ValueError(f"recent as a fraction of the budget must be in [0, 1], got {recent}")


# Named recipes. "paper": MiniKV as published (arXiv 2411.18077): 2 bits, G 16, R 128, cumulative
# (H2O) scores, 25% heavy + 25% recent, the pyramid schedule; none of the fidelity knobs. "kvzip": the
# defaults' quantizer and budget with the question-agnostic reconstruction scorer and the layers ranked
# together (docs/shared-context.md: SmolLM2 keeps 72% of the full cache over five questions on one
# compressed document where the defaults keep 15%, and 80.3% of it on the single-turn suite vs 61.6%).
PRESETS = {
    "paper": dict(
        bits=2,
        k_bits=2,
        v_bits=2,
        q_group_size=16,
        residual_length=128,
        budget=0.5,
        recent=0.5,
        scorer="minikv",
        schedule="pyramid",
        sink_tokens=0,
        clip=False,
        rotate="none",
        tier_share=0.0,
    ),
    # the question-aware selection the defaults were before issue 20: SnapKV's window (holding the
    # question when it ends the prompt), every layer and head the same count
    "snapkv": dict(scorer="snapkv", schedule="uniform", head_budgets="uniform", tier_share=0.0),
    "kvzip": dict(scorer="kvzip", schedule="global", head_budgets="adaptive"),  # the defaults, named
}


def from_preset(name: str, **overrides) -> MiniKVConfig:
    """The configuration of preset ``name`` (see ``PRESETS``), with ``overrides`` applied on top."""
    if name not in PRESETS:
        raise ValueError(f"preset must be one of {list(PRESETS)}, got {name!r}")
    base = dict(PRESETS[name])
    if "bits" in overrides:  # the preset's key / value widths follow a new `bits` unless given too
        for key in ("k_bits", "v_bits"):
            if base.get(key) is not None:
                base[key] = None if overrides["bits"] == 16 else overrides["bits"]
    return MiniKVConfig(**{**base, **overrides})


UNSET = object()  # a knob the caller did not give: the preset's or MiniKVConfig's default applies


def build_config(
    bits=None, budget=UNSET, preset: str | None = None, config: MiniKVConfig | None = None, **knobs
) -> MiniKVConfig:
    """The configuration ``patch`` uses: ``config`` as given, or ``preset`` / the defaults plus the knobs given."""
    if bits is not None:
        knobs["bits"] = bits
    if budget is not UNSET:
        knobs["budget"] = budget
    if config is not None:
        if knobs or preset is not None:
            raise ValueError(f"pass either config= or knobs / preset=, not both (got config and {sorted(knobs)})")
        return config
    return from_preset(preset, **knobs) if preset is not None else MiniKVConfig(**knobs)

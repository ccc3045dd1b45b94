"""Every knob of minikv in one validated dataclass.

Names follow HF's quantized cache where they mean the same thing (``q_group_size``,
``residual_length``); ``bits`` is the bit width (16 = no quantization).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

SUPPORTED_BITS = (2, 4, 16)
SCORERS = ("minikv", "snapkv", "a2sf", "keynorm", "streaming")
SCHEDULES = ("uniform", "pyramid", "pyramidkv")
CRUSH_ANCHORS = ("alternate", "zeros", "ones", "mean", "random")
POOLS = ("max", "avg")
GQA_REDUCTIONS = ("mean", "max")
BACKENDS = ("auto", "reference", "triton")


def codes_per_word(bits: int) -> int:
    """How many ``bits``-wide codes one int32 word holds (16 at 2 bits, 8 at 4 bits)."""
    return 32 // bits


@dataclass(frozen=True)
class MiniKVConfig:
    """Configuration of the compressed KV cache.

    bits: 2 or 4 (KIVI-style grouped asymmetric quantization) or 16 (no quantization).
    budget: tokens kept per KV head per layer, on average over layers. An ``int`` is a token
        count, a ``float`` in (0, 1] a fraction of each prompt, ``None`` keeps every token.
    recent: the recent window kept on top of the scored tokens: an ``int`` is a token count,
        a ``float`` in [0, 1] a fraction of the budget (MiniKV's default splits it in halves).
    scorer: ``"minikv"`` (cumulative attention of every prompt query, H2O-style),
        ``"snapkv"`` (attention of the last ``snap_window`` queries, smoothed by a 1-D pool),
        ``"a2sf"`` (attention accumulated with forgetting factor ``a2sf_decay``), ``"keynorm"``
        (small key norms first) or ``"streaming"`` (``sinks`` first tokens + the recent window).
        See :mod:`minikv.selection`.
    schedule: ``"uniform"``, ``"pyramid"`` (MiniKV's layer-discriminative budget: the scored
        part falls linearly from ``2h - h/delta`` at layer 0 to ``h/delta`` at the last layer) or
        ``"pyramidkv"`` (PyramidKV's integer series with ``pyramid_beta``).
    crush: fraction of the scored budget given to KVCrush representatives (0 = off, < 1);
        ``crush_anchor`` / ``crush_seed`` pick the Hamming anchor (see :mod:`minikv.selection.kvcrush`).
    q_group_size: quantization group G (keys: G tokens per channel; values: G channels per token).
    residual_length: R, full-precision tokens buffered at decode before they are quantized.
    max_new_tokens: how many new tokens the cache must hold; ``None`` lets ``generate`` size it.
    gqa_reduce: how scores of the query heads of one KV head are combined.
    backend: kernel implementation, ``"auto"`` picks Triton on CUDA when available.
    """

    bits: int = 2
    budget: int | float | None = 0.5
    recent: int | float = 0.5
    scorer: str = "minikv"
    snap_window: int = 32
    pool_kernel: int = 7
    pool: str = "max"
    schedule: str = "uniform"
    pyramid_delta: float = 7.0
    pyramid_beta: float = 20.0
    a2sf_decay: float = 0.95
    sinks: int = 4
    crush: float = 0.0
    crush_anchor: str = "alternate"
    crush_seed: int = 0
    q_group_size: int = 16
    residual_length: int = 128
    max_new_tokens: int | None = None
    gqa_reduce: str = "mean"
    backend: str = "auto"

    def __post_init__(self) -> None:
        _check_choice("bits", self.bits, SUPPORTED_BITS)
        _check_budget(self.budget)
        _check_recent(self.recent, self.budget)
        _check_choice("scorer", self.scorer, SCORERS)
        _check_choice("schedule", self.schedule, SCHEDULES)
        _check_choice("pool", self.pool, POOLS)
        _check_choice("gqa_reduce", self.gqa_reduce, GQA_REDUCTIONS)
        _check_choice("backend", self.backend, BACKENDS)
        _check_int("snap_window", self.snap_window, low=1)
        _check_int("pool_kernel", self.pool_kernel, low=1)
        if self.pool_kernel % 2 == 0:
            raise ValueError(f"pool_kernel must be odd (got {self.pool_kernel}) so the pool keeps positions")
        if not isinstance(self.pyramid_delta, (int, float)) or self.pyramid_delta < 1:
            raise ValueError(f"pyramid_delta must be a number >= 1, got {self.pyramid_delta!r}")
        if not isinstance(self.pyramid_beta, (int, float)) or self.pyramid_beta < 1:
            raise ValueError(f"pyramid_beta must be a number >= 1, got {self.pyramid_beta!r}")
        if isinstance(self.a2sf_decay, bool) or not isinstance(self.a2sf_decay, (int, float)) \
                or not 0.0 < self.a2sf_decay <= 1.0:
            raise ValueError(f"a2sf_decay must be in (0, 1], got {self.a2sf_decay!r}")
        _check_int("sinks", self.sinks, low=0)
        if isinstance(self.crush, bool) or not isinstance(self.crush, (int, float)) or not 0.0 <= self.crush < 1.0:
            raise ValueError(f"crush (the KVCrush share of the scored budget) must be in [0, 1), got {self.crush!r}")
        _check_choice("crush_anchor", self.crush_anchor, CRUSH_ANCHORS)
        _check_int("crush_seed", self.crush_seed, low=0)
        if self.scorer == "streaming" and isinstance(self.budget, int) and self.sinks > self.budget:
            raise ValueError(f"sinks={self.sinks} is larger than budget={self.budget}: the sinks must fit in the budget")
        _check_int("q_group_size", self.q_group_size, low=1)
        _check_int("residual_length", self.residual_length, low=1)
        if self.max_new_tokens is not None:
            _check_int("max_new_tokens", self.max_new_tokens, low=0)
        if self.quantized:
            per_word = codes_per_word(self.bits)
            if self.q_group_size % per_word:
                raise ValueError(
                    f"q_group_size must be a multiple of {per_word} (the {self.bits}-bit codes packed in one "
                    f"int32 word), got {self.q_group_size}"
                )
            if self.residual_length % self.q_group_size:
                raise ValueError(
                    f"residual_length must be a multiple of q_group_size={self.q_group_size}, "
                    f"got {self.residual_length}"
                )

    @property
    def quantized(self) -> bool:
        return self.bits < 16

    @property
    def selects(self) -> bool:
        return self.budget is not None

    def replace(self, **changes) -> "MiniKVConfig":
        return dataclasses.replace(self, **changes)

    def check_head_dim(self, head_dim: int) -> None:
        """Raise if the group size cannot tile a head of ``head_dim`` channels."""
        if self.quantized and head_dim % self.q_group_size:
            raise ValueError(
                f"q_group_size={self.q_group_size} must divide the model's head_dim={head_dim} "
                f"(valid: divisors of {head_dim} that are multiples of {codes_per_word(self.bits)})"
            )


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
        raise ValueError(f"budget must be an int >= 1, a float in (0, 1] or None, got {budget!r}")
    if isinstance(budget, int):
        if budget < 1:
            raise ValueError(f"budget must be at least 1 token (an int >= 1), got {budget}")
    elif isinstance(budget, float):
        if not 0.0 < budget <= 1.0:
            raise ValueError(f"budget as a fraction of the prompt must be in (0, 1], got {budget}")
    else:
        raise ValueError(f"budget must be an int >= 1, a float in (0, 1] or None, got {budget!r}")


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

"""The vLLM backend's knobs: ``MINIKV_VLLM="k_bits=4,v_bits=2,group_size=32,clip=1,rotate=kv"``.

vLLM's ``--kv-cache-dtype`` is a closed list and a general plugin is loaded before any engine
config exists, so the backend reads one environment variable, which vLLM's worker processes inherit:
unset (or ``0``) leaves vLLM untouched; ``1`` turns the backend on with minikv's quantizer defaults
(keys 4 bits, values 2 bits, G 32, clipped scales, keys and values rotated); ``key=value`` pairs
override them. Bad values are refused with the name and the valid range when the plugin loads, at
engine start, before any request.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from ..config import QUANT_BITS, ROTATIONS

ENV = "MINIKV_VLLM"
GROUP_SIZES = (16, 32, 64, 128)
KEY_AXES = ("channel", "token")
VLLM_VERSIONS = ("0.32",)  # the minor versions the backend is written and tested against (customize_spec)


@dataclass(frozen=True)
class Settings:
    """k_bits / v_bits: 2 or 4 (both 16: vLLM's dense layout through the same plumbing, no quantization);
    group_size: G, tokens per key group (per channel) and channels per value group (per token);
    clip: clipped scales (CLIP_GRID) at quantize time; rotate: "none", "k", "v" or "kv";
    keys: "channel" (KIVI: per channel over G tokens, the block's open group in full precision) or
    "token" (per token over G channels, as values: no open group, no residual in the page)."""

    k_bits: int = 4
    v_bits: int = 2
    group_size: int = 32
    clip: bool = True
    rotate: str = "kv"
    keys: str = "channel"

    def __post_init__(self) -> None:
        if (self.k_bits == 16) != (self.v_bits == 16):
            raise ValueError(
                f"{ENV}: k_bits and v_bits are both 16 (no quantization) or both in {list(QUANT_BITS)}, "
                f"got k_bits={self.k_bits}, v_bits={self.v_bits}"
            )
        for name in ("k_bits", "v_bits"):
            value = getattr(self, name)
            if value not in (*QUANT_BITS, 16):
                raise ValueError(f"{ENV}: {name} must be one of {[*QUANT_BITS, 16]}, got {value!r}")
        if self.group_size not in GROUP_SIZES:
            raise ValueError(f"{ENV}: group_size must be one of {list(GROUP_SIZES)}, got {self.group_size!r}")
        if self.rotate not in ROTATIONS:
            raise ValueError(f"{ENV}: rotate must be one of {list(ROTATIONS)}, got {self.rotate!r}")
        if self.keys not in KEY_AXES:
            raise ValueError(f"{ENV}: keys must be one of {list(KEY_AXES)}, got {self.keys!r}")
        if not self.quantized and (self.clip or self.rotate != "none"):
            object.__setattr__(self, "clip", False)  # 16 bits: nothing is quantized, nothing to shape
            object.__setattr__(self, "rotate", "none")

    @property
    def quantized(self) -> bool:
        return self.k_bits != 16

    def check_model(self, head_size: int, block_size: int) -> None:
        """Raise, naming the value and the valid range, if this layer cannot be served."""
        if not self.quantized:
            return
        if head_size % self.group_size:
            valid = [g for g in GROUP_SIZES if head_size % g == 0]
            raise ValueError(
                f"{ENV}: group_size={self.group_size} must divide the model's head_dim={head_size} "
                f"(valid here: {valid})"
            )
        if block_size % self.group_size and self.keys == "channel":
            raise ValueError(
                f"{ENV}: vLLM's block size ({block_size}) must be a multiple of group_size={self.group_size}: "
                f"pass --block-size 256 (or another multiple of {self.group_size}; larger blocks hold more, docs/serving.md)"
            )


_FIELDS = {"k_bits": int, "v_bits": int, "bits": int, "group_size": int, "clip": bool, "rotate": str, "keys": str}


def parse(text: str | None) -> Settings | None:
    """``None`` (off) for an unset / empty / ``0`` variable, defaults for ``1``, else ``key=value`` pairs.
    ``bits=N`` sets both widths."""
    if text is None or text.strip() in ("", "0"):
        return None
    if text.strip() == "1":
        return Settings()
    values: dict = {}
    for item in text.split(","):
        key, sep, raw = item.partition("=")
        key, raw = key.strip(), raw.strip()
        if not sep or key not in _FIELDS:
            raise ValueError(
                f"{ENV}: expected comma-separated key=value pairs with keys in {sorted(_FIELDS)} "
                f"(or 1 for the defaults), got {item.strip()!r}"
            )
        kind = _FIELDS[key]
        try:
            if kind is bool:
                if raw not in ("0", "1", "true", "false"):
                    raise ValueError
                value = raw in ("1", "true")
            else:
                value = kind(raw)
        except ValueError:
            raise ValueError(f"{ENV}: {key} takes {'0 or 1' if kind is bool else kind.__name__}, got {raw!r}") from None
        if key == "bits":
            values["k_bits"] = values["v_bits"] = value
        else:
            values[key] = value
    return Settings(**values)


def current() -> Settings | None:
    return parse(os.environ.get(ENV))

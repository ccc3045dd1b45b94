"""``minikv.generate``: a gpt-fast style decode loop on a patched model.

Prefill runs eagerly (one call, dynamic length); every decode step is the same fixed-shape call —
positions and lengths are tensors, the cache buffers are static — so with ``compile=True`` it is
compiled once with ``fullgraph=True`` and replayed, also for later prompts of the same capacity.
"""

from __future__ import annotations

import functools

import torch

from .cache import MiniKVCache
from .compat import cache_key


def _decode_step(model, cache, tokens, positions):
    logits = model(tokens, position_ids=positions, use_cache=True, **{cache_key(): cache}).logits[:, -1]
    return logits.clone()  # outputs of a CUDA-graph replay are overwritten by the next one


@functools.cache
def _compiled_step(mode: str | None):
    return torch.compile(_decode_step, fullgraph=True, dynamic=False, mode=mode)


@torch.inference_mode()
def generate(
    model,
    input_ids,
    attention_mask=None,
    max_new_tokens: int = 32,
    *,
    compile: bool = False,
    mode: str | None = None,
    cache: MiniKVCache | None = None,
    eos_token_id: int | None = None,
    pad_token_id: int = 0,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Greedy generation with a MiniKV cache; returns ``[B, T + max_new_tokens]`` token ids.

    ``compile=True`` compiles the decode step (``fullgraph=True``; ``mode="reduce-overhead"`` adds
    CUDA graphs on GPU). Pass the same ``cache`` to later calls to reuse its buffers (no
    re-allocation, no recompilation when the capacity is the same). After ``eos_token_id`` a
    sequence emits ``pad_token_id``; the loop itself never synchronises with the host.
    ``chunk_size``: prefill the prompt ``chunk_size`` tokens at a time (activation memory bounded by
    the chunk; each chunk after the first is compressed as a new turn, see :class:`MiniKVCache`);
    left padding must fit in the first chunk.

    >>> model = minikv.patch(model, bits=2, budget=1024)                               # doctest: +SKIP
    >>> out = minikv.generate(model, input_ids, max_new_tokens=64, compile=True)       # doctest: +SKIP
    """
    state = getattr(model, "_minikv_patch", None)
    if state is None:
        raise ValueError("minikv.generate needs a patched model: call minikv.patch(model, ...) first")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1 (or None: one pass), got {chunk_size}")
    B, T = input_ids.shape
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if chunk_size is not None and T > chunk_size and not bool(attention_mask[:, chunk_size:].all()):
        raise ValueError(
            f"left padding longer than chunk_size={chunk_size}: later chunks must hold real tokens "
            f"only; use a larger chunk_size or a batch of prompts of closer lengths"
        )
    if cache is None:
        cache = MiniKVCache(state.config, model.config, max_new_tokens=max_new_tokens)
    else:
        if cache.cfg.max_new_tokens is None or cache.cfg.max_new_tokens < max_new_tokens:
            raise ValueError(
                f"generation is longer than the cache was built for: max_new_tokens={max_new_tokens} > "
                f"the cache's {cache.cfg.max_new_tokens}"
            )
        cache.reset()
    positions = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)  # left padding
    for start in range(0, T, chunk_size or T):
        end = min(start + (chunk_size or T), T)
        logits = model(
            input_ids[:, start:end],
            attention_mask=attention_mask[:, :end],
            position_ids=positions[:, start:end],
            use_cache=True,
            **{cache_key(): cache},
            logits_to_keep=1,
        ).logits[:, -1]
    step = _compiled_step(mode) if compile else _decode_step
    pos = positions[:, -1:]
    tokens = logits.argmax(-1, keepdim=True)
    done = torch.zeros(B, 1, dtype=torch.bool, device=input_ids.device)
    out = [tokens]
    for _ in range(max_new_tokens - 1):
        if eos_token_id is not None:
            done = done | (tokens == eos_token_id)
        pos = pos + 1
        logits = step(model, cache, tokens, pos)
        tokens = logits.argmax(-1, keepdim=True)
        if eos_token_id is not None:
            tokens = torch.where(done, pad_token_id, tokens)
        out.append(tokens)
    return torch.cat([input_ids, *out], dim=1)

"""Log-likelihoods scored *through* a KV cache: prefill + compress a prefix, then score the rest.

lm-eval's stock HF model scores ``context + continuation`` with one forward pass and no cache, so a
compressed cache would change nothing. Here a request ``(context, continuation)`` is split as

    inp    = (context + continuation)[:-1]          (left-truncated to the model's max length)
    prefix = inp[:split]       prefilled into a fresh cache, which compresses it
    rest   = inp[split:]       one more forward pass that attends to the compressed cache

with ``split = len(context) - 1``: the last context token and every continuation token but the
last are fed through the cache, so every continuation token is predicted from the compressed
context (a one-token answer of a multiple-choice question included). When the context is a single
token (``loglikelihood_rolling`` windows), ``split = len(inp) // 2``: the first half of the window is
prefilled (its tokens scored exactly by the prefill) and the second half through the cache.
Positions stay right because the cache reports its logical length.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from ..compat import cache_key


def split_point(n_context: int, n_inp: int) -> int:
    """Tokens of ``inp`` prefilled into the cache (see the module docstring); 0 = nothing to compress."""
    split = n_context - 1 if n_context > 1 else n_inp // 2
    return max(0, min(split, n_inp - 1))


@torch.inference_mode()
def score_group(
    model,
    new_cache: Callable[[int], object],
    forkable: bool,
    context: Sequence[int],
    continuations: Sequence[Sequence[int]],
    max_length: int,
) -> list[tuple[float, bool]]:
    """``(sum of log-probs, greedy?)`` of each continuation after the same ``context``.

    ``new_cache(n_after)`` returns an empty cache that holds ``n_after`` tokens after its prompt. A
    ``forkable`` cache (deep-copyable) is prefilled once per context and copied per continuation.
    """
    longest = max(len(c) for c in continuations)
    shared: dict[int, tuple] = {}  # split -> (prefilled cache, prefix logits)
    results = []
    for cont in continuations:
        full = (list(context) + list(cont))[-(max_length + 1) :]
        inp = torch.tensor([full[:-1]], dtype=torch.long, device=model.device)
        n_ctx = len(full) - len(cont)
        split = split_point(n_ctx, inp.shape[1])
        if split == 0:  # a one-token input: nothing to compress
            logits = model(inp, use_cache=False).logits
        else:
            share = forkable and n_ctx > 1  # the prefix is context only: the same for every continuation
            if share and split in shared:
                cache, head = copy.deepcopy(shared[split][0]), shared[split][1]
            else:
                cache = new_cache(longest if share else inp.shape[1] - split)
                head = model(inp[:, :split], use_cache=True, **{cache_key(): cache}).logits
                if share and len(continuations) > 1:
                    shared[split] = (copy.deepcopy(cache), head)
            tail = model(inp[:, split:], use_cache=True, **{cache_key(): cache}).logits
            logits = torch.cat([head, tail], dim=1)
        logp = F.log_softmax(logits[0, -len(cont) :].double(), dim=-1)
        target = torch.tensor(cont, device=model.device)
        results.append((float(logp.gather(-1, target[:, None]).sum()), bool((logp.argmax(-1) == target).all())))
    return results

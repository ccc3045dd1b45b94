"""Token selection at prefill, as small composable pieces.

A policy is a **scorer** (``MiniKVConfig.scorer``), a **budget schedule** over layers
(``schedule``, :mod:`minikv.budget`) and optionally the **KVCrush** wrapper (``crush > 0``). The base
(:func:`minikv.kernels.reference.select_tokens`, the ``select_tokens`` op) then keeps, per sequence
and KV head, the ``n_recent`` newest tokens plus the best-scored older ones, in temporal order.

Scorers that read attention give per-query weights ``w[q]``; the prefill kernel returns
``C[j] = sum_q w[q] A[q, j]`` summed over each KV head's query group, so one kernel serves them all:

=============  ==========================================================  ====================
scorer         score of token j                                            file
=============  ==========================================================  ====================
``minikv``     cumulative attention of every prompt query (H2O, MiniKV)   ``cumulative.py``
``snapkv``     attention of the last ``snap_window`` queries, 1-D pooled   ``snapkv.py``
``a2sf``       attention decayed by ``a2sf_decay`` per query of age        ``a2sf.py``
``keynorm``    minus the L2 norm of the key (no attention read)            ``keynorm.py``
``keydiff``    minus the key's cosine to the head's mean unit key          ``keydiff.py``
``streaming``  the first ``sinks`` tokens (StreamingLLM; no scores)        ``streaming.py``
``kvzip``      most attention received while the model re-reads the       ``reconstruction.py``
               prompt after itself (question-agnostic; one more pass)
``kvzip_       the larger of ``kvzip``'s and SnapKV's window score         ``reconstruction_window.py``
window``       (mean probability per window query and head)
``expected``   attention a Gaussian fit of the prompt's queries, moved to   ``expected.py``
               the next positions, is expected to pay (no pass)
=============  ==========================================================  ====================
"""

from __future__ import annotations

from . import a2sf, cumulative, expected, keydiff, keynorm, reconstruction, reconstruction_window, snapkv, streaming
from .kvcrush import rescore as crush
from .positions import protect_sinks

SCORERS = {
    "minikv": cumulative,
    "snapkv": snapkv,
    "a2sf": a2sf,
    "keynorm": keynorm,
    "keydiff": keydiff,
    "streaming": streaming,
    "kvzip": reconstruction,
    "kvzip_window": reconstruction_window,
    "expected": expected,
}


def scorer(name: str):
    return SCORERS[name]


def defers(name: str) -> bool:
    """Whether scorer ``name``'s tokens are kept once every layer is scored (the pass's scorers and
    ``expected``): the layers' tokens can then be ranked together (``schedule="global"``)."""
    return needs_pass(name) or getattr(SCORERS[name], "DEFERS", False)


def needs_queries(name: str) -> bool:
    """Whether scorer ``name`` scores from the forward's queries, values and positions."""
    return getattr(SCORERS[name], "NEEDS_QUERIES", False)


def needs_pass(name: str) -> bool:
    """Whether scorer ``name`` scores the prompt by a pass of its own after the prompt (:mod:`minikv.reconstruct`)."""
    return getattr(SCORERS[name], "NEEDS_PASS", False)


__all__ = ["SCORERS", "crush", "defers", "needs_pass", "needs_queries", "protect_sinks", "scorer"]

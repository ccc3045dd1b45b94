"""StreamingLLM: the first ``sinks`` tokens (attention sinks) plus the recent window, no scores.

:func:`minikv.budget.keep_counts` gives this scorer a recent window of ``budget - sinks`` tokens;
the sinks are the only older tokens with a positive score.
"""

from .positions import first_tokens

NEEDS_ATTENTION = False


def scores(k, valid, cfg):
    sink = first_tokens(valid, cfg.sinks)
    B, H = k.shape[:2]
    return sink.float()[:, None, :].expand(B, H, -1)

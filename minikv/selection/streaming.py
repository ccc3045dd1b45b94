"""StreamingLLM: the first ``sinks`` tokens (attention sinks) plus the recent window, no scores.

:func:`minikv.budget.keep_counts` gives this scorer a recent window of ``budget - sinks`` tokens;
the sinks are the only older tokens with a positive score.
"""

NEEDS_ATTENTION = False


def scores(k, valid, cfg):
    rank = valid.cumsum(-1)  # 1 for the first real token (left padding skipped)
    sink = valid & (rank <= cfg.sinks)
    B, H = k.shape[:2]
    return sink.float()[:, None, :].expand(B, H, -1)

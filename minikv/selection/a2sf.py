"""A2SF: accumulated attention with a forgetting factor, ``w[q] = decay ** (age of query q)``.

The newest query weighs 1, the one before it ``a2sf_decay``, ...: early tokens no longer win just
because more queries could see them (the bias of cumulative scores).
"""

import torch

from .positions import rank_from_end

NEEDS_ATTENTION = True


def query_weights(valid, cfg):
    age = rank_from_end(valid) - 1  # 0 for the newest real token
    w = torch.pow(torch.tensor(cfg.a2sf_decay, dtype=torch.float32, device=valid.device), age.float())
    return w * valid


def finish(scores, cfg):
    return scores

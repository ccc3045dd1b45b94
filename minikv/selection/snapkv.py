"""SnapKV: attention of the last ``snap_window`` queries (the observation window), 1-D pooled."""

import torch.nn.functional as F

from .positions import rank_from_end

NEEDS_ATTENTION = True


def query_weights(valid, cfg):
    return (valid & (rank_from_end(valid) <= cfg.snap_window)).float()


def finish(scores, cfg):
    """Max- or average-pool each head's scores along the tokens (kernel ``pool_kernel``, same length;
    1: as they are)."""
    if cfg.pool_kernel == 1:
        return scores
    B, H, T = scores.shape
    pool = F.max_pool1d if cfg.pool == "max" else F.avg_pool1d
    k = cfg.pool_kernel
    return pool(scores.reshape(B * H, 1, T), k, stride=1, padding=k // 2).view(B, H, T)

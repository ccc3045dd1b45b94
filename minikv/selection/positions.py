"""Token positions counted over the real (unpadded) tokens of each sequence."""

import torch


def rank_from_end(valid: torch.Tensor) -> torch.Tensor:
    """``[B, T]``: 1 for the newest real token, 2 for the one before, ...; padding shares its neighbour's."""
    return valid.flip(-1).cumsum(-1).flip(-1)


def first_tokens(valid: torch.Tensor, n: int) -> torch.Tensor:
    """``[B, T]`` bool: the first ``n`` real tokens of each sequence (left padding skipped)."""
    return valid & (valid.cumsum(-1) <= n)


def protect_sinks(scores: torch.Tensor, valid: torch.Tensor, n: int) -> torch.Tensor:
    """Scores ``[B, H, T]`` with the first ``n`` real tokens of each sequence raised to +inf (always kept)."""
    return scores.masked_fill(first_tokens(valid, n)[:, None, :], float("inf"))

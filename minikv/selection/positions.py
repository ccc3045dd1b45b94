"""Token positions counted over the real (unpadded) tokens of each sequence."""

import torch


def rank_from_end(valid: torch.Tensor) -> torch.Tensor:
    """``[B, T]``: 1 for the newest real token, 2 for the one before, ...; padding shares its neighbour's."""
    return valid.flip(-1).cumsum(-1).flip(-1)

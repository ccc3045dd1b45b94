"""KeyDiff: keep the keys least like the others (Park et al., 2025, arXiv 2504.15364); score = minus the
cosine similarity of a token's key to its head's mean normalized key. No attention map, no question:
a question-agnostic score as cheap as the key norm."""

import torch

NEEDS_ATTENTION = False


def scores(k, valid, cfg):
    """``k [B, Hkv, T, D]`` (post-RoPE, as cached), ``valid [B, T]`` -> ``[B, Hkv, T]`` float32."""
    unit = torch.nn.functional.normalize(k.float(), dim=-1)
    anchor = (unit * valid[:, None, :, None]).sum(2, keepdim=True)  # [B, Hkv, 1, D]: the valid keys' mean direction
    return -(unit * torch.nn.functional.normalize(anchor, dim=-1)).sum(-1)

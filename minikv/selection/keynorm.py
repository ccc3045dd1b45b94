"""Key norm: tokens whose keys have a *small* L2 norm are the ones attention concentrates on
(Devoto et al., 2024); score = minus the key norm, no attention map needed."""

NEEDS_ATTENTION = False


def scores(k, valid, cfg):
    """``k [B, Hkv, T, D]`` (post-RoPE, as cached) -> ``[B, Hkv, T]`` float32."""
    return -k.float().norm(dim=-1)

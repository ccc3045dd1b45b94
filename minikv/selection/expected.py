"""Expected Attention: the attention future queries are expected to pay each token, in closed form
(Devoto et al., 2025, arXiv 2510.00636; kvpress's ``ExpectedAttentionPress``). Question-agnostic and
with no extra pass: statistics of the prompt's own queries stand in for the questions to come.

Per query head, the prompt's queries (sinks left out) are taken back to before RoPE
(:func:`minikv.rope.unrotate`), and their mean ``mu`` and covariance ``S`` fitted. A future query sits
at one of the next ``n`` positions; with ``R`` the rotation averaged over them, it is modelled as
Gaussian with mean ``R mu`` and covariance ``R S R^T``, so the expected logit of a key ``k`` (as cached,
rotated) is ``log E[exp(s q.k)] = s (R mu).k + s^2 k^T (R S R^T) k / 2``. The score of a token is the
softmax of that over the prompt's tokens (sinks out), averaged over its KV head's query group, times
the norm of its value. The queries are the attention function's, so a model's query norm (Qwen 3,
Gemma 3) is in them. Memory: one ``D x D`` covariance per query head, never ``T x T``.
"""

from __future__ import annotations

import torch

from .. import rope

NEEDS_ATTENTION = False
NEEDS_QUERIES = True  # scored from the forward's queries, values and positions (:func:`scores_from`)
DEFERS = True  # kept once every layer is scored, so the layers' tokens can be ranked together
FUTURE_POSITIONS = 512  # the positions a future query is averaged over, after the last one (kvpress's default)


def finish(scores, cfg):
    return scores


def _stats(q_pre: torch.Tensor, counted: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean ``[B, H, D]`` and covariance ``[B, H, D, D]`` of ``q_pre [B, H, N, D]`` over ``counted [B, N]``."""
    w = counted.to(q_pre.dtype)[:, None, :, None]
    n = w.sum(2).clamp_min(1.0)  # [B, 1, 1]
    mu = (q_pre * w).sum(2) / n
    centred = (q_pre - mu[:, :, None]) * w
    cov = centred.transpose(-1, -2) @ centred / n[..., None]
    return mu, cov


def scores_from(module, q, k, v, valid, positions, scaling: float, cfg, sinks: int | None = None) -> torch.Tensor:
    """``q [B, Hq, N, D]``, ``k/v [B, Hkv, N, D]`` (rotated, as the attention function gets them),
    ``valid [B, N]``, ``positions [B, N]`` -> ``[B, Hkv, N]`` float32 scores. The first ``sinks`` real tokens
    (``cfg.sink_tokens`` by default: a prompt's; a later turn has none) are left out and score 0."""
    B, Hkv, N, D = k.shape
    group = q.shape[1] // Hkv
    sinks = cfg.sink_tokens if sinks is None else sinks
    past_sinks = valid.cumsum(-1) > sinks  # the first real tokens draw attention whatever comes
    counted = valid & past_sinks
    last = torch.where(valid, positions, positions.new_full((), -1)).amax(-1)  # [B]
    future = last[:, None] + 1 + torch.arange(FUTURE_POSITIONS, device=k.device)[None]
    cos, sin = rope.tables(module, torch.cat([positions.to(future.dtype), future], 1))  # one table, both spans
    (cos, f_cos), (sin, f_sin) = cos.split([N, FUTURE_POSITIONS], 1), sin.split([N, FUTURE_POSITIONS], 1)
    q_pre = rope.unrotate(q.double(), cos[:, None], sin[:, None])  # [B, Hq, N, D]
    mu, cov = _stats(q_pre, counted)
    eye = torch.eye(D, dtype=torch.float64, device=k.device).expand(B, D, D)
    mean_rot = rope.rotate(eye, f_cos.mean(1)[:, None], f_sin.mean(1)[:, None]).transpose(-1, -2)  # [B, D, D]
    mu = torch.einsum("bij,bhj->bhi", mean_rot, mu)
    cov = mean_rot[:, None] @ cov @ mean_rot[:, None].transpose(-1, -2)
    keys = k.double().repeat_interleave(group, 1)  # [B, Hq, N, D]
    logit = scaling * torch.einsum("bhnd,bhd->bhn", keys, mu)
    logit = logit + 0.5 * scaling**2 * ((keys @ cov) * keys).sum(-1)
    logit = logit.masked_fill(~counted[:, None], float("-inf"))
    prob = torch.softmax(logit, -1).nan_to_num(0.0)  # a row with nothing counted: zeros
    prob = prob.view(B, Hkv, group, N).mean(2)
    return (prob * v.double().norm(dim=-1)).float()

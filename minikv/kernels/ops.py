"""The MiniKV custom ops (``torch.library``, namespace ``minikv``): schemas, fakes, dispatch.

Each op's default kernel is the pure-PyTorch reference (any device); faster implementations
register themselves per device with ``<op>.register_kernel(...)``. Mutated arguments are declared
so functionalization and ``torch.compile`` see the writes.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import paged_reference, reference
from .quant import META_DTYPE
from .quant import quantize_pack as _quantize_pack_ref
from .quant import unpack_dequantize as _unpack_dequantize_ref


@torch.library.custom_op("minikv::quantize_pack", mutates_args=())
def quantize_pack(x: Tensor, bits: int, group_size: int, clip: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """Quantize ``x [..., N]`` along the last axis in groups -> ``(codes int32, scale fp16, mn fp16)``."""
    return _quantize_pack_ref(x, bits, group_size, clip)


@quantize_pack.register_fake
def _(x, bits, group_size, clip=False):
    *lead, n = x.shape
    codes = x.new_empty((*lead, n * bits // 32), dtype=torch.int32)
    meta = x.new_empty((*lead, n // group_size), dtype=META_DTYPE)
    return codes, meta, torch.empty_like(meta)


@torch.library.custom_op("minikv::unpack_dequantize", mutates_args=())
def unpack_dequantize(
    codes: Tensor, scale: Tensor, mn: Tensor, bits: int, group_size: int, dtype: torch.dtype
) -> Tensor:
    """Inverse of ``quantize_pack``: ``codes [..., W]`` -> ``[..., W * 32 // bits]`` in ``dtype``."""
    return _unpack_dequantize_ref(codes, scale, mn, bits, group_size, dtype)


@unpack_dequantize.register_fake
def _(codes, scale, mn, bits, group_size, dtype):
    return codes.new_empty((*codes.shape[:-1], codes.shape[-1] * 32 // bits), dtype=dtype)


@torch.library.custom_op("minikv::prefill_attention", mutates_args=())
def prefill_attention(
    q: Tensor, k: Tensor, v: Tensor, valid: Tensor, query_weight: Tensor, scale: float, softcap: float
) -> tuple[Tensor, Tensor]:
    """Causal prompt attention ``[B, Hq, T, D]`` plus per-KV-head weighted column sums ``[B, Hkv, T]``."""
    return reference.prefill_attention(q, k, v, valid, query_weight, scale, softcap)


@prefill_attention.register_fake
def _(q, k, v, valid, query_weight, scale, softcap):
    B, _, T, _ = q.shape
    return q.new_empty(q.shape), q.new_empty((B, k.shape[1], T), dtype=torch.float32)  # contiguous, as the kernels


@torch.library.custom_op("minikv::reconstruct_attention", mutates_args=())
def reconstruct_attention(
    q: Tensor,
    k_ctx: Tensor,
    v_ctx: Tensor,
    ctx_valid: Tensor,
    k_new: Tensor,
    v_new: Tensor,
    q_valid: Tensor,
    scale: float,
    softcap: float,
) -> tuple[Tensor, Tensor]:
    """Attention of new queries over a held context and themselves ``[B, Hq, M, D]``, plus the most
    attention each context token receives from a counted query, per KV head ``[B, Hkv, S]``."""
    return reference.reconstruct_attention(q, k_ctx, v_ctx, ctx_valid, k_new, v_new, q_valid, scale, softcap)


@reconstruct_attention.register_fake
def _(q, k_ctx, v_ctx, ctx_valid, k_new, v_new, q_valid, scale, softcap):
    B, Hkv, S, _ = k_ctx.shape
    return q.new_empty(q.shape), q.new_empty((B, Hkv, S), dtype=torch.float32)


@torch.library.custom_op("minikv::select_tokens", mutates_args=())
def select_tokens(scores: Tensor, valid: Tensor, n_keep: Tensor, n_recent: Tensor, n_max: int) -> Tensor:
    """Kept token positions ``[B, Hkv, n_max]`` (first ``n_keep[b]`` sorted in time)."""
    return reference.select_tokens(scores, valid, n_keep, n_recent, n_max)


@select_tokens.register_fake
def _(scores, valid, n_keep, n_recent, n_max):
    B, H, _ = scores.shape
    return scores.new_empty((B, H, n_max), dtype=torch.int64)


@torch.library.custom_op(
    "minikv::append_kv",
    mutates_args=("k_codes", "k_scale", "k_mn", "v_codes", "v_scale", "v_mn", "n_packed", "res_k", "res_v", "res_len"),
)
def append_kv(
    k_new: Tensor,
    v_new: Tensor,
    k_codes: Tensor,
    k_scale: Tensor,
    k_mn: Tensor,
    v_codes: Tensor,
    v_scale: Tensor,
    v_mn: Tensor,
    n_packed: Tensor,
    res_k: Tensor,
    res_v: Tensor,
    res_len: Tensor,
    n_sink: Tensor,
    k_bits: int,
    v_bits: int,
    group_size: int,
    residual_length: int,
    clip: bool,
) -> None:
    """Append new tokens to the residual and flush full residuals into the packed store, in place."""
    reference.append_kv(
        k_new,
        v_new,
        k_codes,
        k_scale,
        k_mn,
        v_codes,
        v_scale,
        v_mn,
        n_packed,
        res_k,
        res_v,
        res_len,
        n_sink,
        k_bits,
        v_bits,
        group_size,
        residual_length,
        clip,
    )


@append_kv.register_fake
def _(
    k_new,
    v_new,
    k_codes,
    k_scale,
    k_mn,
    v_codes,
    v_scale,
    v_mn,
    n_packed,
    res_k,
    res_v,
    res_len,
    n_sink,
    k_bits,
    v_bits,
    group_size,
    residual_length,
    clip,
):
    return None


@torch.library.custom_op("minikv::decode_attention", mutates_args=())
def decode_attention(
    q: Tensor,
    k_codes: Tensor,
    k_scale: Tensor,
    k_mn: Tensor,
    v_codes: Tensor,
    v_scale: Tensor,
    v_mn: Tensor,
    n_packed: Tensor,
    res_k: Tensor,
    res_v: Tensor,
    res_len: Tensor,
    scale: float,
    softcap: float,
    k_bits: int,
    v_bits: int,
    group_size: int,
    tier_k_codes: Tensor | None = None,
    tier_k_scale: Tensor | None = None,
    tier_k_mn: Tensor | None = None,
    tier_v_codes: Tensor | None = None,
    tier_v_scale: Tensor | None = None,
    tier_v_mn: Tensor | None = None,
    n_tier: Tensor | None = None,
    tier_k_bits: int = 4,
    tier_v_bits: int = 4,
) -> Tensor:
    """One-softmax attention of new queries over ``[tier ; packed store ; residual]`` -> ``[B, Hq, Lq, D]``
    (the tier optional: :func:`minikv.kernels.reference.decode_attention`)."""
    return reference.decode_attention(
        q,
        k_codes,
        k_scale,
        k_mn,
        v_codes,
        v_scale,
        v_mn,
        n_packed,
        res_k,
        res_v,
        res_len,
        scale,
        softcap,
        k_bits,
        v_bits,
        group_size,
        tier_k_codes,
        tier_k_scale,
        tier_k_mn,
        tier_v_codes,
        tier_v_scale,
        tier_v_mn,
        n_tier,
        tier_k_bits,
        tier_v_bits,
    )


@decode_attention.register_fake
def _(q, *args, **kwargs):
    return q.new_empty(q.shape)  # contiguous, as the kernels


@torch.library.custom_op("minikv::paged_attention", mutates_args=())
def paged_attention(
    q: Tensor,
    k_codes: Tensor,
    k_scale: Tensor,
    k_mn: Tensor,
    v_codes: Tensor,
    v_scale: Tensor,
    v_mn: Tensor,
    k_res: Tensor,
    block_table: Tensor,
    seq_lens: Tensor,
    ctx_lens: Tensor,
    scale: float,
    softcap: float,
    k_bits: int,
    v_bits: int,
    group_size: int,
    keys_per_token: bool = False,
) -> tuple[Tensor, Tensor]:
    """New queries ``q [B, Hq, M, D]`` over the first ``ctx_lens`` of each sequence's tokens in vLLM's pages,
    read through ``block_table [B, nb]`` -> ``out [B, Hq, M, D]`` and ``lse [B, Hq, M]`` (:mod:`.paged_reference`)."""
    return paged_reference.paged_attention(
        q,
        k_codes,
        k_scale,
        k_mn,
        v_codes,
        v_scale,
        v_mn,
        k_res,
        block_table,
        seq_lens,
        ctx_lens,
        scale,
        softcap,
        k_bits,
        v_bits,
        group_size,
        keys_per_token,
    )


@paged_attention.register_fake
def _(
    q,
    k_codes,
    k_scale,
    k_mn,
    v_codes,
    v_scale,
    v_mn,
    k_res,
    block_table,
    seq_lens,
    ctx_lens,
    scale,
    softcap,
    k_bits,
    v_bits,
    group_size,
    keys_per_token=False,
):
    return q.new_empty(q.shape), q.new_empty(q.shape[:-1], dtype=torch.float32)


@torch.library.custom_op("minikv::paged_decode_attention", mutates_args=())
def paged_decode_attention(
    q: Tensor,
    k_codes: Tensor,
    k_scale: Tensor,
    k_mn: Tensor,
    v_codes: Tensor,
    v_scale: Tensor,
    v_mn: Tensor,
    k_res: Tensor,
    block_table: Tensor,
    seq_lens: Tensor,
    scale: float,
    softcap: float,
    k_bits: int,
    v_bits: int,
    group_size: int,
    keys_per_token: bool = False,
) -> Tensor:
    """One new query per sequence ``q [B, Hq, D]`` over its tokens in vLLM's pages, read through
    ``block_table [B, nb]`` (:mod:`.paged_reference`) -> ``[B, Hq, D]``."""
    return paged_reference.paged_decode_attention(
        q,
        k_codes,
        k_scale,
        k_mn,
        v_codes,
        v_scale,
        v_mn,
        k_res,
        block_table,
        seq_lens,
        scale,
        softcap,
        k_bits,
        v_bits,
        group_size,
        keys_per_token,
    )


@paged_decode_attention.register_fake
def _(
    q,
    k_codes,
    k_scale,
    k_mn,
    v_codes,
    v_scale,
    v_mn,
    k_res,
    block_table,
    seq_lens,
    scale,
    softcap,
    k_bits,
    v_bits,
    group_size,
    keys_per_token=False,
):
    return q.new_empty(q.shape)

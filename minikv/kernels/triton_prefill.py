"""Triton prompt attention that also returns MiniKV's importance scores, in two launches.

1. ``_prefill_forward_kernel``, grid ``(T / BM, B * Hq)``: a causal flash-attention forward (key blocks
   past the query block are skipped) that writes the output and the fp32 log-sum-exp of every row.
2. ``_prefill_scores_kernel``, grid ``(T / BN, B * Hkv)``: per key block, recompute ``QK^T`` for the
   query blocks at or after it (causal skipping), for every query head of the group, and sum
   ``w[i] * exp(s - lse[i])`` down the columns. Reading the LSE written by *other* programs is why
   this is a second launch (one launch would race).
Memory is linear in the prompt: no T x T buffer exists. ``w`` is the scorer's per-query weight (1 for
every query: MiniKV/H2O; the last window: SnapKV; ``alpha**(T-1-i)``: A2SF).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .triton_decode import _online_update, _softcapped


@triton.jit
def _prefill_forward_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    valid_ptr,
    o_ptr,
    lse_ptr,
    scale,
    softcap,
    T,
    Hq,
    Hkv,
    sqb,
    sqh,
    sqt,
    sqd,
    skb,
    skh,
    skt,
    skd,
    svb,
    svh,
    svt,
    svd,
    D: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    SOFTCAP: tl.constexpr,
    DOT_FP32: tl.constexpr,
):
    mb = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // Hq
    hq = bh % Hq
    hk = hq // (Hq // Hkv)
    rows = mb * BM + tl.arange(0, BM)
    row_ok = rows < T
    d = tl.arange(0, D)
    dot_dtype = tl.float32 if DOT_FP32 else q_ptr.dtype.element_ty
    q = tl.load(q_ptr + b * sqb + hq * sqh + rows[:, None] * sqt + d[None, :] * sqd, mask=row_ok[:, None], other=0.0)
    q = q.to(dot_dtype)
    m = tl.full([BM], float("-inf"), tl.float32)
    l = tl.zeros([BM], tl.float32)
    acc = tl.zeros([BM, D], tl.float32)
    hi = tl.minimum((mb + 1) * BM, T)  # causal: no key after the block's last query
    for n0 in range(0, hi, BN):
        cols = n0 + tl.arange(0, BN)
        col_ok = cols < T
        valid = tl.load(valid_ptr + b * T + cols, mask=col_ok, other=0) != 0
        k = tl.load(
            k_ptr + b * skb + hk * skh + cols[None, :] * skt + d[:, None] * skd, mask=col_ok[None, :], other=0.0
        )
        s = tl.dot(q, k.to(dot_dtype), input_precision="ieee") * scale
        s = _softcapped(s, softcap, SOFTCAP)
        allowed = row_ok[:, None] & (valid & col_ok)[None, :] & (cols[None, :] <= rows[:, None])
        p, alpha, m, l = _online_update(s, allowed, m, l)
        v = tl.load(
            v_ptr + b * svb + hk * svh + cols[:, None] * svt + d[None, :] * svd, mask=col_ok[:, None], other=0.0
        )
        v = tl.where(valid[:, None], v.to(tl.float32), 0.0)  # padding may hold anything, even NaN
        acc = acc * alpha[:, None] + tl.dot(p.to(dot_dtype), v.to(dot_dtype), input_precision="ieee")
    has = l > 0
    out = acc / tl.where(has, l, 1.0)[:, None]
    lse = tl.where(has, m + tl.log(tl.where(has, l, 1.0)), float("-inf"))
    tl.store(o_ptr + (bh * T + rows[:, None]) * D + d[None, :], out.to(o_ptr.dtype.element_ty), mask=row_ok[:, None])
    tl.store(lse_ptr + bh * T + rows, lse, mask=row_ok)


@triton.jit
def _prefill_scores_kernel(
    q_ptr,
    k_ptr,
    valid_ptr,
    w_ptr,
    lse_ptr,
    scores_ptr,
    scale,
    softcap,
    T,
    Hq,
    Hkv,
    sqb,
    sqh,
    sqt,
    sqd,
    skb,
    skh,
    skt,
    skd,
    D: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    SOFTCAP: tl.constexpr,
    DOT_FP32: tl.constexpr,
):
    nb = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // Hkv
    hk = bh % Hkv
    group = Hq // Hkv
    cols = nb * BN + tl.arange(0, BN)
    col_ok = cols < T
    d = tl.arange(0, D)
    dot_dtype = tl.float32 if DOT_FP32 else q_ptr.dtype.element_ty
    valid_col = tl.load(valid_ptr + b * T + cols, mask=col_ok, other=0) != 0
    k = tl.load(k_ptr + b * skb + hk * skh + cols[None, :] * skt + d[:, None] * skd, mask=col_ok[None, :], other=0.0)
    k = k.to(dot_dtype)
    colsum = tl.zeros([BN], tl.float32)
    first = (nb * BN // BM) * BM  # causal: query blocks before this key block see none of it
    for j in range(0, group):
        hq = hk * group + j
        for m0 in range(first, T, BM):
            rows = m0 + tl.arange(0, BM)
            row_ok = rows < T
            q = tl.load(
                q_ptr + b * sqb + hq * sqh + rows[:, None] * sqt + d[None, :] * sqd, mask=row_ok[:, None], other=0.0
            )
            lse = tl.load(lse_ptr + (b * Hq + hq) * T + rows, mask=row_ok, other=float("-inf"))
            w = tl.load(w_ptr + b * T + rows, mask=row_ok, other=0.0)
            w = tl.where(tl.load(valid_ptr + b * T + rows, mask=row_ok, other=0) != 0, w, 0.0)
            s = tl.dot(q.to(dot_dtype), k, input_precision="ieee") * scale
            s = _softcapped(s, softcap, SOFTCAP)
            allowed = (
                (row_ok & (lse > float("-inf")))[:, None]
                & (valid_col & col_ok)[None, :]
                & (cols[None, :] <= rows[:, None])
            )
            p = tl.where(allowed, tl.exp(s - tl.where(lse > float("-inf"), lse, 0.0)[:, None]), 0.0)
            colsum += tl.sum(p * w[:, None], axis=0)
    tl.store(scores_ptr + bh * T + cols, colsum, mask=col_ok)


def prefill_attention(q, k, v, valid, query_weight, scale: float, softcap: float):
    """Triton launcher of ``minikv::prefill_attention`` (same contract as the reference)."""
    B, Hq, T, D = q.shape
    Hkv = k.shape[1]
    BM = BN = 64 if D <= 64 else 32
    out = torch.empty(B, Hq, T, D, dtype=q.dtype, device=q.device)
    lse = torch.empty(B, Hq, T, dtype=torch.float32, device=q.device)
    scores = torch.empty(B, Hkv, T, dtype=torch.float32, device=q.device)
    valid8 = valid.to(torch.int8).contiguous()
    w = query_weight.to(torch.float32).contiguous()
    flags = dict(
        D=D,
        BM=BM,
        BN=BN,
        SOFTCAP=softcap > 0,
        DOT_FP32=q.dtype == torch.float32 or os.environ.get("TRITON_INTERPRET") == "1",
    )
    with torch.device(q.device):
        _prefill_forward_kernel[(triton.cdiv(T, BM), B * Hq)](
            q, k, v, valid8, out, lse, scale, softcap, T, Hq, Hkv, *q.stride(), *k.stride(), *v.stride(), **flags
        )
        _prefill_scores_kernel[(triton.cdiv(T, BN), B * Hkv)](
            q, k, valid8, w, lse, scores, scale, softcap, T, Hq, Hkv, *q.stride(), *k.stride(), **flags, num_stages=2
        )  # 3 stages spill at head_dim 128 on sm_90 (benchmarks/aot_check.py)
    return out, scores

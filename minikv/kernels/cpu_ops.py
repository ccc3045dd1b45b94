"""The ops' CPU kernels: the C++ decode attention and quantizer (:mod:`.native`; the references when
it is not built) and an append that quantizes only when a residual fills.

On CPU a kernel may read the fill levels (host memory: no device to wait for), so the append writes
the new tokens and runs the clip search once per flushed group, instead of the reference's
branch-free flush that re-quantizes every residual at every step. Both give the reference's codes
and buffers exactly (the same quantizer, on the same tokens). Inside ``torch.compile`` the ops stay
opaque, so the branches here never break a graph.
"""

from __future__ import annotations

import torch

from . import native, paged_reference, quant, reference


def quantize_pack(x, bits: int, group_size: int, clip: bool = False):
    if native.available():
        codes, scale, mn = torch.ops.minikv_cpu.quantize_pack(x, quant.clip_table(x.device), bits, group_size, clip)
        return codes, scale, mn
    return quant.quantize_pack(x, bits, group_size, clip)


def reconstruct_attention(q, k_ctx, v_ctx, ctx_valid, k_new, v_new, q_valid, scale: float, softcap: float):
    """:func:`minikv.kernels.reference.reconstruct_attention` from fused attention and its log-sum-exp.

    The output is torch's fused CPU attention over ``[context ; new tokens]`` (which also returns each
    query's log-sum-exp ``lse``); a context token's score is ``exp(max over counted queries and the
    query heads of its KV head of (q . k * scale - lse))``: the largest probability, without forming
    the probabilities (one batched matmul + max per block of ``QUERY_BLOCK`` queries). Soft-capped
    logits, or a torch without that op, take the reference.
    """
    sdpa = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if softcap or sdpa is None:
        return reference.reconstruct_attention(q, k_ctx, v_ctx, ctx_valid, k_new, v_new, q_valid, scale, softcap)
    B, Hq, M, D = q.shape
    Hkv, S = k_ctx.shape[1], k_ctx.shape[2]
    g = Hq // Hkv
    ctx = ctx_valid[:, None, :, None]
    keys = torch.cat([torch.where(ctx, k_ctx.float(), 0.0), k_new.float()], 2)  # [B, Hkv, S + M, D]
    vals = torch.cat([torch.where(ctx, v_ctx.float(), 0.0), v_new.float()], 2)
    causal = torch.ones(M, M, dtype=torch.bool, device=q.device).tril()
    allowed = torch.cat([ctx_valid[:, None, :].expand(B, M, S), causal.expand(B, M, M)], -1)[:, None]
    mask = torch.zeros(allowed.shape, device=q.device).masked_fill_(~allowed, float("-inf"))
    qf = q.float()
    out, lse = sdpa(
        qf, keys.repeat_interleave(g, 1), vals.repeat_interleave(g, 1), 0.0, False, attn_mask=mask, scale=scale
    )
    lse = torch.where(q_valid[:, None, :], lse, float("inf")).reshape(B * Hkv, g, M)  # uncounted queries: -inf below
    qg = qf.reshape(B * Hkv, g, M, D)
    k_t = keys[:, :, :S].reshape(B * Hkv, S, D).transpose(1, 2)
    best = torch.full((B * Hkv, S), float("-inf"), device=q.device)
    for start in range(0, M, reference.QUERY_BLOCK):
        end = min(start + reference.QUERY_BLOCK, M)
        rows = qg[:, :, start:end].reshape(B * Hkv, -1, D)
        log_p = torch.baddbmm(-lse[:, :, start:end].reshape(B * Hkv, -1, 1), rows, k_t, alpha=scale)
        best = torch.maximum(best, log_p.amax(1))
    scores = torch.where(ctx_valid[:, None, :], best.view(B, Hkv, S).exp(), 0.0)
    return out.to(q.dtype), scores


def decode_attention(q, k_codes, k_scale, k_mn, v_codes, v_scale, v_mn, *rest):
    """:func:`minikv.kernels.reference.decode_attention`'s contract; the C++ kernel when the store is in its own layout."""
    args = (q, k_codes, k_scale, k_mn, v_codes, v_scale, v_mn, *rest)
    if native.available() and _packed_as_stored(k_codes, v_codes, k_scale, k_mn, v_scale, v_mn):
        return torch.ops.minikv_cpu.decode_attention(*args)
    return reference.decode_attention(*args)


def paged_decode_attention(
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
    scale: float,
    softcap: float,
    k_bits: int,
    v_bits: int,
    group_size: int,
    keys_per_token: bool = False,
):
    """:func:`minikv.kernels.paged_reference.paged_decode_attention`'s contract: on CPU the pages are copied
    into the store's own layout and read by the C++ decode kernel (here 2.5x faster than the reference,
    which dequantizes every page in fp32; a CPU has no CUDA graph to keep the copy out of). Per-token keys
    (not the store's layout) take the reference."""
    regions = (k_codes, k_scale, k_mn, v_codes, v_scale, v_mn, k_res)
    rest = (scale, softcap, k_bits, v_bits, group_size)
    if keys_per_token:
        return paged_reference.paged_decode_attention(q, *regions, block_table, seq_lens, *rest, True)
    store = paged_reference.gather_store(*regions, block_table, seq_lens, v_bits, group_size)
    s = {name: x.contiguous() for name, x in store.items()}
    n_packed = s["n_packed"][:, None].expand(-1, k_codes.shape[1]).contiguous()  # every head alike
    packed = (s[name] for name in ("k_codes", "k_scale", "k_mn", "v_codes", "v_scale", "v_mn"))
    out = decode_attention(q[:, :, None], *packed, n_packed, s["res_k"], s["res_v"], s["res_len"], *rest)
    return out[:, :, 0]


def attention_with_lse(q, k, v, scale: float, allowed=None, causal: bool = False):
    """``q [B, Hq, M, D]`` over ``k/v [B, Hq, T, D]`` in fp32 by PyTorch's flash attention for CPU, which also
    returns each row's log-sum-exp; ``allowed [B, T]`` masks keys (rows with none: zeros and ``-inf``)."""
    mask = None
    if allowed is not None:
        mask = torch.zeros(allowed.shape, device=q.device).masked_fill(~allowed, float("-inf"))[:, None, None]
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q.float(), k.float(), v.float(), 0.0, causal, attn_mask=mask, scale=scale
    )
    if allowed is not None:
        some = allowed.any(1)[:, None, None]
        out, lse = torch.where(some[..., None], out, 0.0), torch.where(some, lse, float("-inf"))
    return out, lse


def paged_attention(
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
    scale: float,
    softcap: float,
    k_bits: int,
    v_bits: int,
    group_size: int,
    keys_per_token: bool = False,
):
    """:func:`minikv.kernels.paged_reference.paged_attention`'s contract: the pages dequantized once, then
    PyTorch's flash attention for CPU (the reference's blockwise fp32 softmax is several times slower on a
    prefill chunk); soft-capped logits take the reference."""
    args = (q, k_codes, k_scale, k_mn, v_codes, v_scale, v_mn, k_res, block_table, seq_lens)
    if softcap > 0:
        return paged_reference.paged_attention(
            *args, ctx_lens, scale, softcap, k_bits, v_bits, group_size, keys_per_token
        )
    keys, vals, valid = paged_reference.paged_keys_values(*args[1:], k_bits, v_bits, group_size, keys_per_token)
    g = q.shape[1] // keys.shape[1]
    allowed = valid & (torch.arange(valid.shape[1], device=q.device)[None] < ctx_lens.long()[:, None])
    out, lse = attention_with_lse(q, keys.repeat_interleave(g, 1), vals.repeat_interleave(g, 1), scale, allowed)
    return out.to(q.dtype), lse


def _packed_as_stored(*tensors) -> bool:
    """The C++ kernel reads the store's own layout: contiguous int32 codes and fp16 scales and minimums
    (views of another layout, e.g. strided pages, take the reference)."""
    codes, meta = tensors[:2], tensors[2:]
    return (
        all(t.is_contiguous() for t in tensors)
        and all(t.dtype == torch.int32 for t in codes)
        and all(t.dtype == torch.float16 for t in meta)
    )


def append_kv(
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
    k_bits: int,
    v_bits: int,
    group_size: int,
    residual_length: int,
    clip: bool = False,
) -> None:
    """:func:`minikv.kernels.reference.append_kv`, quantizing only the residuals that fill."""
    B, R = res_len.shape[0], residual_length
    rows = torch.arange(B, device=res_len.device)
    top = res_k.shape[2] - 1
    kw = 32 // k_bits
    for i in range(k_new.shape[2]):
        slot = res_len.clamp_max(top)
        res_k[rows, :, slot] = k_new[:, :, i].to(res_k.dtype)  # [B, H, D] at each sequence's fill level
        res_v[rows, :, slot] = v_new[:, :, i].to(res_v.dtype)
        res_len.add_(1)
        full = res_len == n_sink + R
        if not bool(full.any()):  # host memory: no synchronisation on CPU
            continue
        for b in full.nonzero()[:, 0].tolist():
            s = int(n_sink[b])
            if int(n_packed[b].max()) + R > v_codes.shape[2]:
                raise RuntimeError(
                    f"the packed store of sequence {b} is full ({v_codes.shape[2]} tokens): "
                    f"the cache was built for fewer new tokens"
                )
            kc, ks, km = quantize_pack(res_k[b : b + 1, :, s : s + R].transpose(-1, -2), k_bits, group_size, clip)
            vc, vs, vm = quantize_pack(res_v[b : b + 1, :, s : s + R], v_bits, group_size, clip)
            for h, p in enumerate(n_packed[b].tolist()):  # each KV head appends after its own tokens
                g0, g1 = p // group_size, (p + R) // group_size
                k_codes[b, h, :, p // kw : (p + R) // kw] = kc[0, h]
                k_scale[b, h, :, g0:g1], k_mn[b, h, :, g0:g1] = ks[0, h], km[0, h]
                v_codes[b, h, p : p + R] = vc[0, h]
                v_scale[b, h, p : p + R], v_mn[b, h, p : p + R] = vs[0, h], vm[0, h]
            n_packed[b] += R
            res_len[b] = s

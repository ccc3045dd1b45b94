"""Writing tokens into minikv pages and attending over them (no vLLM import; :mod:`.layout`).

Tokens arrive as vLLM hands them to a backend: ``key/value [T, H, D]`` with a ``slot_mapping [T]``
(``block * N + offset``, ``-1`` for padding), each request's tokens contiguous and in order.

- :func:`write` stores any batch (prefills, chunks, decodes); :func:`write_decode` stores a batch of
  decode tokens (one per request) without reading anything back to the host: a CUDA graph may
  capture it.
- :func:`decode` reads each sequence's pages in place through its block table
  (``minikv::paged_decode_attention``: Triton on CUDA; on CPU a copy read by the C++ decode kernel).
- :func:`extend` attends a request's new tokens (a prefill chunk, a later turn) over its stored context,
  read from the pages by the same kernel (``minikv::paged_attention``), and over themselves in full
  precision, merged by their log-sum-exps; :func:`attend` is the first chunk (no context yet).
- :func:`stored`, :func:`gather` / :func:`dense` rebuild the stored tokens (copies: for checks).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..kernels import cpu_ops, ops, paged_reference, reference
from ..rotation import rotate, unrotate
from .layout import PageLayout

REGIONS = ("k_codes", "k_scale", "k_mn", "v_codes", "v_scale", "v_mn", "k_res")  # the paged op's order


def regions(views: dict) -> list[torch.Tensor]:
    """The paged ops' region arguments (per-token keys have no residual: an empty view stands in)."""
    return [views[name] if name in views else views["v_codes"][:, :, :0] for name in REGIONS]


def stored(views: dict, layout: PageLayout, block_table, seq_lens, rot_k=None, rot_v=None):
    """Every sequence's tokens as stored, ``keys/values [B, H, nb*N, D]`` fp32 rotated back (a copy, for
    checks): the paged ops' own reading of the pages (:func:`minikv.kernels.paged_reference.paged_keys_values`)."""
    keys, vals, _ = paged_reference.paged_keys_values(
        *regions(views),
        block_table,
        seq_lens,
        layout.k_bits,
        layout.v_bits,
        layout.group_size,
        layout.keys_per_token,
    )
    return unrotate(keys, rot_k), unrotate(vals, rot_v)


def write(
    views: dict, layout: PageLayout, key, value, slot_mapping, rot_k=None, rot_v=None, clip: bool = False
) -> None:
    """Store ``key/value [T, H, D]`` at ``slot_mapping [T]``, in place."""
    keep = slot_mapping >= 0
    if not bool(keep.all()):
        key, value, slot_mapping = key[keep], value[keep], slot_mapping[keep]
    if slot_mapping.numel() == 0:
        return
    slot = slot_mapping.long()
    block, offset = slot // layout.block_size, slot % layout.block_size
    if not layout.quantized:
        views["k"][block, :, offset] = key.to(layout.dtype)
        views["v"][block, :, offset] = value.to(layout.dtype)
        return
    G = layout.group_size
    key, value = rotate(key.to(layout.dtype), rot_k), rotate(value.to(layout.dtype), rot_v)
    # values: per token, complete at once
    _store_tokens(views, "v", block, offset, *ops.quantize_pack(value, layout.v_bits, G, clip))
    if layout.keys_per_token:  # keys as values: complete at once
        _store_tokens(views, "k", block, offset, *ops.quantize_pack(key, layout.k_bits, G, clip))
        return
    # keys: a group is quantized when its last token arrives, from this call's tokens and the residual
    T = slot.shape[0]
    index = torch.arange(T, device=slot.device)
    in_group = offset % G
    to_end = G - 1 - in_group
    end = (index + to_end).clamp_max(T - 1)
    completed_here = (index + to_end < T) & (slot[end] == slot + to_end)  # the group's last token is in this call
    last = (in_group == G - 1).nonzero().squeeze(-1)  # tokens that complete a group
    if last.numel():
        member = last[:, None] - (G - 1) + torch.arange(G, device=slot.device)[None]  # [n, G] call index
        src = member.clamp_min(0)
        here = (member >= 0) & (slot[src] == slot[last][:, None] - (G - 1) + torch.arange(G, device=slot.device)[None])
        res = views["k_res"][block[last]].transpose(1, 2)  # [n, G, H, D]
        group = torch.where(here[..., None, None], key[src], res)  # [n, G, H, D]
        kc, ks, km = ops.quantize_pack(
            group.permute(0, 2, 3, 1), layout.k_bits, G, clip
        )  # [n, H, D, G*b/32], [n, H, D, 1]
        g = offset[last] // G
        _store_groups(views, block[last], g, kc, ks, km)
    pending = ~completed_here  # the tail of each request's last group waits in the residual
    if bool(pending.any()):
        p = pending.nonzero().squeeze(-1)
        views["k_res"][block[p], :, in_group[p]] = key[p]


def _store_tokens(views: dict, kind: str, block, offset, codes, scale, mn) -> None:
    """Tokens at ``(block, offset) [T]`` quantized per token: codes ``[T, H, W]``, scales/minimums ``[T, H, D/G]``."""
    views[f"{kind}_codes"][block, :, offset] = codes
    views[f"{kind}_scale"][block, :, offset] = scale
    views[f"{kind}_mn"][block, :, offset] = mn


def _store_groups(views: dict, block, g, kc, ks, km) -> None:
    """Group ``g [n]`` of blocks ``block [n]``: codes ``kc [n, H, D, W]``, scales/minimums ``[n, H, D, 1]``
    into the word-major key regions (``k_codes [.., N*kb/32, D]``, ``k_scale/k_mn [.., N/G, D]``)."""
    W = kc.shape[-1]
    words = g[:, None] * W + torch.arange(W, device=g.device)[None]  # [n, W]
    views["k_codes"][block[:, None], :, words] = kc.permute(0, 3, 1, 2)  # advanced dims first: [n, W, H, D]
    views["k_scale"][block, :, g] = ks[..., 0]
    views["k_mn"][block, :, g] = km[..., 0]


def write_decode(
    views: dict, layout: PageLayout, key, value, slot_mapping, rot_k=None, rot_v=None, clip: bool = False
) -> None:
    """Store one decode token per request, ``key/value [T, H, D]`` at ``slot_mapping [T]``, in place, with
    fixed shapes and no host reads. Every key row goes to its block's residual; a token that completes
    its group quantizes the group from the residual. Writes that have no target (a padding slot ``-1``,
    the group codes of a token that completes nothing) go to block 0, vLLM's null block, which no
    sequence reads. Only for quantized layouts."""
    slot = slot_mapping.long()
    slot = torch.where(slot < 0, 0, slot)
    N, G = layout.block_size, layout.group_size
    block, offset = slot // N, slot % N
    key, value = rotate(key.to(layout.dtype), rot_k), rotate(value.to(layout.dtype), rot_v)
    _store_tokens(views, "v", block, offset, *ops.quantize_pack(value, layout.v_bits, G, clip))
    if layout.keys_per_token:
        _store_tokens(views, "k", block, offset, *ops.quantize_pack(key, layout.k_bits, G, clip))
        return
    row = offset % G
    views["k_res"][block, :, row] = key
    done = row == G - 1
    kc, ks, km = ops.quantize_pack(views["k_res"][block].transpose(-1, -2), layout.k_bits, G, clip)  # [T, H, D, W]
    _store_groups(views, torch.where(done, block, 0), torch.where(done, offset // G, 0), kc, ks, km)


def gather(views: dict, layout: PageLayout, block_table, seq_lens) -> dict:
    """The store of each sequence ``block_table [B, nb]`` (int), ``seq_lens [B]``: minikv's packed arrays
    over ``C = nb * N`` tokens, ``n_packed``, the residual ``res_k/res_v [B, H, G, D]``, ``res_len``
    (:func:`minikv.kernels.paged_reference.gather_store`; a copy)."""
    regions = (views[name] for name in REGIONS)
    return paged_reference.gather_store(*regions, block_table, seq_lens, layout.v_bits, layout.group_size)


def dense(store: dict, layout: PageLayout, length: int, rot_k=None, rot_v=None):
    """Keys and values ``[B, H, length, D]`` fp32 as stored (dequantized, rotated back): token ``t`` of a
    sequence is read from the packed groups if ``t < n_packed``, else from the residual."""
    G = layout.group_size
    keys = ops.unpack_dequantize(store["k_codes"], store["k_scale"], store["k_mn"], layout.k_bits, G, torch.float32)
    keys = keys.transpose(-1, -2)[:, :, :length]  # [B, H, L, D]
    vals = ops.unpack_dequantize(store["v_codes"], store["v_scale"], store["v_mn"], layout.v_bits, G, torch.float32)
    vals = vals[:, :, :length]
    t = torch.arange(length, device=keys.device)
    in_res = t[None] >= store["n_packed"][:, None]  # [B, L]
    r = (t[None] - store["n_packed"][:, None]).clamp(0, G - 1)  # residual row of token t
    res_k = store["res_k"].float().gather(2, r[:, None, :, None].expand(-1, keys.shape[1], -1, keys.shape[-1]))
    keys = torch.where(in_res[:, None, :, None], res_k, keys)
    return unrotate(keys, rot_k), unrotate(vals, rot_v)


def decode(
    q, views: dict, layout: PageLayout, block_table, seq_lens, scale: float, softcap: float, rot_k=None, rot_v=None
):
    """One new token per sequence, ``q [B, Hq, D]``, over each whole stored sequence (its own token
    included), read from the pages in place by ``minikv::paged_decode_attention`` -> ``[B, Hq, D]``."""
    out = ops.paged_decode_attention(
        rotate(q, rot_k),
        *regions(views),
        block_table,
        seq_lens,
        scale,
        softcap,
        layout.k_bits,
        layout.v_bits,
        layout.group_size,
        layout.keys_per_token,
    )
    return unrotate(out, rot_v)


def extend(
    q,
    k_new,
    v_new,
    views: dict,
    layout: PageLayout,
    block_table,
    seq_lens,
    scale: float,
    softcap: float,
    rot_k=None,
    rot_v=None,
):
    """A request's ``Lq`` new tokens, ``q [Lq, Hq, D]``, ``k_new/v_new [Lq, H, D]`` (already written, the last
    ``Lq`` of its ``seq_lens [1]`` stored tokens): over the stored tokens before them, read from the pages
    by ``minikv::paged_attention``, and causally over themselves in full precision -> ``[Lq, Hq, D]`` fp32."""
    Lq = q.shape[0]
    out_c, lse_c = ops.paged_attention(
        rotate(q, rot_k).transpose(0, 1)[None],
        *regions(views),
        block_table,
        seq_lens,
        seq_lens - Lq,
        scale,
        softcap,
        layout.k_bits,
        layout.v_bits,
        layout.group_size,
        layout.keys_per_token,
    )
    out_c = unrotate(out_c[0].transpose(0, 1).float(), rot_v)  # [Lq, Hq, D]
    out_n, lse_n = _causal_with_lse(q, k_new, v_new, scale, softcap)
    lse_c = lse_c[0].transpose(0, 1)  # [Lq, Hq]
    top = torch.maximum(lse_c, lse_n)  # finite: every query sees itself
    w_c, w_n = torch.exp(lse_c - top), torch.exp(lse_n - top)
    return (out_c * w_c[..., None] + out_n * w_n[..., None]) / (w_c + w_n)[..., None]


def _causal_with_lse(q, k, v, scale: float, softcap: float):
    """Causal attention of ``q [Lq, Hq, D]`` over ``k/v [Lq, H, D]`` in fp32, ``QUERY_BLOCK`` queries at a time
    -> ``out [Lq, Hq, D]`` and the log-sum-exp of each query's logits ``[Lq, Hq]``."""
    Lq, Hq, D = q.shape
    H = k.shape[1]
    if q.device.type == "cpu" and softcap == 0:  # PyTorch's flash attention for CPU returns the log-sum-exp
        rep = lambda x: x.transpose(0, 1).repeat_interleave(Hq // H, 0)[None]  # noqa: E731  [1, Hq, Lq, D]
        out, lse = cpu_ops.attention_with_lse(q.transpose(0, 1)[None], rep(k), rep(v), scale, causal=True)
        return out[0].transpose(0, 1), lse[0].transpose(0, 1)
    qf = q.float().transpose(0, 1).reshape(H, Hq // H, Lq, D)
    kf, vf = k.float().transpose(0, 1), v.float().transpose(0, 1)  # [H, Lq, D]
    keys = torch.arange(Lq, device=q.device)
    outs, lses = [], []
    for m0 in range(0, Lq, reference.QUERY_BLOCK):
        s = torch.einsum("hgmd,hnd->hgmn", qf[:, :, m0 : m0 + reference.QUERY_BLOCK], kf) * scale
        if softcap > 0:
            s = softcap * torch.tanh(s / softcap)
        rows = torch.arange(m0, m0 + s.shape[2], device=q.device)
        s = s.masked_fill(keys[None] > rows[:, None], float("-inf"))
        lse = torch.logsumexp(s, -1)
        outs.append(torch.einsum("hgmn,hnd->hgmd", torch.exp(s - lse[..., None]), vf))
        lses.append(lse)
    out = torch.cat(outs, 2).reshape(Hq, Lq, D).transpose(0, 1)
    return out, torch.cat(lses, 2).reshape(Hq, Lq).transpose(0, 1)


def attend(q, k_ctx, v_ctx, k_new, v_new, scale: float, softcap: float):
    """Causal attention of ``q [Lq, Hq, D]`` over ``[k_ctx ; k_new]`` (``[Lc, H, D]`` and ``[Lq, H, D]``) in fp32:
    the new tokens see every context token and the new ones up to themselves -> ``[Lq, Hq, D]``."""
    Lq, Hq, D = q.shape
    keys = torch.cat([k_ctx.float(), k_new.float()], 0).transpose(0, 1)  # [H, L, D]
    vals = torch.cat([v_ctx.float(), v_new.float()], 0).transpose(0, 1)
    H, L = keys.shape[0], keys.shape[1]
    qf = q.float().transpose(0, 1)  # [Hq, Lq, D]
    if softcap == 0:  # fused (flash) attention; a causal mask aligned to the last key when there is a context
        mask = (
            None
            if L == Lq
            else torch.arange(L, device=q.device)[None] <= (L - Lq + torch.arange(Lq, device=q.device))[:, None]
        )
        out = F.scaled_dot_product_attention(
            qf[None], keys[None], vals[None], attn_mask=mask, is_causal=mask is None, scale=scale, enable_gqa=Hq != H
        )[0]
        return out.transpose(0, 1)
    # soft-capped logits: the reference's own logits and masked softmax (batch of one)
    allowed = torch.arange(L, device=q.device)[None] <= (L - Lq + torch.arange(Lq, device=q.device))[:, None]  # [Lq, L]
    p = reference._softmax(reference._logits(qf.view(1, H, Hq // H, Lq, D), keys[None], scale, softcap), allowed)
    return torch.einsum("hgmn,hnd->hgmd", p[0], vals).reshape(Hq, Lq, D).transpose(0, 1)

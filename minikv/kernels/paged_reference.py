"""Reference of ``minikv::paged_attention``: new queries over the tokens stored in vLLM's pages.

The pages are the regions of :class:`minikv.vllm.layout.PageLayout`, each a view ``[num_blocks, Hkv, ...]``
of vLLM's cache tensor (any strides): keys ``k_codes [NB, Hkv, N*kb/32, D]`` (word-major),
``k_scale/k_mn [NB, Hkv, N/G, D]``; values ``v_codes [NB, Hkv, N, D*vb/32]``, ``v_scale/v_mn
[NB, Hkv, N, D/G]``; the open key group ``k_res [NB, Hkv, G, D]`` in the model dtype. Sequence ``b``
holds ``seq_lens[b]`` tokens in the blocks ``block_table[b]``; its first ``seq_lens[b] // G * G`` keys are
in complete groups, the rest in the residual of the block that holds them. Rows with ``seq_lens == 0``
(vLLM's padding) give zeros. Shape-static and free of host reads: a CUDA graph may capture it.
"""

from __future__ import annotations

import torch

from .quant import unpack_dequantize
from .reference import QUERY_BLOCK, _logits, _softmax


def _tokens(pages: torch.Tensor, bt: torch.Tensor, token_axis: int) -> torch.Tensor:
    """Region pages ``[NB, H, ...]`` gathered through ``bt [B, nb]`` -> ``[B, H, ...]`` with the blocks
    concatenated along ``token_axis`` (an axis of the page, counted from the page's first axis)."""
    x = pages[bt].movedim(1, 2 + token_axis)  # [B, H, ..., nb, X, ...]: the block axis before the token axis
    return x.flatten(2 + token_axis, 3 + token_axis)


def gather_store(k_codes, k_scale, k_mn, v_codes, v_scale, v_mn, k_res, block_table, seq_lens, v_bits: int, G: int):
    """A copy of each sequence's pages as :class:`minikv.store.QuantizedStore`'s arrays over ``C = nb * N``
    tokens (keys ``[B, H, D, C*kb/32]``, ``[B, H, D, C/G]``; values ``[B, H, C, ...]``), ``n_packed [B]``,
    the open group ``res_k/res_v [B, H, G, D]`` (keys from the page's residual, values dequantized, in the
    residual's dtype) and ``res_len [B]``: what ``minikv::decode_attention`` reads."""
    bt = block_table.long()
    nb, N = bt.shape[1], v_codes.shape[2]
    store = {
        name: _tokens(x, bt, 0).transpose(-1, -2)
        for name, x in (("k_codes", k_codes), ("k_scale", k_scale), ("k_mn", k_mn))
    }
    store.update({name: _tokens(x, bt, 0) for name, x in (("v_codes", v_codes), ("v_scale", v_scale), ("v_mn", v_mn))})
    L = seq_lens.long()
    n_packed = L // G * G
    res_page = bt.gather(1, (n_packed // N).clamp_max(nb - 1)[:, None])[:, 0]  # the block holding the open group
    rows = (n_packed[:, None] + torch.arange(G, device=bt.device)[None]).clamp_max(nb * N - 1)  # [B, G]
    take = lambda x: x.gather(2, rows[:, None, :, None].expand(-1, x.shape[1], -1, x.shape[-1]))  # noqa: E731
    res_v = unpack_dequantize(
        take(store["v_codes"]), take(store["v_scale"]), take(store["v_mn"]), v_bits, G, k_res.dtype
    )
    store.update(n_packed=n_packed, res_k=k_res[res_page], res_v=res_v, res_len=L - n_packed)
    return store


def paged_keys_values(
    k_codes,
    k_scale,
    k_mn,
    v_codes,
    v_scale,
    v_mn,
    k_res,
    block_table,
    seq_lens,
    k_bits: int,
    v_bits: int,
    G: int,
    keys_per_token: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each sequence's keys and values ``[B, Hkv, nb*N, D]`` fp32 as stored, and ``valid [B, nb*N]``
    (token < seq_len); values of invalid tokens are zero (their pages may hold anything). With
    ``keys_per_token`` the keys are laid out as the values and every token is coded (no residual)."""
    bt = block_table.long()
    N = v_codes.shape[2]
    vals = unpack_dequantize(
        _tokens(v_codes, bt, 0), _tokens(v_scale, bt, 0), _tokens(v_mn, bt, 0), v_bits, G, torch.float32
    )
    t = torch.arange(bt.shape[1] * N, device=bt.device)
    valid = t[None] < seq_lens.long()[:, None]  # [B, T]
    vals = torch.where(valid[:, None, :, None], vals, 0.0)
    if keys_per_token:
        keys = unpack_dequantize(
            _tokens(k_codes, bt, 0), _tokens(k_scale, bt, 0), _tokens(k_mn, bt, 0), k_bits, G, torch.float32
        )
        return keys, vals, valid
    kc = _tokens(k_codes, bt, 0).transpose(-1, -2)  # [B, H, D, nb*W]
    ks, km = (_tokens(x, bt, 0).transpose(-1, -2) for x in (k_scale, k_mn))  # [B, H, D, nb*N/G]
    keys = unpack_dequantize(kc, ks, km, k_bits, G, torch.float32).transpose(-1, -2)  # [B, H, nb*N, D]
    n_packed = seq_lens.long() // G * G
    res_page = bt.gather(1, (n_packed // N).clamp_max(bt.shape[1] - 1)[:, None])[:, 0]  # holds the open group
    res = k_res[res_page].float()[:, :, t % G]  # [B, H, T, D]: row t - n_packed of the residual for t >= n_packed
    keys = torch.where((t[None] >= n_packed[:, None])[:, None, :, None], res, keys)
    return keys, vals, valid


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
    """New queries ``q [B, Hq, M, D]`` over the first ``ctx_lens[b]`` of sequence ``b``'s ``seq_lens[b]``
    stored tokens (every query sees all of them) -> ``out [B, Hq, M, D]`` (dtype of q) and the log-sum-exp
    of each query's logits ``lse [B, Hq, M]`` fp32 (``-inf`` over an empty context, whose ``out`` is 0),
    to merge with attention over tokens held elsewhere. Decode: ``M = 1``, ``ctx_lens = seq_lens``.
    Queries are taken ``QUERY_BLOCK`` at a time (memory ``O(QUERY_BLOCK * T)``)."""
    keys, vals, valid = paged_keys_values(
        k_codes,
        k_scale,
        k_mn,
        v_codes,
        v_scale,
        v_mn,
        k_res,
        block_table,
        seq_lens,
        k_bits,
        v_bits,
        group_size,
        keys_per_token,
    )
    B, Hq, M, D = q.shape
    H = keys.shape[1]
    allowed = (valid & (torch.arange(valid.shape[1], device=q.device)[None] < ctx_lens.long()[:, None]))[
        :, None, None, None, :
    ]
    qf = q.float().view(B, H, Hq // H, M, D)
    outs, lses = [], []
    for m0 in range(0, M, QUERY_BLOCK):
        s = _logits(qf[:, :, :, m0 : m0 + QUERY_BLOCK], keys, scale, softcap)  # [B, H, g, m, T]
        lses.append(torch.logsumexp(s.masked_fill(~allowed, float("-inf")), -1))
        outs.append(torch.einsum("bhgmn,bhnd->bhgmd", _softmax(s, allowed), vals))
    out = torch.cat(outs, 3).reshape(B, Hq, M, D).to(q.dtype)
    return out, torch.cat(lses, 3).reshape(B, Hq, M)


def decode_of(attention):
    """The decode op's function from an implementation of ``paged_attention``: ``q [B, Hq, D]``, one new query
    per sequence over all of its stored tokens -> ``[B, Hq, D]`` (``M = 1``, ``ctx_lens = seq_lens``)."""

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
        regions = (k_codes, k_scale, k_mn, v_codes, v_scale, v_mn, k_res)
        out, _ = attention(
            q[:, :, None],
            *regions,
            block_table,
            seq_lens,
            seq_lens,
            scale,
            softcap,
            k_bits,
            v_bits,
            group_size,
            keys_per_token,
        )
        return out[:, :, 0]

    return paged_decode_attention


paged_decode_attention = decode_of(paged_attention)

"""The reconstruction pass: score the tokens a forward has just attended by having the model re-read them.

A scorer with ``NEEDS_PASS`` (``scorer="kvzip"``, :mod:`minikv.selection.reconstruction`) leaves the
tokens of a prompt (or of a new turn) pending in each compressed layer after the forward that attended
them. A forward hook on the patched model's decoder (registered by ``minikv.patch``) then runs the pass
before anything is stored and before the language-model head:

1. the pending tokens are fed again, right after themselves, in chunks of ``reconstruct_chunk`` (each
   chunk preceded by the last ``OVERLAP`` tokens of the one before), through the decoder with a
   :class:`ScoringCache`: a compressed layer's chunk attends to what the layer holds plus the pending
   tokens (full precision) and itself (``minikv::reconstruct_attention``), and keeps, per pending token,
   the most attention a re-read query of its KV head's group gives it; a sliding layer attends to a
   copy of its window. Nothing of a chunk is kept, so memory is bounded by the chunk: never T x T.
2. each layer keeps its budget of the pending tokens by those scores (:meth:`MiniKVCache.commit_pending`).

The forward's output is the unpatched model's: the prompt was attended in full precision before the pass.
"""

from __future__ import annotations

import copy

import torch
from transformers.cache_utils import Cache

from . import heads
from .compat import cache_key
from .kernels import implementation
from .selection import needs_pass
from .view import MiniKVView, StaticLayer

OVERLAP = 8  # tokens of the previous chunk re-read before each chunk (its queries do not count), as KVzip


class ScoringLayer(StaticLayer):
    """A compressed layer during the pass: chunks attend to its context and are never stored."""

    is_sliding = False

    def __init__(self, layer, counted: torch.Tensor):
        super().__init__()
        self.layer, self.counted = layer, counted
        self.is_initialized = True
        self.cumulative_length = layer.cumulative_length

    def lazy_initialization(self, key_states, value_states) -> None:
        pass  # initialized: the layer it scores for holds the context

    def get_max_length(self) -> int:
        return -1

    def update(self, key_states, value_states, *args, **kwargs):
        view = MiniKVView(self, key_states, value_states, turn=True)
        return view, view

    def attend(self, module, query, view: MiniKVView, mask, scaling: float, softcap, fallback: str, **kwargs):
        k_ctx, v_ctx, ctx_valid = self.layer.reconstruction_context()
        impl = implementation(self.layer.cfg.backend, query.device)
        k_new, v_new = view.key.to(k_ctx.dtype), view.value.to(v_ctx.dtype)
        if ctx_valid.dim() == 2:
            out, scores = impl.reconstruct_attention(
                query, k_ctx, v_ctx, ctx_valid, k_new, v_new, self.counted, scaling, softcap or 0.0
            )
        else:  # each KV head holds its own tokens: fold the heads into the batch (:mod:`minikv.heads`)
            B, Hkv = k_ctx.shape[:2]
            out, scores = impl.reconstruct_attention(
                heads.fold_q(query, Hkv),
                heads.fold_kv(k_ctx),
                heads.fold_kv(v_ctx),
                ctx_valid.reshape(B * Hkv, -1),
                heads.fold_kv(k_new),
                heads.fold_kv(v_new),
                heads.fold_rows(self.counted, Hkv),
                scaling,
                softcap or 0.0,
            )
            out, scores = heads.unfold(out, B), heads.unfold(scores, B)
        self.layer.add_scores(scores)
        return out.transpose(1, 2), None


class ScoringCache(Cache):
    """The cache one reconstruction chunk runs with: scoring views of the compressed layers (by
    ``layer.pending``), copies of the others (a sliding window attends to its ring, then forgets)."""

    def __init__(self, cache, counted: torch.Tensor):
        waiting = {id(layer) for layer in pending_layers(cache)}
        layers = [
            ScoringLayer(layer, counted) if id(layer) in waiting else copy.deepcopy(layer) for layer in cache.layers
        ]
        super().__init__(layers=layers)


def pending_layers(cache) -> list:
    """The layers of ``cache`` (any transformers cache) holding tokens that wait for the pass."""
    return [layer for layer in getattr(cache, "layers", ()) if getattr(layer, "pending", None) is not None]


def has_pending(cache) -> bool:
    return bool(pending_layers(cache))


def _real_tokens(x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """``x [B, N, ...]`` with each row's real tokens (``valid [B, N]``) moved to the front, in order."""
    order = torch.argsort((~valid).to(torch.int8), dim=-1, stable=True)
    index = order.view(*order.shape, *([1] * (x.dim() - 2))).expand(*order.shape, *x.shape[2:])
    return x.gather(1, index)


@torch.no_grad()
def score(decoder, cache, tokens: torch.Tensor, last_position: torch.Tensor, chunk: int, prefix=()) -> None:
    """Run the pass over ``tokens`` (ids ``[B, N]`` or embeddings ``[B, N, E]``: what the forward was
    given) for the layers of ``cache`` with pending tokens, then commit them. ``last_position [B]``: the
    position of each sequence's last token; the re-read tokens are placed right after it, each chunk
    after the token ids ``prefix`` (an instruction such as "Repeat the previous context."; its queries
    do not count)."""
    valid = pending_layers(cache)[0].pending.valid  # [B, N]: the same real tokens in every layer
    if valid.shape[1] != tokens.shape[1]:
        raise RuntimeError(f"the reconstruction pass got {tokens.shape[1]} tokens for {valid.shape[1]} pending ones")
    real = _real_tokens(tokens, valid)
    counts = valid.sum(-1)  # [B]
    longest = int(counts.max())
    key = "input_ids" if tokens.dim() == 2 else "inputs_embeds"
    lead = torch.tensor(prefix, dtype=torch.int64, device=tokens.device)[None].expand(tokens.shape[0], -1)
    if tokens.dim() == 3:  # the forward was given embeddings: embed the prefix the same way
        lead = decoder.get_input_embeddings()(lead).to(tokens.dtype)
    for start in range(0, longest, chunk):
        first = max(start - OVERLAP, 0)
        end = min(start + chunk, longest)
        index = torch.arange(first, end, device=tokens.device)
        counted = (index[None] >= start) & (index[None] < counts[:, None])  # [B, m]: chunk queries of real tokens
        piece = real[:, first:end]
        if lead.shape[1]:
            piece = torch.cat([lead, piece], 1)
            counted = torch.cat([counted.new_zeros(counted.shape[0], lead.shape[1]), counted], 1)
        positions = last_position[:, None] + 1 + torch.arange(piece.shape[1], device=tokens.device)[None]
        decoder(**{key: piece}, position_ids=positions, use_cache=True, **{cache_key(): ScoringCache(cache, counted)})
    cache.commit_pending()


def hook(decoder, args, kwargs, output):
    """``register_forward_hook(..., with_kwargs=True)`` on a patched model's decoder: run the pass when
    the forward left tokens pending in its MiniKV cache (or, for a scorer without a pass, keep them)."""
    cache = kwargs.get("cache", kwargs.get("past_key_values"))  # the name changed in transformers 5.24 (compat)
    if cache is None or not has_pending(cache):
        return None
    _run(decoder, args, kwargs, cache)
    return None


def _run(decoder, args, kwargs, cache) -> None:
    cfg = pending_layers(cache)[0].cfg
    if not needs_pass(cfg.scorer):  # scored as the layers attended (scorer="expected"): keep them now
        cache.commit_pending()
        return
    tokens = kwargs.get("input_ids", args[0] if args else None)
    if tokens is None:
        tokens = kwargs.get("inputs_embeds")
    if tokens is None:
        raise ValueError("the reconstruction pass (scorer='kvzip') needs the forward's input_ids or inputs_embeds")
    positions = kwargs.get("position_ids")
    if positions is not None:
        last = positions[:, -1] if positions.dim() == 2 else positions[..., -1].reshape(-1)[: tokens.shape[0]]
        last = last.expand(tokens.shape[0]) if last.numel() == 1 else last
    else:
        cache_position = kwargs.get("cache_position")
        end = cache_position[-1] if cache_position is not None else cache.layers[0].cumulative_length - 1
        last = end.reshape(1).expand(tokens.shape[0])
    score(decoder, cache, tokens, last.to(torch.int64), cfg.reconstruct_chunk, cfg.reconstruct_prefix)


try:  # the pass calls the decoder again: never traced (a compiled prefill runs it eagerly)
    _run = torch.compiler.disable(_run, reason="minikv's reconstruction pass runs eagerly (prefill time)")
except TypeError:  # a torch without ``reason``
    _run = torch.compiler.disable(_run)

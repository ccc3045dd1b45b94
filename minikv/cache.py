"""The MiniKV cache: a transformers ``Cache`` whose full-attention layers compress at prefill.

Prefill (first ``update`` of a layer): the prompt's K/V are returned inside a :class:`MiniKVView`;
the attention function then computes the prompt attention together with the importance scores,
selects the kept tokens per KV head, and writes them into static buffers (2/4-bit packed or
dense). Decode: ``update`` appends the new tokens in place and the attention reads the store.
Sliding-window layers keep their window uncompressed in a static ring (:mod:`minikv.sliding`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache

from . import budget, calibration, heads, rope, selection
from .compat import layer_types_and_kwargs
from .config import MiniKVConfig
from .dense import dense_attention, mask_for, valid_tokens
from .kernels import implementation
from .sliding import SlidingLayer
from .store import DenseStore, QuantizedStore
from .view import MiniKVView, StaticLayer

COMPRESSED_TYPES = ("full_attention",)
EAGER_ONLY = (
    "a MiniKV prefill (the prompt, a new turn or a prefill chunk) runs eagerly: it selects tokens "
    "and sizes buffers on the host. Compile the decode step only: minikv.generate(model, ..., "
    "compile=True), or torch.compile(model.forward) without fullgraph=True (the prefill then runs "
    "eagerly and the decode step compiles)"
)


def eager_only(fn=None, *, reason: str = EAGER_ONLY):
    """``fn`` is never traced: under ``torch.compile`` it runs eagerly (a graph break whose reason
    says what to compile instead; with ``fullgraph=True`` that reason is the error)."""
    if fn is None:
        return lambda f: eager_only(f, reason=reason)
    try:
        return torch.compiler.disable(fn, reason=reason)
    except TypeError:  # a torch without ``reason``
        return torch.compiler.disable(fn)


UNCOMPRESSED_TYPES = {"sliding_attention": SlidingLayer}  # kept whole, in static buffers


@dataclass(frozen=True)
class KVMemory:
    """KV-cache memory of the tokens held. ``ratio = used_bytes / fp16_bytes``."""

    used_bytes: int
    fp16_bytes: int
    allocated_bytes: int

    @property
    def ratio(self) -> float:
        return self.used_bytes / self.fp16_bytes if self.fp16_bytes else 0.0

    @property
    def compression(self) -> float:
        """Fraction of the fp16 cache saved (the paper's "compression ratio")."""
        return 1.0 - self.ratio

    def __str__(self) -> str:
        mib = 2**20
        return (
            f"KV cache {self.used_bytes / mib:.2f} MiB held, {100 * self.ratio:.1f}% of fp16 "
            f"({self.fp16_bytes / mib:.2f} MiB; {100 * self.compression:.1f}% saved), "
            f"{self.allocated_bytes / mib:.2f} MiB allocated"
        )

    def __add__(self, other: "KVMemory") -> "KVMemory":
        return KVMemory(
            *(
                a + b
                for a, b in zip(
                    (self.used_bytes, self.fp16_bytes, self.allocated_bytes),
                    (other.used_bytes, other.fp16_bytes, other.allocated_bytes),
                )
            )
        )


@dataclass
class Pending:
    """Tokens a layer has attended but not stored yet: they wait for the reconstruction pass's
    scores (:mod:`minikv.reconstruct`). ``k/v [B, H, N, D]``, ``valid [B, N]``, ``scores [B, H, N]``
    (max so far); ``room``: tokens to leave room for after a turn (``None``: the prompt)."""

    k: torch.Tensor
    v: torch.Tensor
    valid: torch.Tensor
    scores: torch.Tensor
    room: int | None = None
    context: tuple | None = None  # what a chunk attends to, built once

    @property
    def turn(self) -> bool:
        return self.room is not None


class MiniKVLayer(StaticLayer):
    """One compressed attention layer (``rank`` among ``num_compressed`` compressed layers)."""

    is_sliding = False

    def __init__(self, cfg: MiniKVConfig, rank: int, num_compressed: int, max_cache_len: int | None = None):
        super().__init__()
        self.cfg, self.rank, self.num_compressed = cfg, rank, num_compressed
        self.max_cache_len = max_cache_len
        self.store: QuantizedStore | DenseStore | None = None
        self.cumulative_length = torch.tensor(0, dtype=torch.int64)  # logical tokens, as a tensor
        self._seen = 0  # the same as a Python int, for capacity checks outside compiled code
        self._capacity_tokens = 0
        self._prompt_lengths: torch.Tensor | None = None
        self.requested_len: int | None = None  # tokens a generate call will store, checked at prefill
        self.pending: Pending | None = None  # attended tokens awaiting the reconstruction pass's scores

    # -- transformers CacheLayerMixin -------------------------------------------------------
    def lazy_initialization(self, key_states, value_states) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.batch_size, self.num_heads, _, self.head_dim = key_states.shape

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            return self._begin_prefill(key_states, value_states)
        if self.pending is not None:
            raise RuntimeError(
                "this layer still holds tokens waiting for the reconstruction pass (scorer="
                f"{self.cfg.scorer!r}): the pass runs in a hook minikv.patch puts on the model's "
                "decoder; run the patched model's forward, not its layers"
            )
        Lq = key_states.shape[2]
        if not torch.compiler.is_compiling():
            if Lq > 1 or self.requested_len is not None and self.requested_len > self._capacity_tokens:
                view = MiniKVView(self, key_states, value_states, turn=True)  # compressed in ``attend``
                return view, view
            if self._seen + Lq > self._capacity_tokens:
                raise ValueError(
                    f"generation is longer than the cache was built for: it holds {self._capacity_tokens} tokens "
                    f"(prompt + max_new_tokens), and {self._seen + Lq} were requested; build the cache with a "
                    f"larger max_new_tokens"
                )
            self._seen += Lq
        self.store.append(key_states, value_states)
        self.cumulative_length.add_(Lq)
        view = MiniKVView(self)
        return view, view

    def get_max_length(self) -> int:
        return self._capacity_tokens if self.is_initialized else -1

    def reset(self) -> None:
        """Forget the tokens; the buffers stay, to be reused by a prompt needing the same capacity."""
        self.is_initialized = False
        self._seen = 0
        self.requested_len = None
        self.pending = None

    # -- prefill -----------------------------------------------------------------------------
    def new_token_capacity(self, prompt_len: int) -> int:
        if self.cfg.max_new_tokens is not None:
            return self.cfg.max_new_tokens
        if self.max_cache_len is not None:
            return max(self.max_cache_len - prompt_len, 0)
        if self.requested_len is not None:
            return max(self.requested_len - prompt_len, 0)
        raise ValueError("MiniKVCache needs max_new_tokens (or max_cache_len) to size its buffers")

    def room_after(self, total: int) -> int:
        """Tokens to leave room for after a turn that brings the logical length to ``total``: what
        the running ``generate`` asked for, else the cache's ``max_new_tokens`` / ``max_cache_len``."""
        if self.requested_len is not None and self.requested_len > total:
            room = self.requested_len - total
        elif self.cfg.max_new_tokens is not None:
            room = self.cfg.max_new_tokens
        elif self.max_cache_len is not None:
            room = self.max_cache_len - total
        else:
            room = 0
        room = max(room, 0)
        if self.max_cache_len is not None and total + room > self.max_cache_len:
            raise ValueError(
                f"this turn needs {total + room} tokens (the conversation so far, the new tokens and the "
                f"ones to generate) but the cache was built with max_cache_len={self.max_cache_len}: build it "
                f"with a larger max_cache_len, or without one to let it grow from turn to turn"
            )
        return room

    @eager_only
    def _begin_prefill(self, key_states, value_states):
        T = key_states.shape[2]
        budget.check_prompt(self.cfg, T)
        self.lazy_initialization(key_states, value_states)
        new = self.new_token_capacity(T)
        if self.requested_len is not None and self.requested_len > T + new:
            raise ValueError(
                f"generation is longer than the cache was built for: max_new_tokens={new} fit after this "
                f"{T}-token prompt, generate asks for {self.requested_len - T + 1}; build the cache with a "
                f"larger max_new_tokens"
            )
        kept = budget.capacity(self.cfg, self.rank, self.num_compressed, T)
        store_cls = QuantizedStore if self.cfg.quantized else DenseStore
        shape = (store_cls, self.batch_size, self.num_heads, self.head_dim, kept + new, self.dtype, self.device)
        if self.cfg.quantized:  # the tier: a share of the most a head keeps (sinks aside), and of what
            share = self.cfg.tier_share_of(self.rank, self.num_compressed)
            turns = new if self.max_cache_len is not None else 0  # later turns may bring (max_cache_len)
            shape += (int((kept - min(self.cfg.sink_tokens, kept) + turns) * share), share)
        if self.store is None or getattr(self, "_store_shape", None) != shape:
            self.cumulative_length = torch.zeros((), dtype=torch.int64, device=self.device)
            self._set_store(store_cls(self.cfg, *shape[1:]), shape)
        self.n_max = kept
        self._capacity_tokens = T + new
        self._prompt_T = self._seen = T
        self.cumulative_length.fill_(T)
        self.is_initialized = True
        return MiniKVView(self, key_states, value_states), MiniKVView(self, key_states, value_states)

    def attend(self, module, query, view: MiniKVView, mask, scaling: float, softcap, fallback: str, **kwargs):
        """Attention output ``[B, Lq, Hq, D]`` for this layer: the prompt (attended in full, then
        compressed), a later turn (the same, after the tokens held), or decode (the store reads itself)."""
        if view.turn:
            return self._extend(module, query, view.key, view.value, scaling, softcap, fallback, **kwargs)
        if view.key is not None:
            return self._prefill(module, query, view.key, view.value, mask, scaling, softcap, fallback, **kwargs)
        return self.store.attend(module, query, scaling, softcap, fallback)

    @eager_only
    def _prefill(self, module, q, k, v, mask, scaling, softcap, fallback, **kwargs):
        B, _, T, _ = k.shape
        valid = valid_tokens(mask, B, T, k.device)
        self._prompt_lengths = valid.sum(-1)
        impl = implementation(self.cfg.backend, k.device)
        scorer = selection.scorer(self.cfg.scorer)
        if self.cfg.selects and scorer.NEEDS_ATTENTION:
            weight = scorer.query_weights(valid, self.cfg)
            out, scores = impl.prefill_attention(q, k, v, valid, weight, scaling, softcap or 0.0)
            out, weights = out.transpose(1, 2), None
            if selection.needs_pass(self.cfg.scorer):  # the window's scores, merged with the pass's
                self.pending = Pending(k, v, valid, scorer.seed(scores, q.shape[1] // k.shape[1], self.cfg))
                return out, weights
            scores = scorer.finish(scores, self.cfg)
        else:  # no attention scores needed: compute the prompt exactly as the unpatched model does
            out, weights = dense_attention(module, q, k, v, mask, scaling, softcap, fallback, **kwargs)
            if not self.cfg.selects or selection.needs_pass(self.cfg.scorer):  # scored by the pass that follows
                scores = torch.zeros(B, k.shape[1], T, dtype=torch.float32, device=k.device)
            elif selection.needs_queries(self.cfg.scorer):
                positions = rope.positions(kwargs.get("position_ids"), valid, 0)
                scores = scorer.scores_from(module, q, k, v, valid, positions, scaling, self.cfg)
            else:
                scores = scorer.scores(k, valid, self.cfg)
            if self.cfg.selects and selection.defers(self.cfg.scorer):  # kept once every layer is scored
                self.pending = Pending(k, v, valid, scores)
                return out, weights
        self._keep_prompt(k, v, valid, scores)
        return out, weights

    def _keep_prompt(self, k, v, valid, scores, counts=None) -> None:
        """Select the prompt's kept tokens by ``scores [B, H, T]`` and write them into the store;
        ``counts``: ``(n_keep, n_recent)`` decided across layers, else this layer's schedule."""
        if counts is None and self.cfg.head_budgets == "adaptive":  # AdaKV: this layer's heads ranked together
            counts = budget.across_layers(self.cfg, [scores], valid, self.cfg.q_group_size)[0]
        elif counts is None:
            counts = budget.keep_counts(self.cfg, self.rank, self.num_compressed, self._prompt_lengths)
        n_keep, n_recent = (n.to(k.device) for n in counts)
        impl = implementation(self.cfg.backend, k.device)
        if self.cfg.selects and self.cfg.crush > 0:
            scores = selection.crush(scores, valid, n_keep, n_recent, self.cfg)
        if self.cfg.sink_tokens:
            scores = selection.protect_sinks(scores, valid, self.cfg.sink_tokens)
        idx = impl.select_tokens(scores, valid, n_keep, n_recent, self.n_max)
        index = idx[..., None].expand(-1, -1, -1, k.shape[-1])  # [B, Hkv, n_max, D]
        kept = (torch.arange(self.n_max, device=k.device) < n_keep.view(k.shape[0], -1, 1))[..., None]  # [B, H|1, n, 1]
        zero = torch.zeros((), dtype=k.dtype, device=k.device)  # slots past n_keep[b] hold nothing
        self.store.write_prompt(
            torch.where(kept, k.gather(2, index), zero),
            torch.where(kept, v.gather(2, index), zero),
            n_keep,
            scores.gather(2, idx),  # the kept tokens' scores rank the precision tier
        )

    # -- the reconstruction pass (scorers with NEEDS_PASS) ---------------------------------------
    def reconstruction_context(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(k, v [B, H, S, D], valid)`` a reconstruction chunk attends to: the prompt, or the tokens held
        before a turn followed by the turn's; the pending tokens are the last of them. ``valid`` is
        ``[B, S]``, or ``[B, H, S]`` when the heads hold different tokens (per-head budgets)."""
        p = self.pending
        if p.context is None:
            if p.turn:
                old_k, old_v, old_valid = self.held()
                valid = torch.cat([old_valid, p.valid[:, None].expand(-1, old_valid.shape[1], -1)], 2)
                one = heads.shared(valid)
                p.context = (
                    torch.cat([old_k.to(p.k.dtype), p.k], 2),
                    torch.cat([old_v.to(p.v.dtype), p.v], 2),
                    valid if one is None else one,
                )
            else:
                p.context = (p.k, p.v, p.valid)
        return p.context

    def add_scores(self, scores: torch.Tensor) -> None:
        """Fold a chunk's scores over :meth:`reconstruction_context` into the pending tokens' (max)."""
        p = self.pending
        torch.maximum(p.scores, scores[..., scores.shape[-1] - p.k.shape[2] :], out=p.scores)

    def commit(self, counts=None) -> None:
        """Select and store the pending tokens by their reconstruction scores (after the pass)."""
        p, self.pending = self.pending, None
        if p.turn:
            self._keep_turn(p.k, p.v, p.scores, p.room)
        else:
            self._keep_prompt(p.k, p.v, p.valid, p.scores, counts)

    def held(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(k, v [B, H, S, D], valid [B, H, S])``: every token held, dequantized."""
        return self.store.dense()

    # -- later turns and prefill chunks -----------------------------------------------------
    @eager_only
    def _extend(self, module, q, k, v, scaling, softcap, fallback, **kwargs):
        """Attend ``N`` new tokens over the tokens held and themselves, then keep what the policy
        keeps of the new tokens (scored among themselves, as a prompt would be; the tokens held stay
        as they are) in a store re-allocated to hold them and the generation that follows (a cache
        built with ``max_cache_len`` was sized for all of it at the prompt: same buffers, no recompile)."""
        B, _, N, _ = k.shape
        self._seen = int(self.cumulative_length)  # compiled decode steps do not count in Python: resync (prefill time)
        room = self.room_after(self._seen + N)  # validated before anything changes
        old_k, old_v, held_valid = self.held()
        S, Hkv = old_k.shape[2], old_k.shape[1]
        old_valid = heads.shared(held_valid)  # [B, S], or None: each head holds its own tokens
        keys, values = torch.cat([old_k.to(k.dtype), k], 2), torch.cat([old_v.to(v.dtype), v], 2)
        new_valid = torch.ones(B, N, dtype=torch.bool, device=k.device)
        scorer = selection.scorer(self.cfg.scorer)
        deferred = self.cfg.selects and selection.defers(self.cfg.scorer)
        impl = implementation(self.cfg.backend, k.device)
        if self.cfg.selects and scorer.NEEDS_ATTENTION:  # held tokens as zero-weight queries: one op call
            weight = torch.cat([torch.zeros(B, S, device=k.device), scorer.query_weights(new_valid, self.cfg)], 1)
            q_all = torch.cat([q.new_zeros(*q.shape[:2], S, q.shape[3]), q], 2)
            if old_valid is not None:
                valid = torch.cat([old_valid, new_valid], 1)
                out, scores = impl.prefill_attention(q_all, keys, values, valid, weight, scaling, softcap or 0.0)
            else:  # one call with the KV heads folded into the batch (:mod:`minikv.heads`)
                valid = torch.cat([held_valid, new_valid[:, None].expand(-1, Hkv, -1)], 2).reshape(B * Hkv, -1)
                out, scores = impl.prefill_attention(
                    heads.fold_q(q_all, Hkv),
                    heads.fold_kv(keys),
                    heads.fold_kv(values),
                    valid,
                    heads.fold_rows(weight, Hkv),
                    scaling,
                    softcap or 0.0,
                )
                out, scores = heads.unfold(out, B), heads.unfold(scores, B)
            out, weights = out[:, :, S:].transpose(1, 2), None
            seed = scorer.seed(scores[..., S:], q.shape[1] // Hkv, self.cfg) if deferred else None
            scores = scorer.finish(scores[..., S:], self.cfg)
        else:
            causal = torch.ones(N, N, dtype=torch.bool, device=k.device).tril()
            held_mask = (  # [B, 1, N, S], or per query head when each KV head holds its own tokens
                old_valid[:, None, None, :]
                if old_valid is not None
                else held_valid.repeat_interleave(q.shape[1] // Hkv, 1)[:, :, None, :]
            ).expand(-1, -1, N, -1)
            allowed = torch.cat([held_mask, causal.expand(B, held_mask.shape[1], N, N)], -1)
            out, weights = dense_attention(
                module, q, keys, values, mask_for(allowed, fallback, q.dtype), scaling, softcap, fallback, **kwargs
            )
            if self.cfg.selects and selection.needs_queries(self.cfg.scorer):  # the turn's own queries and tokens
                positions = rope.positions(kwargs.get("position_ids"), new_valid, self._seen)
                scores = scorer.scores_from(module, q, k, v, new_valid, positions, scaling, self.cfg, sinks=0)
            else:
                scores = scorer.scores(k, new_valid, self.cfg) if self.cfg.selects and not deferred else None
            seed = None
            if deferred:  # kept once every layer is scored: the scores so far (none before the pass)
                seed = scores if scores is not None else torch.zeros(B, k.shape[1], N, device=k.device)
        self._seen += N
        self._capacity_tokens = self._seen + room
        self.cumulative_length.add_(N)
        if deferred:  # kept once every layer is scored (after the pass, for its scorers)
            self.pending = Pending(k, v, new_valid, seed.float(), room=room)
        else:
            self._keep_turn(k, v, scores, room)
        return out, weights

    def _keep_turn(self, k, v, scores, room: int) -> None:
        """Keep the policy's share of a turn's ``N`` tokens ``k/v [B, H, N, D]`` by ``scores`` (``None``:
        all of them) after the tokens held, growing the store if it cannot hold them and ``room`` more."""
        B, _, N, _ = k.shape
        if scores is not None:
            new_valid = torch.ones(B, N, dtype=torch.bool, device=k.device)
            impl = implementation(self.cfg.backend, k.device)
            lengths = torch.full((B,), N, dtype=torch.int64, device=k.device)
            cfg = self.cfg.replace(sink_tokens=0)  # the sinks are the conversation's first tokens, held already
            n_keep, n_recent = budget.keep_counts(cfg, self.rank, self.num_compressed, lengths)
            if cfg.crush > 0:
                scores = selection.crush(scores, new_valid, n_keep, n_recent, cfg)
            n = int(n_keep.max())  # every sequence of a turn has N new tokens: all keep n
            idx = impl.select_tokens(scores, new_valid, n_keep, n_recent, n)
            scores = scores.gather(2, idx)  # the kept tokens' scores rank the precision tier
            idx = idx[..., None].expand(-1, -1, -1, k.shape[-1])
            k, v = k.gather(2, idx), v.gather(2, idx)
        store = self.store
        needed = int(store.lengths().max()) + k.shape[2] + room
        tiered = store.tier_tokens(k.shape[2]) if scores is not None and self.cfg.quantized else 0
        tier_needed = store.tier_held() + tiered if tiered else 0
        if self.max_cache_len is None or needed > store.capacity or tiered and tier_needed > store.tier_capacity:
            self._set_store(store.resized(needed, tier_needed), None)  # max_cache_len reserved it all up front
        self.store.extend(k, v, scores)

    def _set_store(self, store, shape: tuple | None) -> None:
        """Use ``store`` (``shape``: the arguments it was built with, for reuse by a later prompt)."""
        self.store, self._store_shape = store, shape
        if not torch.compiler.is_compiling():  # fixed addresses: no recompiles, CUDA graphs can replay
            for t in (*self.store.all_state(), self.cumulative_length):
                torch._dynamo.mark_static_address(t)

    # -- accounting ----------------------------------------------------------------------------
    def tokens_held(self) -> int:
        """Real (unpadded) tokens this layer has seen, summed over the batch (host sync)."""
        if self.store is None:
            return 0
        seen = int(self.cumulative_length)  # the tensor: compiled decode steps count there, not in ``_seen``
        return int(self._prompt_lengths.sum()) + (seen - self._prompt_T) * self.batch_size

    def memory(self) -> KVMemory:
        if self.store is None:
            return KVMemory(0, 0, 0)
        fp16 = self.tokens_held() * self.num_heads * self.head_dim * 2 * 2  # K and V, 2 bytes each
        return KVMemory(self.store.used_bytes(), fp16, self.store.allocated_bytes())


class MiniKVCache(Cache):
    """A transformers ``Cache`` storing full-attention layers the MiniKV way.

    >>> cache = MiniKVCache(MiniKVConfig(bits=2, budget=0.5), model.config, max_new_tokens=64)
    >>> model.generate(input_ids, past_key_values=cache, max_new_tokens=64)  # doctest: +SKIP  (``cache=`` from transformers 5.24)
    ``minikv.patch`` builds one automatically inside ``generate``.
    """

    def __init__(
        self, cfg: MiniKVConfig, model_config, max_new_tokens: int | None = None, max_cache_len: int | None = None
    ):
        if max_new_tokens is not None:
            cfg = cfg.replace(max_new_tokens=max_new_tokens)
        text = model_config.get_text_config(decoder=True)
        layer_types, layer_kwargs = layer_types_and_kwargs(text)
        cfg = config_for_model(cfg, text)
        num_compressed = sum(t in COMPRESSED_TYPES for t in layer_types)
        self.cfg = cfg
        layers, rank = [], 0
        for kind, kw in zip(layer_types, layer_kwargs):
            if kind in COMPRESSED_TYPES:
                layers.append(MiniKVLayer(cfg, rank, num_compressed, max_cache_len))
                rank += 1
            else:
                layers.append(UNCOMPRESSED_TYPES[kind](**kw))
        super().__init__(layers=layers)

    def commit_pending(self) -> None:
        """Store the tokens the compressed layers hold pending, once the reconstruction pass
        (:mod:`minikv.reconstruct`) has scored them."""
        layers = [layer for layer in self.layers if isinstance(layer, MiniKVLayer) and layer.pending is not None]
        for layer in layers:
            layer.pending.scores = selection.scorer(self.cfg.scorer).finish(layer.pending.scores, self.cfg)
        group = self.cfg.q_group_size if self.cfg.quantized else None
        counts = [None] * len(layers)
        if self.cfg.schedule == "shared" and layers:  # every layer and head the same tokens (a turn's too)
            for layer, s in zip(layers, budget.shared_scores(self.cfg, [layer.pending.scores for layer in layers])):
                layer.pending.scores = s
            if not layers[0].pending.turn:  # a turn keeps the count its layers decide (the same scores)
                counts = budget.shared_counts(self.cfg, layers[0].pending.valid, len(layers), group)
        elif self.cfg.schedule == "global" and layers and not layers[0].pending.turn:
            counts = budget.across_layers(
                self.cfg, [layer.pending.scores for layer in layers], layers[0].pending.valid, group
            )
        for layer, c in zip(layers, counts):
            layer.commit(c)

    def request(self, max_cache_len: int) -> None:
        """Record how many tokens ``generate`` will store, so prefill can refuse an overflow up front."""
        for layer in self.layers:
            if isinstance(layer, MiniKVLayer):
                layer.requested_len = max_cache_len

    def memory(self, scope: str = "compressed") -> KVMemory:
        """Bytes held now, bytes an fp16 cache of the same tokens would take, and bytes allocated.

        ``scope="compressed"``: the layers minikv compresses (what the method saves); ``"all"``: every
        layer, the sliding windows (held uncompressed in the model's dtype) included. Every byte held
        counts: codes, fp16 scales and minimums, sinks and residual.
        """
        if scope not in ("compressed", "all"):
            raise ValueError(f"scope must be 'compressed' or 'all', got {scope!r}")
        ours = [layer for layer in self.layers if isinstance(layer, MiniKVLayer)]
        total = KVMemory(0, 0, 0)
        for layer in ours:
            total = total + layer.memory()
        if scope == "compressed":
            return total
        tokens = ours[0].tokens_held()
        for layer in self.layers:
            if isinstance(layer, SlidingLayer) and layer.is_initialized:
                _, H, _, D = layer.keys.shape
                total = total + KVMemory(layer.held_bytes(), tokens * H * D * 2 * 2, layer.allocated_bytes())
        return total


def config_for_model(cfg: MiniKVConfig, text_config) -> MiniKVConfig:
    """``cfg`` resolved for a model (its text config): the automatic knobs' per-model choices
    (:meth:`MiniKVConfig.for_model`, with the model's calibration), a concrete group size; raises, naming
    the knob, if the model cannot take it."""
    head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // text_config.num_attention_heads
    layer_types = layer_types_and_kwargs(text_config)[0]
    check_layer_types(layer_types)
    num_compressed = sum(t in COMPRESSED_TYPES for t in layer_types)
    cfg.tier_share_of(0, num_compressed)  # one share per compressed layer, or one for all
    kv_heads = getattr(text_config, "num_key_value_heads", None) or text_config.num_attention_heads
    tiers = calibration.tier_layers(text_config)
    return cfg.for_model(kv_heads, head_dim, tiers, num_compressed).for_head_dim(head_dim)


def check_layer_types(layer_types) -> None:
    unsupported = sorted({t for t in layer_types if t not in COMPRESSED_TYPES and t not in UNCOMPRESSED_TYPES})
    if unsupported:
        raise ValueError(
            f"unsupported attention layer types {unsupported}: minikv supports {list(COMPRESSED_TYPES)} "
            f"(compressed) and {list(UNCOMPRESSED_TYPES)} (kept uncompressed)"
        )
    if not any(t in COMPRESSED_TYPES for t in layer_types):
        raise ValueError(
            "no layer of this model can be compressed: every layer is sliding-window attention "
            "(set config.sliding_window=None if your prompts are shorter than the window)"
        )

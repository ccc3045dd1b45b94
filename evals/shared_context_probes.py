"""Probes behind the shared-context suite's choices: what the selection would score if it kept other tokens.

    python evals/shared_context_probes.py --probe oracle --model gemma3-270m --knobs '{"schedule": "global"}'
    python evals/shared_context_probes.py --probe pool7 --model gemma3-270m --knobs '{"schedule": "global", "recent": 32}'

Each probe rewrites the reconstruction scores of the prompt's tokens just before the layers keep their
budget (``MiniKVCache.commit_pending``), then runs ``evals/shared_context.py`` unchanged (the same samples,
bytes and rows; ``--label`` names the row, ``--out`` the CSV). Probes, not features: they read the
sample's needles (``oracle``) or run one more forward per prompt (``surprisal*``).

- ``oracle``: the needle sentences' tokens (the four magic numbers' and the pass key's) score above
  every other token in every compressed layer: what a scorer that found the needles would keep;
- ``pool<k>`` / ``avgpool<k>``: each layer's scores max- / average-pooled over ``k`` tokens (a kept token
  keeps its neighbours), per layer;
- ``surprisal``: each token's surprisal under the model (-log p given the tokens before it, one more
  forward with every position's logits) in every layer, as LLMLingua ranks prompt tokens;
- ``surprisal_rankmax``: the larger of a token's rank (as a fraction) by the layer's score and by surprisal;
- ``xlayer``: every layer the same scores, each token's best over the layers and heads (unpooled).
- ``mix<d>`` (with ``schedule="shared"``): each layer keeps the larger of a token's rank (as a fraction)
  by the shared score and by the layer's own score less ``d`` (``mix0``: the two rankings' tops in equal
  shares; ``d`` > 0 leans to the shared ranking): one set for every layer plus each layer's own tokens.
- ``shsurp<d>`` (with ``schedule="shared"``): the larger of a token's rank by the shared score and by
  surprisal less ``d``: the shared set plus the tokens the model could not predict;
- ``shtop<s>`` (with ``schedule="shared"``): the top ``s`` of the shared ranking first, then the rest of
  the budget by surprisal (a quote needs the tokens the model cannot guess; the keys need the shared set).
- ``vtier<s>`` (with ``"v_bits": 4``): a precision tier for the values, simulated: a prompt token whose
  score is in the top ``s`` of the prompt's (per layer and KV head; the sinks too) keeps 4-bit values, every
  other token's values (the later turns' too) are quantized to 2 bits (groups of ``q_group_size``, clipped,
  in the store's rotated basis, as a 2-bit store would) before the 4-bit store packs them, which it then
  holds exactly (a 2-bit group's four levels are on its 4-bit grid); what waits in the residual stays in
  full precision, as in any store. The row's KV % is the 4-bit store's: the tiered bytes are
  the K4 V2 defaults' plus ``s`` x 6.25% of fp16 (2 more bits per value of a tier token).
- ``vkeep<i,j,...>`` / ``vdrop<i,j,...>`` (with ``"v_bits": 4``): the compressed layers ``i, j, ...`` (ranks
  among the compressed layers) store 4-bit values and the others 2-bit (``vkeep``), or the reverse
  (``vdrop``: only those at 2 bits): a precision tier by layer. The row's KV % is exact (each layer's store
  counts its own bytes).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE / "tasks"))

import shared_context as sc  # noqa: E402

from minikv import cache as C  # noqa: E402
from minikv.kernels import quant  # noqa: E402
from minikv.rotation import rotate, unrotate  # noqa: E402
from minikv.store import QuantizedStore  # noqa: E402

STATE: dict = {}
NEEDLES = r"(One of the special magic numbers for [^.]*\.|The pass key is [^.]*\. Remember it\. \d+ is the pass key\.)"


def _rank(x: torch.Tensor) -> torch.Tensor:
    return x.argsort(-1).argsort(-1).float() / x.shape[-1]


def rewrite(probe: str, scores: list[torch.Tensor]) -> list[torch.Tensor]:
    """The scores ``[B, H, T]`` of each compressed layer, as ``probe`` rewrites them."""
    if probe == "oracle":
        mask = STATE["needles"].to(scores[0].device)
        return [s.masked_fill(mask, float(s.max()) * 10 + 1) for s in scores]
    if probe.startswith(("pool", "avgpool")):
        k = int(probe.removeprefix("avg")[4:])
        if probe.startswith("avg"):
            return [
                F.avg_pool1d(s.reshape(-1, 1, s.shape[-1]).float(), k, 1, k // 2, count_include_pad=False).view_as(s)
                for s in scores
            ]
        return [F.max_pool1d(s.reshape(-1, 1, s.shape[-1]), k, 1, k // 2).view_as(s) for s in scores]
    if probe == "xlayer":
        best = torch.stack([s.amax(1, keepdim=True) for s in scores]).amax(0)
        return [best.expand_as(s).contiguous() for s in scores]
    surprisal = STATE["surprisal"].to(scores[0].device)
    if probe == "surprisal":
        return [surprisal.expand_as(s).contiguous() for s in scores]
    if probe == "surprisal_rankmax":
        return [torch.maximum(_rank(s.float()), _rank(surprisal).expand_as(s)) for s in scores]
    raise ValueError(f"unknown probe {probe!r}")


def install(probe: str) -> None:
    run_sample, commit = sc.run_sample, C.MiniKVCache.commit_pending
    if probe.startswith("mix"):
        _install_mix(float(probe[3:]))
        return
    if probe.startswith("shsurp"):
        _install_shared_surprisal(float(probe[6:]))
    if probe.startswith("shtop"):
        _install_shared_surprisal(float(probe[5:]), top=True)
    if probe.startswith(("vkeep", "vdrop")):
        _install_value_layers(probe[:5], {int(i) for i in probe[5:].split(",") if i})
        return
    if probe.startswith("vtier"):
        _install_value_tier(float(probe[5:]))
        return

    def probed_run(model, dialogue, knobs, doc, turns, max_new: int = 64):
        ids = dialogue.document(doc)
        if probe == "oracle":  # the needle sentences' tokens
            text = dialogue.tok.decode(ids)
            enc = dialogue.tok(text, add_special_tokens=False, return_offsets_mapping=True)
            if len(enc.input_ids) != len(ids):
                raise RuntimeError("the document does not re-tokenize to its own ids: no offsets for the oracle")
            mask = torch.zeros(len(ids), dtype=torch.bool)
            for m in re.finditer(NEEDLES, text):
                mask |= torch.tensor([a < m.end() and b > m.start() for a, b in enc.offset_mapping])
            STATE["needles"] = mask
        if probe.startswith(("surprisal", "shsurp", "shtop")):
            with torch.inference_mode():
                logits = model(torch.tensor([ids]), use_cache=False).logits[0].float()
            lp = torch.log_softmax(logits[:-1], -1).gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]
            STATE["surprisal"] = torch.cat([torch.tensor([1e4]), -lp])
        return run_sample(model, dialogue, knobs, doc, turns, max_new)

    def probed_commit(self):
        layers = [layer for layer in self.layers if isinstance(layer, C.MiniKVLayer) and layer.pending is not None]
        if layers and not layers[0].pending.turn and not probe.startswith(("shsurp", "shtop")):  # the document's tokens
            for layer, s in zip(layers, rewrite(probe, [layer.pending.scores for layer in layers])):
                layer.pending.scores = s.to(layer.pending.scores.dtype)
        return commit(self)

    sc.run_sample = probed_run
    C.MiniKVCache.commit_pending = probed_commit


def _install_mix(d: float) -> None:
    shared_scores = C.budget.shared_scores

    def mixed(cfg, scores):
        return [
            torch.maximum(_rank(sh.float()), _rank(own.float()) - d)
            for sh, own in zip(shared_scores(cfg, scores), scores)
        ]

    C.budget.shared_scores = mixed


def _install_shared_surprisal(d: float, top: bool = False) -> None:
    shared_scores = C.budget.shared_scores

    def mixed(cfg, scores):
        out = shared_scores(cfg, scores)
        su = STATE["surprisal"]
        if out[0].shape[-1] != su.shape[-1]:  # a turn: the shared scores alone
            return out
        by_surprisal = _rank(su.to(out[0].device))
        ranks = [_rank(sh.float()) for sh in out]
        if top:  # the shared ranking's top d first, then the rest by surprisal
            return [torch.where(r >= 1 - d, 1 + r, by_surprisal.expand_as(r)) for r in ranks]
        return [torch.maximum(r, by_surprisal.expand_as(r) - d) for r in ranks]

    C.budget.shared_scores = mixed


def _install_value_tier(share: float) -> None:
    keep_prompt, extend = C.MiniKVLayer._keep_prompt, QuantizedStore.extend

    def two_bits(store: QuantizedStore, v: torch.Tensor) -> torch.Tensor:
        if store.v_bits != 4:
            raise SystemExit('vtier needs a 4-bit value store: --knobs with "v_bits": 4')
        r = rotate(v, store.rot_v)
        codes, scale, mn = quant.quantize_pack(r, 2, store.group, store.clip)
        return unrotate(quant.unpack_dequantize(codes, scale, mn, 2, store.group, v.dtype), store.rot_v)

    def tiered_prompt(self, k, v, valid, scores, counts=None):
        if isinstance(self.store, QuantizedStore):
            rank = _rank(scores.float().masked_fill(~valid[:, None], float("-inf")))  # [B, H, T]
            n = valid.sum(-1).view(-1, 1, 1).float() / valid.shape[-1]  # the valid tokens' share of T
            top = rank >= 1 - share * n
            top[..., : self.cfg.sink_tokens] = True
            v = torch.where(top[..., None], v, two_bits(self.store, v))
        return keep_prompt(self, k, v, valid, scores, counts)

    def two_bit_turn(self, k, v):  # the turn's values packed by this call at 2 bits; its residual stays as is
        impl, self.impl = self.impl, _ValuesAtTwoBits(self.impl)
        try:
            return extend(self, k, v)
        finally:
            self.impl = impl

    C.MiniKVLayer._keep_prompt = tiered_prompt
    QuantizedStore.extend = two_bit_turn


def _install_value_layers(kind: str, ranks: set[int]) -> None:
    init = C.MiniKVLayer.__init__

    def layer_init(self, cfg, rank, num_compressed, max_cache_len=None):
        if cfg.value_bits != 4:
            raise SystemExit(f'{kind} needs a 4-bit value store: --knobs with "v_bits": 4')
        if (rank in ranks) == (kind == "vdrop"):
            cfg = cfg.replace(v_bits=2)
        init(self, cfg, rank, num_compressed, max_cache_len)

    C.MiniKVLayer.__init__ = layer_init


class _ValuesAtTwoBits:
    """A store's kernels, but the values ``QuantizedStore.extend`` packs (its second ``quantize_pack`` of each
    pair: keys, then values; already in the rotated basis) are first quantized to 2 bits."""

    def __init__(self, impl):
        self.impl, self.calls = impl, 0

    def __getattr__(self, name):
        return getattr(self.impl, name)

    def quantize_pack(self, x, bits, group, clip):
        self.calls += 1
        if self.calls % 2 == 0:
            codes, scale, mn = quant.quantize_pack(x, 2, group, clip)
            x = quant.unpack_dequantize(codes, scale, mn, 2, group, x.dtype)
        return self.impl.quantize_pack(x, bits, group, clip)


if __name__ == "__main__":
    args = sys.argv[1:]
    if "--probe" not in args:
        sys.exit("usage: shared_context_probes.py --probe NAME [evals/shared_context.py arguments]")
    i = args.index("--probe")
    install(args[i + 1])
    sys.argv = [str(HERE / "shared_context.py")] + args[:i] + args[i + 2 :]
    sys.exit(sc.main())

"""``minikv_hf``: lm-eval's HF model with the KV cache compressed, for every request type.

``--model_args`` take every argument of lm-eval's own ``hf`` model (``pretrained`` as a hub id or a
local directory, ``gguf_file``, ``revision``, ``dtype``, ``device_map``, ``parallelize``,
``trust_remote_code``, ``peft``, ``batch_size``, ``max_length``, ...: ``HFLM`` loads the model and
the tokenizer), plus ``pretrained=`` a ``.gguf`` file or the short name of an embedded model
(``smollm2``, the default, or ``gemma3-270m``; see :mod:`minikv.models`), ``cache=`` (``minikv``
default, ``quanto``, ``full``), ``preset=`` and every field of :class:`minikv.MiniKVConfig`
(``bits``, ``budget``, ``recent``, ``scorer``, ``q_group_size``, ...). ``dtype`` defaults to float32
for GGUF files and to ``auto`` otherwise; ``device`` to cuda when there is one.

- ``generate_until``: a fresh cache per batch, built here (so its memory is recorded), left padding
  handled by the cache's per-sequence lengths.
- ``loglikelihood`` / multiple choice / ``loglikelihood_rolling``: scored through the cache
  (:mod:`minikv.harness.scoring`); with ``cache=full`` lm-eval's stock scoring runs unchanged.
``self.kv`` totals the bytes every cache held against an fp16 cache of the same tokens.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict

from lm_eval.models.huggingface import HFLM
from tqdm import tqdm

from ..compat import cache_key
from ..config import MiniKVConfig, build_config
from .caches import KINDS, QUANTO_BITS, KVBytes, fp16_bytes, quantized_cache_bytes
from .scoring import score_group

KNOBS = tuple(f.name for f in dataclasses.fields(MiniKVConfig) if f.name != "max_new_tokens")
ALIASES = {"SmolLM2-135M-Instruct": "smollm2"}  # other names of the embedded models (minikv.models)


def check_quantized_cache_layers(model_config) -> None:
    """transformers' ``QuantizedCache`` takes only models whose every layer is full attention: refuse
    others when the model is loaded, not at the first request."""
    from ..compat import layer_types_and_kwargs

    other = sorted(set(layer_types_and_kwargs(model_config.get_text_config(decoder=True))[0]) - {"full_attention"})
    if other:
        raise ValueError(
            f"cache=quanto: transformers' QuantizedCache supports only models whose every layer is "
            f"full attention; this one has {other} layers (use cache=minikv or cache=full)"
        )


class MiniKVLM(HFLM):
    def __init__(
        self,
        pretrained=None,
        cache: str = "minikv",
        dtype: str | None = None,
        device: str | None = None,
        preset: str | None = None,
        **kwargs,
    ):
        if cache not in KINDS:
            raise ValueError(f"cache must be one of {list(KINDS)}, got {cache!r}")
        knobs = {k: kwargs.pop(k) for k in list(kwargs) if k in KNOBS}
        if cache == "minikv":
            self.minikv_config = build_config(preset=preset, **knobs)  # validated before anything loads
        else:
            extra = sorted(set(knobs) - ({"bits"} if cache == "quanto" else set())) + (["preset"] if preset else [])
            if extra:
                raise ValueError(f"{extra} only apply to cache=minikv (got cache={cache!r})")
            self.minikv_config = None
        self.quanto_bits = knobs.get("bits", 2)
        if cache == "quanto" and self.quanto_bits not in QUANTO_BITS:
            raise ValueError(f"bits must be one of {list(QUANTO_BITS)} with cache=quanto, got {self.quanto_bits}")
        self.cache_kind, self.kv = cache, KVBytes()
        super().__init__(**hf_arguments(pretrained, dtype, device, kwargs))
        if cache == "quanto":
            check_quantized_cache_layers(self.model.config)
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        if self.minikv_config is not None:
            import minikv

            minikv.patch(self.model, config=self.minikv_config)

    # -- caches -----------------------------------------------------------------------------
    def new_cache(self, new_tokens: int):
        """An empty cache of this evaluation's kind that holds ``new_tokens`` after its prompt."""
        if self.cache_kind == "minikv":
            from ..cache import MiniKVCache

            return MiniKVCache(self.minikv_config, self.model.config, max_new_tokens=new_tokens)
        if self.cache_kind == "quanto":
            from transformers import QuantizedCache

            return QuantizedCache("quanto", self.model.config, nbits=self.quanto_bits)
        return None

    def record(self, cache, batch: int, tokens: int) -> None:
        if self.cache_kind == "minikv":
            mem = cache.memory("all")  # the whole model, as quanto's bytes are
            self.kv.add(mem.used_bytes, mem.fp16_bytes)
        elif self.cache_kind == "quanto":
            self.kv.add(quantized_cache_bytes(cache), fp16_bytes(self.model.config, batch, tokens))

    # -- lm-eval hooks ----------------------------------------------------------------------
    def _model_generate(self, context, max_length, stop, **generation_kwargs):
        cache = self.new_cache(max_length - context.shape[1])
        if cache is None:
            return super()._model_generate(context, max_length, stop, **generation_kwargs)
        out = super()._model_generate(context, max_length, stop, **{cache_key(): cache}, **generation_kwargs)
        self.record(cache, context.shape[0], out.shape[1] - 1)
        return out

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs=None):
        if self.cache_kind == "full":
            return super()._loglikelihood_tokens(requests, disable_tqdm=disable_tqdm, override_bs=override_bs)
        groups = defaultdict(list)  # context tokens -> request indices (choices share one prefill)
        for i, (_, context, _) in enumerate(requests):
            groups[tuple(context)].append(i)
        results = [None] * len(requests)
        bar = tqdm(total=len(requests), disable=disable_tqdm or self.rank != 0, desc="minikv loglikelihood")
        for context, idx in groups.items():
            conts = [requests[i][2] for i in idx]
            recorder = _Recorder(self)
            scores = score_group(
                self.model, recorder.new_cache, self.cache_kind == "minikv", context, conts, self.max_length
            )
            recorder.flush()
            for i, answer in zip(idx, scores):
                results[i] = answer
                if requests[i][0] is not None:
                    self.cache_hook.add_partial("loglikelihood", requests[i][0], answer)
            bar.update(len(idx))
        bar.close()
        return results


class _Recorder:
    """Hands out caches to the scorer and records the memory of each once it is filled."""

    def __init__(self, lm: MiniKVLM):
        self.lm, self.caches = lm, []

    def new_cache(self, new_tokens: int):
        cache = self.lm.new_cache(new_tokens)
        self.caches.append(cache)
        return cache

    def flush(self) -> None:
        for cache in self.caches:
            self.lm.record(cache, 1, int(cache.get_seq_length()))


def hf_arguments(pretrained, dtype: str | None, device: str | None, kwargs: dict) -> dict:
    """What lm-eval's ``HFLM`` gets: the user's arguments, an embedded model's short name turned into its
    dense copy's folder (:func:`minikv.models.load_source`) or a ``.gguf`` path into its folder and
    ``gguf_file``, and the defaults of ``minikv_hf``:
    the embedded model when none is named; ``dtype`` float32 for GGUF files (they are dequantized;
    CPU-friendly) and ``"auto"`` otherwise, as ``hf``; ``device`` cuda when there is one, else cpu."""
    import torch

    from ..kernels.quant import import_torchao_quietly
    from ..models import EMBEDDED_MODELS, load_source

    import_torchao_quietly()
    args = dict(kwargs)
    if not isinstance(pretrained, str | type(None)):  # a loaded model: lm-eval's own path, nothing to add
        return dict(pretrained=pretrained, **args)
    dequantized = bool(args.get("gguf_file"))
    if not args.get("gguf_file"):
        name = ALIASES.get(pretrained, pretrained)
        dequantized = name is None or name in EMBEDDED_MODELS or str(name).endswith(".gguf")
        pretrained, gguf = load_source(name)
        args.update(gguf)
    if dtype is None:
        dtype = "float32" if dequantized else "auto"
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return dict(pretrained=pretrained, dtype=dtype, device=device, **args)

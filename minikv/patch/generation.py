"""What ``generate`` does differently on a patched model: it builds a MiniKV cache itself and
refuses decoding strategies that need to copy, reorder or crop the cache."""

from __future__ import annotations

from transformers.generation.configuration_utils import GenerationMode

from ..cache import MiniKVCache
from ..compat import cache_key

SUPPORTED_MODES = (GenerationMode.GREEDY_SEARCH, GenerationMode.SAMPLE)


def check_generation_mode(mode, generation_config) -> None:
    if mode in SUPPORTED_MODES:
        return
    raise ValueError(
        f"{mode.value} is not supported on a MiniKV-compressed cache (got num_beams="
        f"{generation_config.num_beams}): use greedy or sampling with num_beams=1 and no assistant model, "
        f"or minikv.unpatch(model) first"
    )


def make_prepare_cache(model, original):
    """Wrap ``model._prepare_cache_for_generation`` (bound ``original``) for a patched model."""

    def prepare_cache_for_generation(generation_config, model_kwargs, generation_mode, batch_size, max_cache_length):
        check_generation_mode(generation_mode, generation_config)
        key = cache_key()
        cache = model_kwargs.get(key)
        if (
            cache is None
            and generation_config.use_cache is not False
            and generation_config.cache_implementation is None
        ):
            cfg = model._minikv_patch.config
            model_kwargs[key] = cache = MiniKVCache(cfg, model.config)  # no max_cache_len: grows by turn
            cache.request(max_cache_length)
            return None
        if isinstance(cache, MiniKVCache):
            cache.request(max_cache_length)
        return original(generation_config, model_kwargs, generation_mode, batch_size, max_cache_length)

    return prepare_cache_for_generation

"""What differs between the transformers versions minikv supports (5.17 to 5.24+)."""

from __future__ import annotations

import functools


@functools.cache
def cache_key() -> str:
    """The name of the cache argument of ``generate`` and of the models' ``forward``.

    ``past_key_values`` up to transformers 5.23; ``cache`` from 5.24 (the old name still works, with a
    FutureWarning, until 5.40). transformers lists the default name first in ``ALL_CACHE_NAMES``.
    """
    from transformers.generation import utils

    return getattr(utils, "ALL_CACHE_NAMES", ["past_key_values"])[0]


def layer_types_and_kwargs(text_config) -> tuple[list[str], list[dict]]:
    """Each layer's type and the keyword arguments its cache layer takes.

    transformers' ``get_layer_types_and_kwargs`` returns one dict for every layer up to 5.2x
    (``{"sliding_window": W}`` when a layer slides) and a list of per-layer dicts later.
    """
    from transformers.cache_utils import get_layer_types_and_kwargs

    types, kwargs = get_layer_types_and_kwargs(text_config)
    if isinstance(kwargs, dict):
        kwargs = [dict(kwargs) for _ in types]
    return list(types), list(kwargs)

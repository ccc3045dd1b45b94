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

"""Confidence intervals of the sweep's scores.

Every task score is the mean of per-sample scores in [0, 1] over ``n`` samples. Most are 0/1
(a needle found or not, the right choice or not); a few give partial credit (``string_match_all``
over several needles). The interval is Wilson's score interval for a binomial proportion with the
mean as ``p``: for a [0, 1]-valued score of mean ``p`` the per-sample variance is at most
``p (1 - p)``, the Bernoulli one, so with partial credit the interval is, if anything, too wide.

The mean over tasks uses the same interval with ``n = samples x tasks``, as if every sample of every
task were one pooled Bernoulli draw (the tasks have equal ``n``, so the mean over tasks is the pooled
mean). It treats the tasks as one population, so it describes this suite, not tasks at large.
"""

from __future__ import annotations

import math

Z95 = 1.959963984540054  # two-sided 95% normal quantile


def wilson(p: float, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval ``(low, high)`` of a proportion ``p`` observed over ``n`` samples."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if not 0 <= p <= 1:
        raise ValueError(f"p must be in [0, 1], got {p}")
    z2n = z * z / n
    center = (p + z2n / 2) / (1 + z2n)
    half = z * math.sqrt(p * (1 - p) / n + z2n / (4 * n)) / (1 + z2n)
    return max(0.0, center - half), min(1.0, center + half)

"""Percentile bootstrap intervals over clips: with 64 test clips one clip is 1.6 points, so a figure
without its interval invites reading noise as a difference."""
from __future__ import annotations

from typing import Callable

import numpy as np

DRAWS = 2000
LEVEL = 0.95


def interval(per_clip: np.ndarray, statistic: Callable[[np.ndarray], float], draws: int = DRAWS,
             seed: int = 0) -> list[float] | None:
    """[lo, hi] of `statistic` over `draws` resamples (with replacement) of the rows of `per_clip` (N, ...);
    None for fewer than two clips. Seeded: the same clips give the same interval."""
    n = len(per_clip)
    if n < 2:
        return None
    rng = np.random.default_rng(seed)
    values = np.array([statistic(per_clip[rng.integers(0, n, n)]) for _ in range(draws)], dtype=np.float64)
    values = values[np.isfinite(values)]
    if not len(values):
        return None
    tail = (1 - LEVEL) / 2 * 100
    lo, hi = np.percentile(values, [tail, 100 - tail])
    return [round(float(lo), 6), round(float(hi), 6)]

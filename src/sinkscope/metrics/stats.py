"""Uncertainty for headline numbers: percentile bootstrap intervals over independent units (prompts,
windows, trials). Pure functions on arrays."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..errors import InputError

BOOTSTRAP_RESAMPLES = 2000


def bootstrap_interval(values: Sequence[float] | np.ndarray, seed: int = 0, level: float = 0.95,
                       resamples: int = BOOTSTRAP_RESAMPLES) -> tuple[float, float, float]:
    """(mean, low, high): the mean of ``values`` and the percentile bootstrap interval of the mean (values
    resampled with replacement). One value gives a zero-width interval."""
    values = np.asarray(values, dtype=np.float64)
    if values.size == 0:
        raise InputError("no values to bootstrap")
    mean = float(values.mean())
    if values.size == 1:
        return mean, mean, mean
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, values.size, size=(resamples, values.size))].mean(axis=1)
    tail = (1.0 - level) / 2
    return mean, float(np.quantile(means, tail)), float(np.quantile(means, 1.0 - tail))


def paired_difference_interval(first: Sequence[float] | np.ndarray, second: Sequence[float] | np.ndarray,
                               seed: int = 0, level: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high) of ``first - second`` over paired units (the same prompt or window measured two
    ways), so the interval reflects the paired spread, not the two marginal ones."""
    first, second = np.asarray(first, dtype=np.float64), np.asarray(second, dtype=np.float64)
    if first.shape != second.shape:
        raise InputError(f"paired values differ in number: {first.size} vs {second.size}")
    return bootstrap_interval(first - second, seed=seed, level=level)


def ratio_interval(numerator: Sequence[float] | np.ndarray, denominator: Sequence[float] | np.ndarray,
                   seed: int = 0, level: float = 0.95,
                   resamples: int = BOOTSTRAP_RESAMPLES) -> tuple[float, float, float]:
    """(ratio, low, high): mean(numerator) / mean(denominator) over paired units, with the percentile
    bootstrap interval of that ratio of means (units resampled together)."""
    num, den = np.asarray(numerator, dtype=np.float64), np.asarray(denominator, dtype=np.float64)
    if num.shape != den.shape or num.size == 0:
        raise InputError(f"a ratio needs paired, non-empty values (got {num.size} and {den.size})")
    ratio = float(num.mean() / den.mean())
    if num.size == 1:
        return ratio, ratio, ratio
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, num.size, size=(resamples, num.size))
    ratios = num[picks].mean(axis=1) / den[picks].mean(axis=1)
    tail = (1.0 - level) / 2
    return ratio, float(np.quantile(ratios, tail)), float(np.quantile(ratios, 1.0 - tail))

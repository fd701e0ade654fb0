"""Uncertainty for headline numbers: percentile bootstrap intervals over independent units (prompts,
windows, trials). Pure functions on arrays."""

from __future__ import annotations

from collections.abc import Callable, Sequence

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


def statistic_interval(statistic: Callable[..., float], *columns: Sequence[float] | np.ndarray, seed: int = 0,
                       level: float = 0.95, resamples: int = BOOTSTRAP_RESAMPLES) -> tuple[float, float, float]:
    """(value, low, high): ``statistic(*columns)`` and its percentile bootstrap interval, the units (rows of
    the columns, taken together) resampled with replacement. Resamples where the statistic is not finite
    (e.g. a correlation of a constant column) are left out of the interval."""
    arrays = [np.asarray(c, dtype=np.float64) for c in columns]
    if not arrays or any(a.shape != arrays[0].shape for a in arrays) or arrays[0].size == 0:
        raise InputError("a bootstrap needs paired, non-empty columns")
    value = float(statistic(*arrays))
    n = arrays[0].size
    if n == 1:
        return value, value, value
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, n, size=(resamples, n))
    draws = np.array([statistic(*(a[p] for a in arrays)) for p in picks], dtype=np.float64)
    draws = draws[np.isfinite(draws)]
    if draws.size == 0:
        return value, float("nan"), float("nan")
    tail = (1.0 - level) / 2
    return value, float(np.quantile(draws, tail)), float(np.quantile(draws, 1.0 - tail))


def loglog_slope(x: np.ndarray, y: np.ndarray) -> float:
    """Least-squares slope of log y against log x over the points where both are positive (NaN if fewer
    than two distinct x remain)."""
    keep = (x > 0) & (y > 0) & np.isfinite(y)
    if np.unique(x[keep]).size < 2:
        return float("nan")
    return float(np.polyfit(np.log(x[keep]), np.log(y[keep]), 1)[0])


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman rank correlation (average ranks for ties; NaN when a column is constant)."""
    rx, ry = _ranks(x), _ranks(y)
    if rx.std() == 0 or ry.std() == 0:
        return float("nan")
    return float(np.corrcoef(rx, ry)[0, 1])


def _ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks, ties given their average rank."""
    order = np.argsort(values, kind="stable")
    ranks = np.empty(values.size, dtype=np.float64)
    ranks[order] = np.arange(1, values.size + 1)
    for value in np.unique(values):
        tied = values == value
        ranks[tied] = ranks[tied].mean()
    return ranks

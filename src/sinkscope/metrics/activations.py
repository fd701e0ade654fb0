"""Massive activations (Sun et al. 2024). Pure functions: arrays in, arrays out.

A residual-stream state is ``h`` of shape ``[..., n, d]`` (tokens x hidden dims; leading axes are batch
axes, e.g. layers). Sun et al. call an activation massive when it is huge in absolute terms and about
1000x the median magnitude of its hidden state; here every statistic is relative to the median |h|
over all (token, dim) entries of that state.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

MASSIVE_FACTORS = (100, 1000)  # flag activations this many times the median |h|


def _state(h: ArrayLike) -> NDArray[np.float64]:
    state = np.asarray(h, dtype=np.float64)
    if state.ndim < 2 or state.shape[-2] * state.shape[-1] == 0:
        raise ValueError(f"a residual state needs shape [..., n, d] with n, d > 0, got {state.shape}")
    return state


def _flat_abs(h: ArrayLike) -> NDArray[np.float64]:
    state = _state(h)
    return np.abs(state).reshape(*state.shape[:-2], -1)


def median_abs(h: ArrayLike) -> NDArray[np.float64]:
    """Median |h| over all (token, dim) entries: [..., n, d] -> [...]."""
    return np.median(_flat_abs(h), axis=-1)


def max_abs(h: ArrayLike) -> NDArray[np.float64]:
    """Largest |h| over all (token, dim) entries: [..., n, d] -> [...]."""
    return _flat_abs(h).max(-1)


def massive_ratio(h: ArrayLike) -> NDArray[np.float64]:
    """``max |h| / median |h|`` over all (token, dim) entries: [..., n, d] -> [...] (inf if the median is 0)."""
    flat = _flat_abs(h)
    with np.errstate(invalid="ignore", divide="ignore"):
        return flat.max(-1) / np.median(flat, axis=-1)


def count_above_median(h: ArrayLike, factor: float) -> NDArray[np.int64]:
    """How many entries have ``|h| > factor * median |h|``: [..., n, d] -> [...]."""
    flat = _flat_abs(h)
    return (flat > factor * np.median(flat, axis=-1, keepdims=True)).sum(-1)


def top_activations(h: ArrayLike, k: int) -> tuple[NDArray[np.int64], NDArray[np.int64], NDArray[np.float64]]:
    """The k entries of largest |h|: [..., n, d] -> (token index, dim, signed value), each [..., k].

    Ordered by |value|, largest first; equal magnitudes keep row-major (token, then dim) order. k is
    capped at n * d.
    """
    state = _state(h)
    if k < 1:
        raise ValueError("k must be >= 1")
    n, d = state.shape[-2:]
    flat = state.reshape(*state.shape[:-2], n * d)
    k = min(int(k), n * d)
    # stable sort of -|h|: ties resolved by flat index, so the result does not depend on the sort kernel
    order = np.argsort(-np.abs(flat), axis=-1, kind="stable")[..., :k]
    values = np.take_along_axis(flat, order, axis=-1)
    return order // d, order % d, values


def activation_stats(h: ArrayLike, factors: tuple[float, ...] = MASSIVE_FACTORS) -> dict[str, NDArray[Any]]:
    """Per state: ``max_abs``, ``median_abs``, ``ratio`` and ``n_above_{f}x`` for each factor f: {name: [...]}."""
    flat = _flat_abs(h)
    median = np.median(flat, axis=-1)
    peak = flat.max(-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        stats: dict[str, NDArray[Any]] = {"max_abs": peak, "median_abs": median, "ratio": peak / median}
    for factor in factors:
        stats[f"n_above_{factor:g}x"] = (flat > factor * median[..., None]).sum(-1)
    return stats


def token_massive_ratio(h: ArrayLike) -> NDArray[np.float64]:
    """Per token, its largest ``|h|`` over dims relative to the median ``|h|`` of its depth, maxed over depths:
    [depths, n, d] -> [n] (PrefixQuant's criterion for the tokens to keep in full precision)."""
    states = np.abs(np.asarray(h, dtype=np.float64))
    median = np.median(states.reshape(states.shape[0], -1), axis=-1)  # [depths]
    ratio = states.max(-1) / np.where(median > 0, median, np.inf)[:, None]  # [depths, n]
    return np.asarray(ratio.max(0), dtype=np.float64)

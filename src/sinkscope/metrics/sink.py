"""Sink metrics (Gu et al. 2025; Barbero et al. 2025). Pure functions: arrays in, arrays or numbers out.

Conventions: an attention array ``A[..., t, k]`` has queries on axis -2 and keys on axis -1, lower
triangular, rows summing to one (or less, when a learned sink logit takes a share). Per-prompt metric
arrays are shaped ``[prompts, layers, heads]``.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike, NDArray

from ..errors import InputError

DEFAULT_EPS = 0.3  # Gu et al.; Barbero et al.'s Table 1 uses 0.8


def key_alpha(attention: ArrayLike, include_self: bool = True) -> NDArray[np.float64]:
    """Gu et al.'s alpha_k for every key k: the mean attention key k receives from the queries t >= k.

    ``include_self`` keeps query t = k (which, for k = 0, attends to itself with weight 1), as Gu's code
    does; without it the mean runs over t > k (the last key then has no query and gets NaN).
    """
    a = np.asarray(attention, dtype=np.float64)
    t = a.shape[-1]
    if a.shape[-2] != t:
        raise ValueError(f"attention must be square in its last two axes, got {a.shape}")
    keep = np.tril(np.ones((t, t), dtype=bool), k=0 if include_self else -1)
    counts = keep.sum(0).astype(np.float64)
    totals = np.where(keep, a, 0.0).sum(-2)
    with np.errstate(invalid="ignore", divide="ignore"):
        return totals / counts


def first_token_alpha(attention: ArrayLike, include_self: bool = True) -> NDArray[np.float64]:
    """alpha of the first key (position 0): [..., T, T] -> [...]."""
    return key_alpha(attention, include_self)[..., 0]


def alpha_from_query_weights(
    weights: ArrayLike, visible: ArrayLike | None = None, include_self: bool = True
) -> NDArray[np.float64]:
    """alpha from per-query weights on the first token: [..., n] -> [...].

    ``weights[..., i]`` is the attention query i puts on position 0 (query 0 is the first token itself).
    ``visible`` (broadcastable bool) marks the queries that can see position 0; others (padding, queries
    whose sliding window has left position 0 behind) are not counted.
    """
    w = np.asarray(weights, dtype=np.float64)
    mask = np.ones(w.shape, dtype=bool) if visible is None else np.broadcast_to(np.asarray(visible, bool), w.shape)
    if not include_self:
        mask = mask.copy()
        mask[..., 0] = False
    counts = mask.sum(-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(mask, w, 0.0).sum(-1) / counts


def sink_rate(alpha: ArrayLike, eps: float = DEFAULT_EPS) -> float:
    """Fraction of (prompt, layer, head) entries whose alpha exceeds eps (Gu's Sink^eps, as a fraction)."""
    a = np.asarray(alpha, dtype=np.float64)
    if a.size == 0:
        raise ValueError("sink_rate of an empty array")
    return float((a > eps).mean())


def sink_rate_by_layer(alpha: ArrayLike, eps: float = DEFAULT_EPS) -> NDArray[np.float64]:
    """[prompts, layers, heads] -> [layers]: fraction of heads (over prompts) with alpha > eps."""
    a = np.asarray(alpha, dtype=np.float64)
    return (a > eps).mean(axis=(0, 2))


def head_sink_frequency(alpha: ArrayLike, eps: float = DEFAULT_EPS) -> NDArray[np.float64]:
    """[prompts, layers, heads] -> [layers, heads]: how often each head is a sink across prompts."""
    return (np.asarray(alpha, dtype=np.float64) > eps).mean(axis=0)


def alpha_map(alpha: ArrayLike) -> NDArray[np.float64]:
    """[prompts, layers, heads] -> [layers, heads]: mean alpha per head."""
    return np.asarray(alpha, dtype=np.float64).mean(axis=0)


def mean_sink_mass(alpha: ArrayLike) -> float:
    """The continuous sink metric: mean alpha over everything given."""
    return float(np.asarray(alpha, dtype=np.float64).mean())


def first_k_mass(attention: ArrayLike, k: int = 4) -> NDArray[np.float64]:
    """Mean over queries of the attention on the first k keys: [..., T, T] -> [...].

    Queries t < k see only the first k keys and contribute their full mass (1 for a plain softmax).
    """
    if k < 1:
        raise ValueError("k must be >= 1")
    a = np.asarray(attention, dtype=np.float64)
    return a[..., :, :k].sum(-1).mean(-1)


def sink_rate_by_key(attention: ArrayLike, eps: float = DEFAULT_EPS) -> NDArray[np.float64]:
    """Gu et al.'s code path: [prompts, layers, heads, T, T] -> [T], the sink rate of every key position."""
    a = np.asarray(attention, dtype=np.float64)
    return (key_alpha(a) > eps).mean(axis=(0, 1, 2))


def check_eps(eps: float) -> float:
    """A sink threshold ε, which must lie strictly between 0 and 1 (else a clear error)."""
    if not 0.0 < eps < 1.0:
        raise InputError(f"--eps {eps} must lie strictly between 0 and 1")
    return float(eps)


def key_sink_scores(received: ArrayLike, queries: ArrayLike, min_queries: int = 1) -> NDArray[np.float64]:
    """Per key, the largest mean attention it receives in any layer and head: ``received`` [L, H, n] (summed over
    the queries that may see the key) / ``queries`` [L, 1|H, n], maxed over L and H -> [n]. Keys seen by fewer than
    ``min_queries`` queries (the last few, whose mean rests on a handful of queries) score 0. The keys that score
    highest are the sinks *found* in a context (KVSink's criterion), wherever they sit."""
    mass = np.asarray(received, dtype=np.float64)
    seen = np.broadcast_to(np.asarray(queries, dtype=np.float64), mass.shape)
    alpha = np.where(seen >= max(min_queries, 1), mass / np.maximum(seen, 1.0), 0.0)
    return np.asarray(alpha.max(axis=(0, 1)), dtype=np.float64)

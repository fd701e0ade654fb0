"""Language-modelling loss metrics. Pure functions: arrays in, arrays (or numbers) out.

Conventions: ``logits`` are ``[..., V]`` with targets ``[...]`` (integer token ids); per-token losses are
negative log-likelihoods in nats. Positions are 0-based indices of the *predicted* token. Position
buckets are ``0-63, 64-255, 256-1023, 1024-4095, ...`` (64, then each bucket four times as long).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from numpy.typing import ArrayLike, NDArray

FIRST_BUCKET_END = 64
BUCKET_GROWTH = 4


def token_nll(logits: Any, targets: Any) -> Any:
    """Per-token negative log-likelihood ``-log softmax(logits)[target]``: [..., V], [...] -> [...].

    Torch tensors in give a float tensor out (computed in at least float32); anything else gives numpy float64.
    """
    if isinstance(logits, torch.Tensor):
        dtype = torch.promote_types(logits.dtype, torch.float32)
        values = logits.to(dtype)
        index = torch.as_tensor(targets, device=values.device).long()
        picked = torch.gather(values, -1, index[..., None])[..., 0]
        return torch.logsumexp(values, dim=-1) - picked
    array = np.asarray(logits, dtype=np.float64)
    ids = np.asarray(targets).astype(np.int64)
    top = array.max(axis=-1, keepdims=True)  # shift for a stable log-sum-exp
    lse = np.log(np.exp(array - top).sum(axis=-1)) + top[..., 0]
    return lse - np.take_along_axis(array, ids[..., None], axis=-1)[..., 0]


def mean_loss(nll: ArrayLike) -> float:
    """Mean per-token loss (nats); NaN for no tokens."""
    values = np.asarray(nll, dtype=np.float64)
    return float(values.mean()) if values.size else math.nan


def perplexity(nll: ArrayLike | float) -> float:
    """exp(mean loss): of an array of per-token losses, or of a mean loss given as a number."""
    mean = float(np.asarray(nll, dtype=np.float64)) if np.ndim(nll) == 0 else mean_loss(nll)
    if math.isnan(mean):
        return math.nan
    return math.exp(mean) if mean < 700 else math.inf  # exp overflows a float past ~709


def bucket_edges(max_position: int) -> NDArray[np.int64]:
    """Bucket start positions up to one past ``max_position``: [0, 64, 256, 1024, ...] and the final stop."""
    edges = [0, FIRST_BUCKET_END]
    while edges[-1] <= max_position:
        edges.append(edges[-1] * BUCKET_GROWTH)
    return np.asarray(edges, dtype=np.int64)


def bucket_index(positions: ArrayLike) -> NDArray[np.int64]:
    """Index of each position's bucket (0 for 0-63, 1 for 64-255, 2 for 256-1023, ...)."""
    p = np.asarray(positions, dtype=np.int64)
    if p.size and p.min() < 0:
        raise ValueError("positions must be >= 0")
    edges = bucket_edges(int(p.max()) if p.size else 0)
    return np.searchsorted(edges, p, side="right") - 1


def bucket_label(index: int) -> str:
    """``"0-63"``, ``"64-255"``, ``"256-1023"``, ..."""
    start = 0 if index == 0 else FIRST_BUCKET_END * BUCKET_GROWTH ** (index - 1)
    stop = FIRST_BUCKET_END * BUCKET_GROWTH ** index
    return f"{start}-{stop - 1}"


def bucket_losses(positions: ArrayLike, nll: ArrayLike) -> dict[str, NDArray[Any]]:
    """Mean loss per position bucket (only buckets that hold tokens).

    Returns arrays ``bucket`` (labels), ``index``, ``start``, ``stop`` (exclusive), ``n`` and ``mean_loss``.
    """
    p = np.asarray(positions, dtype=np.int64).ravel()
    values = np.asarray(nll, dtype=np.float64).ravel()
    if p.shape != values.shape:
        raise ValueError(f"positions {p.shape} and losses {values.shape} differ in size")
    index = bucket_index(p)
    present = np.unique(index)
    counts = np.array([(index == i).sum() for i in present], dtype=np.int64)
    means = np.array([values[index == i].mean() for i in present], dtype=np.float64)
    starts = np.array([0 if i == 0 else FIRST_BUCKET_END * BUCKET_GROWTH ** (i - 1) for i in present], dtype=np.int64)
    stops = np.array([FIRST_BUCKET_END * BUCKET_GROWTH ** i for i in present], dtype=np.int64)
    return {"bucket": np.array([bucket_label(int(i)) for i in present], dtype=object), "index": present,
            "start": starts, "stop": stops, "n": counts, "mean_loss": means}


def delta_summary(reference: ArrayLike, other: ArrayLike) -> dict[str, float]:
    """Paired comparison of per-token losses on the *same* tokens (``other - reference``).

    ``delta_loss`` (mean difference, nats), ``delta_se`` (its standard error over tokens), ``ppl_ratio``
    (exp of the delta: how many times the perplexity grows), ``fraction_worse`` (tokens whose loss rose).
    """
    a = np.asarray(reference, dtype=np.float64).ravel()
    b = np.asarray(other, dtype=np.float64).ravel()
    if a.shape != b.shape:
        raise ValueError(f"loss arrays differ in size ({a.size} vs {b.size}): not the same tokens")
    if a.size == 0:
        return {"delta_loss": math.nan, "delta_se": math.nan, "ppl_ratio": math.nan, "fraction_worse": math.nan,
                "n_tokens": 0}
    delta = b - a
    se = float(delta.std(ddof=1) / math.sqrt(delta.size)) if delta.size > 1 else math.nan
    mean = float(delta.mean())
    return {"delta_loss": mean, "delta_se": se, "ppl_ratio": perplexity(mean),
            "fraction_worse": float((delta > 0).mean()), "n_tokens": int(delta.size)}

"""Sensitivity metrics (Barbero et al. 2025, Section 3): how far a change at one token spreads.

Pure functions: arrays (numpy or torch) in, arrays or numbers out; no models, no I/O.

- Perturbation spread (Fig. 2): from ``delta[layer, token] = ||h(x) - h(x')||_2`` (layer 0 = embeddings),
  ``S_total`` sums over all layers and the tokens *after* the perturbed position p, ``S_final`` averages
  those tokens at the last layer. Tokens at or before p are excluded: before p causality makes delta 0,
  at p the input itself changed, so neither measures spread.
- Path-sum bound (Thm 3.2): ``B = [Abar^(L) ... Abar^(1)]_{j,i}`` with ``Abar^(l) = sum_h c_h A^(l,h) + I``.
  Layer 1 acts first on the residual stream, so it is the rightmost factor: h^(L) = Abar^(L)...Abar^(1) h^(0)
  for a linearised, attention-only model; entry (j, i) is the sum over all causal paths i -> j of the
  product of the (head-summed, residual-included) attention weights along the path.
- Hutchinson-style Jacobian norms: for u ~ N(0, I), E ||u^T J||^2 = trace(J^T J) = ||J||_F^2, so k probe
  products u_r^T J (one backward pass each) estimate ||J||_F^2 for every source block at once. That
  estimate of the *square* is unbiased; its square root is biased low by a rank-dependent amount.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

HEAD_WEIGHTS = ("sum", "mean")  # c_h = 1 and c_h = 1/H


def _array(values: Any) -> NDArray[np.float64]:
    """numpy float64 from a numpy array, a list or a (possibly grad-tracking) torch tensor."""
    if hasattr(values, "detach"):
        values = values.detach().cpu().double().numpy()
    return np.asarray(values, dtype=np.float64)


# -- perturbation spread ------------------------------------------------------------------------------


def perturbation_delta(hidden: ArrayLike, hidden_perturbed: ArrayLike) -> NDArray[np.float64]:
    """``||h(x) - h(x')||_2`` over the last axis: [layers + 1, T, d] (or any [..., d]) -> [layers + 1, T]."""
    a, b = _array(hidden), _array(hidden_perturbed)
    if a.shape != b.shape:
        raise ValueError(f"hidden states differ in shape: {a.shape} vs {b.shape}")
    return np.linalg.norm(a - b, axis=-1)


def relative_delta(delta: ArrayLike, hidden: ArrayLike) -> NDArray[np.float64]:
    """``delta / ||h(x)||_2``: the change as a fraction of the unperturbed state's norm (0 where that is 0)."""
    d = _array(delta)
    norms = np.linalg.norm(_array(hidden), axis=-1)
    if norms.shape != d.shape:
        raise ValueError(f"delta {d.shape} does not match hidden states {norms.shape} (without the last axis)")
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(norms > 0, d / np.where(norms > 0, norms, 1.0), 0.0)


def _after(delta: NDArray[np.float64], position: int) -> NDArray[np.float64]:
    if delta.ndim != 2:
        raise ValueError(f"delta must be [layers, tokens], got shape {delta.shape}")
    t = delta.shape[1]
    if not -t <= position < t:
        raise ValueError(f"perturbed position {position} outside 0..{t - 1}")
    return delta[:, (position % t) + 1:]


def spread_total(delta: ArrayLike, position: int) -> float:
    """S_total: sum of delta over every layer and every token after ``position``."""
    return float(_after(_array(delta), position).sum())


def spread_final(delta: ArrayLike, position: int) -> float:
    """S_final: mean of delta at the last layer over the tokens after ``position`` (NaN if there are none)."""
    after = _after(_array(delta), position)
    return float(after[-1].mean()) if after.shape[1] else float("nan")


def spread_summary(delta: ArrayLike, position: int, hidden: ArrayLike | None = None) -> dict[str, float]:
    """``S_total``, ``S_final`` and, given the unperturbed hidden states, ``S_total_rel``/``S_final_rel``
    computed on ``delta / ||h(x)||``."""
    out = {"S_total": spread_total(delta, position), "S_final": spread_final(delta, position)}
    if hidden is not None:
        rel = relative_delta(delta, hidden)
        out["S_total_rel"] = spread_total(rel, position)
        out["S_final_rel"] = spread_final(rel, position)
    return out


def spread_ratio(without_bos: float, with_bos: float) -> float:
    """R = S(no-bos) / S(bos); R > 1 means the perturbation spreads more without the sink."""
    if with_bos == 0:
        return float("inf") if without_bos > 0 else float("nan")
    return float(without_bos / with_bos)


# -- attention path-sum bound -------------------------------------------------------------------------


def _head_weights(head_weights: str | ArrayLike, n_layers: int, n_heads: int) -> NDArray[np.float64]:
    if isinstance(head_weights, str):
        if head_weights not in HEAD_WEIGHTS:
            raise ValueError(f"head_weights must be one of {HEAD_WEIGHTS} or an array, not {head_weights!r}")
        value = 1.0 if head_weights == "sum" else 1.0 / n_heads
        return np.full((n_layers, n_heads), value)
    c = _array(head_weights)
    return np.broadcast_to(c, (n_layers, n_heads)).astype(np.float64)


def mixing_matrices(attention: ArrayLike, head_weights: str | ArrayLike = "mean") -> NDArray[np.float64]:
    """Per layer ``Abar^(l) = sum_h c_h A^(l,h) + I``: [L, H, T, T] -> [L, T, T].

    ``head_weights``: ``"sum"`` (c_h = 1), ``"mean"`` (c_h = 1/H) or an array broadcastable to [L, H].
    """
    a = _array(attention)
    if a.ndim != 4 or a.shape[-1] != a.shape[-2]:
        raise ValueError(f"attention must be [layers, heads, T, T], got shape {a.shape}")
    n_layers, n_heads, t, _ = a.shape
    c = _head_weights(head_weights, n_layers, n_heads)
    return np.einsum("lh,lhij->lij", c, a) + np.eye(t)[None]


def path_sum_matrix(attention: ArrayLike, head_weights: str | ArrayLike = "mean") -> NDArray[np.float64]:
    """``Abar^(L) @ ... @ Abar^(1)`` [T, T] from stacked attention [L, H, T, T] (layer 1 = index 0).

    Entry (j, i) bounds (up to the model's Lipschitz constants) how much h_j^(L) can depend on h_i^(0).
    """
    product = None
    for layer_matrix in mixing_matrices(attention, head_weights):
        # the later layer multiplies from the left: it acts on what the earlier layers produced
        product = layer_matrix if product is None else layer_matrix @ product
    assert product is not None
    return product


def path_sum_bound(attention: ArrayLike, target: int = -1, head_weights: str | ArrayLike = "mean"
                   ) -> NDArray[np.float64]:
    """``B[i] = [Abar^(L) ... Abar^(1)]_{target, i}`` for every source i: [L, H, T, T] -> [T]."""
    return path_sum_matrix(attention, head_weights)[target]


# -- Jacobian norms from probe products -----------------------------------------------------------------


def gaussian_probes(k: int, dim: int, seed: int = 0) -> NDArray[np.float64]:
    """k standard normal probe vectors [k, dim] (E[u u^T] = I, which makes the estimator unbiased)."""
    if k < 1:
        raise ValueError("need at least one probe")
    return np.random.default_rng(seed).standard_normal((k, dim))


def probe_squares(products: ArrayLike) -> NDArray[np.float64]:
    """``||u_r^T J||^2`` for every probe r and block: [probes, ..., dim] -> [probes, ...].

    Each is an unbiased sample of ``||J||_F^2``; average them over probes (and blocks) *before* any
    nonlinear step such as a square root.
    """
    p = _array(products)
    if p.ndim < 2:
        raise ValueError("products must be [probes, ..., dim]")
    return (p ** 2).sum(-1)


def mean_and_stderr(samples: ArrayLike) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Mean over axis 0 and its standard error (sample std / sqrt(n); NaN for one sample): [n, ...] -> [...].

    For the mean of ``||J_i||_F^2`` over a set of blocks i, average `probe_squares` over those blocks
    first: the blocks share their probes, so their errors are correlated and do not add in quadrature.
    """
    x = _array(samples)
    n = x.shape[0]
    if n < 1:
        raise ValueError("need at least one sample")
    stderr = x.std(0, ddof=1) / np.sqrt(n) if n > 1 else np.full(x.shape[1:], np.nan)
    return x.mean(0), stderr


def hutchinson_frobenius_sq(products: ArrayLike) -> NDArray[np.float64]:
    """Estimate ``||J||_F^2`` from probe products ``products[r, ..., :] = u_r^T J`` (u_r ~ N(0, I)).

    The last axis is the Jacobian's input dimension, the first the probe index; axes in between index
    blocks (e.g. source tokens i, one block J_{j<-i} each). Returns mean_r ||u_r^T J||^2 over [...]:
    unbiased for every block, whatever its rank (`hutchinson_stderr` is its standard error).
    """
    return probe_squares(products).mean(0)


def hutchinson_frobenius(products: ArrayLike) -> NDArray[np.float64]:
    """``sqrt`` of `hutchinson_frobenius_sq`: the estimated Frobenius norm per block. Biased low.

    E sqrt(X) < sqrt(E X) (Jensen), by an amount that depends on the block's singular values: with one
    probe a rank-one block gets sqrt(2/pi) = 0.80 of its norm on average, a high-rank one nearly all of
    it. So blocks of different rank are not compared on equal terms; compare `hutchinson_frobenius_sq`.
    """
    return np.sqrt(hutchinson_frobenius_sq(products))


def hutchinson_stderr(products: ArrayLike) -> NDArray[np.float64]:
    """Standard error of `hutchinson_frobenius_sq` (sample std of ||u_r^T J||^2 over probes / sqrt(k))."""
    return mean_and_stderr(probe_squares(products))[1]


def exact_frobenius(jacobian: ArrayLike) -> NDArray[np.float64]:
    """``||J||_F`` per block from an explicit Jacobian [d_out, ..., d_in] (e.g. [d, T, d] -> [T])."""
    j = _array(jacobian)
    return np.sqrt((j ** 2).sum(axis=(0, -1)))


# -- distance profiles ------------------------------------------------------------------------------------


def by_distance(values: ArrayLike, target: int | ArrayLike, positions: ArrayLike | None = None,
                reduce: str = "mean") -> tuple[NDArray[np.int64], NDArray[np.float64], NDArray[np.int64]]:
    """Aggregate per-source values by distance ``j - i`` to their target.

    ``values[n]`` belong to sources at ``positions[n]`` (default 0..n-1) with targets ``target`` (one int,
    or one per value). Sources after their target (negative distance) are dropped. Returns
    (distances ascending, reduced value per distance, count per distance); ``reduce``: mean, median, max, sum.
    """
    reducers: dict[str, Callable[[NDArray[np.float64]], Any]] = {"mean": np.mean, "median": np.median,
                                                                 "max": np.max, "sum": np.sum}
    if reduce not in reducers:
        raise ValueError(f"reduce must be one of {sorted(reducers)}")
    v = _array(values).reshape(-1)
    pos = np.arange(v.size) if positions is None else np.asarray(positions, dtype=np.int64).reshape(-1)
    if pos.size != v.size:
        raise ValueError("positions and values differ in length")
    distance = np.broadcast_to(np.asarray(target, dtype=np.int64), pos.shape) - pos
    keep = distance >= 0
    distance, v = distance[keep], v[keep]
    unique = np.unique(distance)
    reduced = np.array([reducers[reduce](v[distance == d]) for d in unique], dtype=np.float64)
    counts = np.array([(distance == d).sum() for d in unique], dtype=np.int64)
    return unique, reduced, counts


def log_slope(distance: ArrayLike, values: ArrayLike) -> float:
    """Least-squares slope of log10(values) against distance (decades per token; < 0 means decay).

    Non-positive values are left out; NaN when fewer than two points remain."""
    d, v = _array(distance).reshape(-1), _array(values).reshape(-1)
    keep = np.isfinite(v) & (v > 0)
    if keep.sum() < 2 or np.ptp(d[keep]) == 0:
        return float("nan")
    return float(np.polyfit(d[keep], np.log10(v[keep]), 1)[0])

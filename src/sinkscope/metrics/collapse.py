"""Rank collapse and representational collapse. Pure functions: arrays in, arrays or numbers out.

Rank collapse (Dong et al. 2021; Barbero et al. 2025 §3.5) is measured on a token matrix ``H`` of shape
``[..., n, d]`` (rows are tokens; leading axes are batch axes, e.g. layers). Every measure takes
``exclude_sink``: drop row 0 (the first token, the usual sink) before measuring. The spectral measures
(sigma_1 energy share, effective rank) are taken on ``H`` itself, not centred: a direction every token
shares (or one huge row) counts as the top direction.

Representational collapse (Barbero et al. 2024 §3.6) compares two vectors ``[..., d]`` (e.g. the last
token's final representation of a sequence and of the same sequence with its last token repeated).

Degenerate inputs (an all-zero matrix or vector) give NaN rather than an exception.
"""

from __future__ import annotations

from typing import cast

import numpy as np
from numpy.typing import ArrayLike, NDArray

RANK_MEASURES = ("frobenius_residual", "composite_residual", "sigma1_energy", "effective_rank")
DISTANCES = ("l2", "linf", "cosine")


def _tokens(h: ArrayLike, exclude_sink: bool) -> NDArray[np.float64]:
    matrix = np.asarray(h, dtype=np.float64)
    if matrix.ndim < 2:
        raise ValueError(f"a token matrix needs at least 2 axes [..., n, d], got shape {matrix.shape}")
    if exclude_sink:
        matrix = matrix[..., 1:, :]
    if matrix.shape[-2] == 0:
        raise ValueError("no rows left to measure (a one-token matrix with exclude_sink=True)")
    return matrix


def frobenius_residual(h: ArrayLike, exclude_sink: bool = False) -> NDArray[np.float64]:
    """Relative Frobenius residual ``||H - 1 mu^T||_F / ||H||_F``: [..., n, d] -> [...].

    Mean-centring solves ``argmin_x ||H - 1 x^T||_F`` exactly, so this is the Frobenius distance to the
    nearest "all tokens identical" matrix. 0 = collapsed to one row; at most 1.
    """
    matrix = _tokens(h, exclude_sink)
    residual = matrix - matrix.mean(-2, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.linalg.norm(residual, axis=(-2, -1)) / np.linalg.norm(matrix, axis=(-2, -1))


def composite_norm(m: ArrayLike) -> NDArray[np.float64]:
    """Dong et al.'s ``||M||_{1,inf} = sqrt(||M||_1 ||M||_inf)``: [..., n, d] -> [...].

    ``||M||_1`` is the largest column abs-sum, ``||M||_inf`` the largest row abs-sum.
    """
    a = np.abs(np.asarray(m, dtype=np.float64))
    return cast(NDArray[np.float64], np.sqrt(a.sum(-2).max(-1) * a.sum(-1).max(-1)))


def composite_residual(h: ArrayLike, exclude_sink: bool = False) -> NDArray[np.float64]:
    """Relative composite-norm residual ``||H - 1 x^T||_{1,inf} / ||H||_{1,inf}``: [..., n, d] -> [...].

    Dong et al. take ``x`` as the argmin of the residual norm; here ``x`` is the mean row, an
    approximation (the composite norm has no closed-form minimiser), so this is an upper bound on the
    exact residual. Unlike the Frobenius residual it can exceed 1 (one outlier row, e.g. a sink, makes
    the mean row a poor centre in the max-sum norms).
    """
    matrix = _tokens(h, exclude_sink)
    with np.errstate(invalid="ignore", divide="ignore"):
        return composite_norm(matrix - matrix.mean(-2, keepdims=True)) / composite_norm(matrix)


def energy_shares(h: ArrayLike, exclude_sink: bool = False) -> NDArray[np.float64]:
    """``sigma_i^2 / sum_j sigma_j^2``, largest first: [..., n, d] -> [..., min(n, d)].

    The squared singular values are the eigenvalues of the smaller Gram matrix (``H H^T`` or ``H^T H``):
    exact up to rounding of order eps * sigma_1^2, which the shares cannot see, and far cheaper than an
    SVD of a wide matrix (an SVD per layer was most of an experiment's time).
    """
    matrix = _tokens(h, exclude_sink)
    swapped = np.swapaxes(matrix, -1, -2)
    gram = matrix @ swapped if matrix.shape[-2] <= matrix.shape[-1] else swapped @ matrix
    squared = np.clip(np.linalg.eigvalsh(gram)[..., ::-1], 0.0, None)  # tiny negative rounding -> 0
    with np.errstate(invalid="ignore", divide="ignore"):
        return squared / squared.sum(-1, keepdims=True)


def _effective_rank(p: NDArray[np.float64]) -> NDArray[np.float64]:
    with np.errstate(invalid="ignore", divide="ignore"):
        terms = np.where(p > 0, -p * np.log(np.where(p > 0, p, 1.0)), 0.0)
    entropy = np.where(np.isnan(p).any(-1), np.nan, terms.sum(-1))
    return np.exp(entropy)


def sigma1_energy(h: ArrayLike, exclude_sink: bool = False) -> NDArray[np.float64]:
    """Share of the energy in the top singular direction ``sigma_1^2 / sum_i sigma_i^2``: [..., n, d] -> [...].

    1 = rank one; 1/min(n, d) = energy spread evenly.
    """
    return energy_shares(h, exclude_sink)[..., 0]


def effective_rank(h: ArrayLike, exclude_sink: bool = False) -> NDArray[np.float64]:
    """``exp(entropy(sigma^2 / sum sigma^2))``: [..., n, d] -> [...]. 1 = rank one; min(n, d) at most."""
    return _effective_rank(energy_shares(h, exclude_sink))


def rank_collapse_measures(h: ArrayLike, exclude_sink: bool = False) -> dict[str, NDArray[np.float64]]:
    """All four `RANK_MEASURES` of [..., n, d] -> {name: [...]}, with one eigen-decomposition."""
    matrix = _tokens(h, exclude_sink)
    shares = energy_shares(matrix)
    return {
        "frobenius_residual": frobenius_residual(matrix),
        "composite_residual": composite_residual(matrix),
        "sigma1_energy": shares[..., 0],
        "effective_rank": _effective_rank(shares),
    }


def _pair(a: ArrayLike, b: ArrayLike) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if x.shape[-1:] != y.shape[-1:]:
        raise ValueError(f"vectors differ in length: {x.shape} vs {y.shape}")
    return x, y


def l2_distance(a: ArrayLike, b: ArrayLike) -> NDArray[np.float64]:
    """``||a - b||_2`` over the last axis: [..., d] x [..., d] -> [...]."""
    x, y = _pair(a, b)
    return np.linalg.norm(x - y, axis=-1)


def linf_distance(a: ArrayLike, b: ArrayLike) -> NDArray[np.float64]:
    """``max_i |a_i - b_i|`` over the last axis (the measure of Barbero et al. 2024)."""
    x, y = _pair(a, b)
    return np.abs(x - y).max(-1)


def cosine_distance(a: ArrayLike, b: ArrayLike) -> NDArray[np.float64]:
    """``1 - cos(a, b)`` over the last axis: 0 = same direction, 2 = opposite; NaN for a zero vector.

    Computed as ``||a/|a| - b/|b|||^2 / 2`` (the same quantity), which keeps its precision when the
    vectors nearly coincide, where ``1 - cos`` would cancel to rounding noise.
    """
    x, y = _pair(a, b)
    with np.errstate(invalid="ignore", divide="ignore"):
        x_unit = x / np.linalg.norm(x, axis=-1, keepdims=True)
        y_unit = y / np.linalg.norm(y, axis=-1, keepdims=True)
    return 0.5 * ((x_unit - y_unit) ** 2).sum(-1)


def vector_distances(a: ArrayLike, b: ArrayLike) -> dict[str, NDArray[np.float64]]:
    """All `DISTANCES` between a and b: {name: [...]}."""
    return {"l2": l2_distance(a, b), "linf": linf_distance(a, b), "cosine": cosine_distance(a, b)}

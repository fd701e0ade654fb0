"""Matrix-based entropy of a set of token representations (Giraldo et al. 2014; Skean et al. 2025).

For the representations Z [n, d] of one sequence's n tokens at one depth (a row per token), K = Z Z^T is
the n x n Gram matrix. Its eigenvalues divided by its trace, lambda_i = eig_i(K) / tr(K), are
non-negative and sum to one: a distribution over the directions the tokens span. The entropy of order a
(Renyi) is

    S_a(Z) = 1 / (1 - a) * log sum_i lambda_i^a,      S_1(Z) = -sum_i lambda_i log lambda_i  (a -> 1),

the von Neumann entropy for a = 1 and the collision entropy -log sum_i lambda_i^2 for a = 2. It is 0 when
K has rank one (every token on one line, or one token's norm dominating), and log n for n orthogonal
tokens of equal norm (K proportional to the identity); in general 0 <= S_a <= log rank(K). Skean et al.
("Layer by Layer", 2025) track it per depth of the residual stream; the dip at intermediate depths is
the "compression valley". As in their prompt entropy, Z is not centred by default; ``centre=True``
subtracts the tokens' mean first, so a direction all tokens share (which dominates an uncentred residual
stream) does not count. The eigenvalues of Z Z^T are the
squared singular values of Z, so the cost is O(n d min(n, d)). Natural logarithms (nats).
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike, NDArray


def gram_spectrum(h: ArrayLike, centre: bool = False) -> NDArray[np.float64]:
    """[..., n, d] -> [..., min(n, d)]: eigenvalues of the Gram matrix h h^T divided by its trace, largest
    first (NaN for an all-zero matrix). ``centre``: of the tokens minus their mean."""
    z = np.asarray(h, dtype=np.float64)
    if z.ndim < 2:
        raise ValueError(f"token representations must be [..., n, d], got shape {z.shape}")
    if centre:
        z = z - z.mean(-2, keepdims=True)
    power = np.linalg.svd(z, compute_uv=False) ** 2
    total = power.sum(-1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return power / total


def matrix_entropy(h: ArrayLike, order: float = 1.0, centre: bool = False) -> NDArray[np.float64]:
    """[..., n, d] -> [...]: the order-``order`` matrix entropy S_a of the normalised Gram matrix (nats);
    ``order=1`` is the von Neumann entropy; ``centre``: of the tokens minus their mean."""
    if order <= 0:
        raise ValueError("the entropy order must be > 0")
    p = gram_spectrum(h, centre)
    if order == 1.0:
        with np.errstate(invalid="ignore", divide="ignore"):
            terms = np.where(p > 0, -p * np.log(np.where(p > 0, p, 1.0)), 0.0)
        return np.where(np.isnan(p).any(-1), np.nan, terms.sum(-1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.log(np.where(p > 0, p, 0.0) ** order @ np.ones(p.shape[-1])) / (1.0 - order)

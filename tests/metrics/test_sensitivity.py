"""Sensitivity metrics against hand-built cases: path enumeration, known matrices, hand sums."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from sinkscope.metrics import sensitivity as sens


def random_causal_attention(layers: int, heads: int, t: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(layers, heads, t, t)) * 2
    logits = np.where(np.tril(np.ones((t, t))) > 0, logits, -np.inf)
    a = np.exp(logits - logits.max(-1, keepdims=True))
    return a / a.sum(-1, keepdims=True)


# -- path-sum bound ---------------------------------------------------------------------------------


def test_one_layer_path_sum_is_attention_plus_identity():
    a = random_causal_attention(1, 3, 5)
    np.testing.assert_allclose(sens.path_sum_matrix(a, "sum"), a[0].sum(0) + np.eye(5))
    np.testing.assert_allclose(sens.path_sum_matrix(a, "mean"), a[0].mean(0) + np.eye(5))
    weights = np.array([0.5, 2.0, 0.0])
    np.testing.assert_allclose(sens.path_sum_matrix(a, weights), np.einsum("h,hij->ij", weights, a[0]) + np.eye(5))


@pytest.mark.parametrize("head_weights", ["sum", "mean"])
def test_path_sum_equals_explicit_path_enumeration(head_weights):
    layers, heads, t = 3, 2, 4
    a = random_causal_attention(layers, heads, t, seed=1)
    c = 1.0 if head_weights == "sum" else 1.0 / heads

    def step(layer: int, to: int, frm: int) -> float:  # one hop of a path: heads (weighted) + residual
        return c * a[layer, :, to, frm].sum() + (1.0 if to == frm else 0.0)

    expected = np.zeros((t, t))
    for j, i in itertools.product(range(t), range(t)):
        # a path i = k0 -> k1 (layer 1) -> k2 (layer 2) -> k3 = j (layer 3)
        for k1, k2 in itertools.product(range(t), range(t)):
            expected[j, i] += step(0, k1, i) * step(1, k2, k1) * step(2, j, k2)
    np.testing.assert_allclose(sens.path_sum_matrix(a, head_weights), expected, rtol=1e-12)
    np.testing.assert_allclose(sens.path_sum_bound(a, target=2, head_weights=head_weights), expected[2], rtol=1e-12)


def test_path_sum_order_is_last_layer_on_the_left():
    a = random_causal_attention(2, 1, 5, seed=6)
    later_left = (a[1, 0] + np.eye(5)) @ (a[0, 0] + np.eye(5))
    earlier_left = (a[0, 0] + np.eye(5)) @ (a[1, 0] + np.eye(5))
    assert not np.allclose(later_left, earlier_left)  # so the order is actually tested
    np.testing.assert_allclose(sens.path_sum_matrix(a, "sum"), later_left)


def test_path_sum_rows_and_perfect_sink():
    layers, heads, t = 4, 3, 6
    a = random_causal_attention(layers, heads, t, seed=2)
    # row-stochastic heads: each (mean over heads + I) row sums to 2, so the product's rows sum to 2^L
    np.testing.assert_allclose(sens.path_sum_matrix(a, "mean").sum(-1), 2.0 ** layers)
    # every head puts all its weight on token 0: no path links two other tokens (the paper's corollary)
    sink = np.zeros((layers, heads, t, t))
    sink[..., 0] = 1.0
    b = sens.path_sum_matrix(sink, "sum")
    off = ~np.eye(t, dtype=bool)
    off[:, 0] = False
    assert (b[off] == 0).all() and (b[1:, 0] > 0).all()


def test_path_sum_accepts_torch_and_rejects_bad_shapes():
    a = random_causal_attention(2, 2, 3)
    np.testing.assert_allclose(sens.path_sum_matrix(torch.tensor(a, requires_grad=True)), sens.path_sum_matrix(a))
    with pytest.raises(ValueError, match="layers, heads, T, T"):
        sens.path_sum_matrix(a[0])
    with pytest.raises(ValueError, match="head_weights"):
        sens.path_sum_matrix(a, "max")


# -- Hutchinson estimator -------------------------------------------------------------------------


def test_hutchinson_converges_to_frobenius_norm_of_known_matrix():
    rng = np.random.default_rng(3)
    d_out, blocks, d_in = 6, 3, 5
    jacobian = rng.normal(size=(d_out, blocks, d_in)) * np.array([1.0, 0.1, 3.0])[None, :, None]
    exact = np.array([np.linalg.norm(jacobian[:, b, :]) for b in range(blocks)])
    np.testing.assert_allclose(sens.exact_frobenius(jacobian), exact)
    probes = sens.gaussian_probes(20_000, d_out, seed=4)
    products = np.einsum("rc,cbi->rbi", probes, jacobian)  # u_r^T J per block
    estimate = sens.hutchinson_frobenius(products)
    np.testing.assert_allclose(estimate, exact, rtol=0.03)
    stderr = sens.hutchinson_stderr(products)
    assert (np.abs(estimate ** 2 - exact ** 2) < 5 * stderr).all()
    few = sens.hutchinson_frobenius(products[:4])
    assert np.abs(few - exact).max() > np.abs(estimate - exact).max()  # more probes, closer


def test_hutchinson_is_exact_for_an_orthonormal_probe_basis_scaled():
    # with the d standard basis vectors as probes, mean_r ||e_r^T J||^2 = ||J||_F^2 / d exactly
    rng = np.random.default_rng(5)
    jacobian = rng.normal(size=(4, 2, 3))
    products = np.einsum("rc,cbi->rbi", np.eye(4), jacobian)
    np.testing.assert_allclose(sens.hutchinson_frobenius_sq(products) * 4, sens.exact_frobenius(jacobian) ** 2)


def low_rank_matrix(rank: int, d_out: int = 12, d_in: int = 20, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.normal(size=(d_out, rank)) @ rng.normal(size=(rank, d_in))


RUNS = 4000  # independent estimates per case; the bounds below are 4 standard errors of their mean


@pytest.mark.parametrize("rank", [1, 3, 12])
@pytest.mark.parametrize("k", [1, 4])
def test_squared_estimate_is_unbiased_at_every_rank_while_its_sqrt_is_biased_low(rank, k):
    jacobian = low_rank_matrix(rank)
    exact_sq = np.linalg.norm(jacobian) ** 2
    assert np.linalg.matrix_rank(jacobian) == rank
    products = np.stack([sens.gaussian_probes(k, 12, seed) @ jacobian for seed in range(RUNS)])  # [runs, k, d]
    squared = np.array([sens.hutchinson_frobenius_sq(p) for p in products])
    # unbiased: the mean over runs lies within 4 of its standard errors of the exact value
    assert abs(squared.mean() - exact_sq) < 4 * squared.std(ddof=1) / np.sqrt(RUNS)
    if k > 1:  # the reported standard error describes the spread of the estimate across runs
        reported = np.array([sens.hutchinson_stderr(p) for p in products])
        assert 0.85 < np.mean(reported ** 2) / squared.var(ddof=1) < 1.15
    # the square root is biased low, and by how much depends on the rank (Jensen)
    roots = np.sqrt(squared)
    ratio = roots.mean() / np.sqrt(exact_sq)
    assert np.sqrt(exact_sq) - roots.mean() > 4 * roots.std(ddof=1) / np.sqrt(RUNS)
    if rank == 1 and k == 1:
        assert abs(ratio - np.sqrt(2 / np.pi)) < 0.02  # E|z| for z ~ N(0, 1): 0.80
    if k == 1:
        assert ratio < (0.85 if rank == 1 else 0.99)


def test_sqrt_bias_grows_as_the_rank_falls():
    ratios = []
    for rank in (1, 3, 12):
        jacobian = low_rank_matrix(rank)
        roots = [sens.hutchinson_frobenius(sens.gaussian_probes(1, 12, seed) @ jacobian) for seed in range(RUNS)]
        ratios.append(np.mean(roots) / np.linalg.norm(jacobian))
    assert ratios[0] < ratios[1] < ratios[2] < 1


def test_mean_over_blocks_uses_per_probe_means_for_its_stderr():
    # two identical blocks: their errors are perfectly correlated, so the mean is no surer than one block
    jacobian = low_rank_matrix(2)
    products = np.einsum("rc,ci->ri", sens.gaussian_probes(64, 12, seed=9), jacobian)
    both = np.stack([products, products], axis=1)  # [k, 2 blocks, d]
    mean, stderr = sens.mean_and_stderr(sens.probe_squares(both).mean(1))
    np.testing.assert_allclose(mean, sens.hutchinson_frobenius_sq(products))
    np.testing.assert_allclose(stderr, sens.hutchinson_stderr(products))
    one_mean, one_se = sens.mean_and_stderr(np.array([2.0]))
    assert one_mean == 2.0 and np.isnan(one_se)


def test_oversquash_reports_the_unbiased_square_with_its_stderr():
    import sinkscope as ss
    from helpers import SENTENCES, tiny_model, word_tokenizer
    from sinkscope.experiments.oversquash import oversquash

    lm = ss.load(tiny_model("llama"), tokenizer=word_tokenizer())
    exact = oversquash(lm, SENTENCES[0], probes=0, exact=True, path_sum=False, progress=False).to_frame()
    result = oversquash(lm, SENTENCES[0], probes=64, path_sum=False, progress=False, seed=3)
    frame = result.to_frame()
    np.testing.assert_allclose(exact["s2"], exact["s_exact"] ** 2)
    assert (exact["s2_se"] == 0).all()
    np.testing.assert_allclose(frame["s"], np.sqrt(frame["s2"]))
    assert frame[["bos", "source"]].equals(exact[["bos", "source"]])
    z = (frame["s2"] - exact["s2"]) / frame["s2_se"]
    assert np.abs(z).max() < 5 and frame["s2_se"].gt(0).all()
    for mode, stats in result.summary["conditions"].items():
        inner = frame[(frame["bos"] == mode) & (frame["text_position"] >= 1) & (frame["distance"] > 0)]
        assert stats["s2_mean"] == pytest.approx(inner["s2"].mean())
        assert 0 < stats["s2_mean_se"] < stats["s2_mean"]
        truth = exact.loc[inner.index, "s2"].mean()
        assert abs(stats["s2_mean"] - truth) < 4 * stats["s2_mean_se"]
    assert "unbiased" in result.summary["estimator"] and "R_s2_mean" in result.summary


# -- perturbation spread ----------------------------------------------------------------------------


def test_spread_summaries_by_hand():
    h = np.zeros((3, 4, 2))  # layers 0..2, 4 tokens, d = 2
    h[..., 0] = 2.0
    hp = h.copy()
    hp[0, 1] = [2.0, 1.0]  # the swapped token at layer 0
    hp[1, 1:, 1] = [1.0, 3.0, 4.0]
    hp[2, 2:, 1] = [6.0, 8.0]
    delta = sens.perturbation_delta(h, hp)
    np.testing.assert_allclose(delta, [[0, 1, 0, 0], [0, 1, 3, 4], [0, 0, 6, 8]])
    assert sens.spread_total(delta, 1) == pytest.approx(3 + 4 + 6 + 8)
    assert sens.spread_final(delta, 1) == pytest.approx((6 + 8) / 2)
    summary = sens.spread_summary(delta, 1, h)
    assert summary["S_total_rel"] == pytest.approx((3 + 4 + 6 + 8) / 2)  # ||h|| = 2 everywhere
    assert summary["S_final_rel"] == pytest.approx(7 / 2)
    assert sens.spread_ratio(6.0, 3.0) == 2.0 and sens.spread_ratio(1.0, 0.0) == float("inf")
    with pytest.raises(ValueError, match="shape"):
        sens.perturbation_delta(h, hp[:, :3])


def test_relative_delta_handles_zero_norm():
    h = np.array([[[0.0, 0.0], [3.0, 4.0]]])
    delta = np.array([[1.0, 2.5]])
    np.testing.assert_allclose(sens.relative_delta(delta, h), [[0.0, 0.5]])


# -- distance profiles ------------------------------------------------------------------------------


def test_by_distance_groups_and_drops_later_sources():
    values = np.array([1.0, 2.0, 3.0, 4.0, 10.0])
    distances, reduced, counts = sens.by_distance(values, target=3)
    np.testing.assert_array_equal(distances, [0, 1, 2, 3])
    np.testing.assert_allclose(reduced, [4.0, 3.0, 2.0, 1.0])  # source 4 lies after the target
    distances, reduced, counts = sens.by_distance([1.0, 5.0, 3.0, 7.0], target=[2, 3, 2, 3], positions=[1, 2, 2, 3])
    np.testing.assert_array_equal(distances, [0, 1])
    np.testing.assert_allclose(reduced, [(3.0 + 7.0) / 2, (1.0 + 5.0) / 2])
    np.testing.assert_array_equal(counts, [2, 2])


def test_log_slope_recovers_exponential_decay():
    d = np.arange(10)
    assert sens.log_slope(d, 3.0 * 10 ** (-0.25 * d)) == pytest.approx(-0.25)
    assert np.isnan(sens.log_slope([1, 2], [1.0, 0.0]))

"""Sink metrics against hand-built attention matrices."""

import numpy as np
import pytest

from sinkscope.metrics import sink


def causal_uniform(t: int) -> np.ndarray:
    a = np.tril(np.ones((t, t)))
    return a / a.sum(-1, keepdims=True)


def test_alpha_of_uniform_causal_attention_is_harmonic_mean():
    t = 8
    expected = sum(1.0 / (i + 1) for i in range(t)) / t  # (1/T) sum_t 1/t
    assert sink.first_token_alpha(causal_uniform(t)) == pytest.approx(expected)


def test_alpha_hand_computed_3x3_with_and_without_self():
    a = np.array([[1.0, 0.0, 0.0], [0.6, 0.4, 0.0], [0.2, 0.5, 0.3]])
    assert sink.first_token_alpha(a) == pytest.approx((1.0 + 0.6 + 0.2) / 3)
    assert sink.first_token_alpha(a, include_self=False) == pytest.approx((0.6 + 0.2) / 2)
    # key 1 is seen by queries 1 and 2
    assert sink.key_alpha(a)[1] == pytest.approx((0.4 + 0.5) / 2)


def test_key_alpha_matches_gu_reference_code():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 3, 4, 7, 7)) * 3
    logits = np.where(np.tril(np.ones((7, 7))) > 0, logits, -np.inf)
    a = np.exp(logits - logits.max(-1, keepdims=True))
    a /= a.sum(-1, keepdims=True)
    ratios = np.arange(7, 0, -1)  # Gu et al.: T, T-1, ..., 1
    gu = (a / ratios[None, None, None, None, :]).sum(-2)
    np.testing.assert_allclose(sink.key_alpha(a), gu)
    np.testing.assert_allclose(sink.sink_rate_by_key(a, 0.3), (gu > 0.3).mean(axis=(0, 1, 2)))


def test_all_one_hot_on_first_token_is_full_sink():
    t = 6
    a = np.zeros((2, 3, 4, t, t))
    a[..., 0] = 1.0
    alpha = sink.first_token_alpha(a)
    assert sink.sink_rate(alpha, 0.99) == 1.0
    assert sink.mean_sink_mass(alpha) == pytest.approx(1.0)
    np.testing.assert_allclose(sink.first_k_mass(a, 1), 1.0)


def test_alpha_from_query_weights_matches_matrix_and_masks_invisible_queries():
    a = np.array([[1.0, 0.0, 0.0], [0.6, 0.4, 0.0], [0.2, 0.5, 0.3]])
    assert sink.alpha_from_query_weights(a[:, 0]) == pytest.approx(sink.first_token_alpha(a))
    visible = np.array([True, True, False])  # e.g. query 2's window no longer reaches key 0
    assert sink.alpha_from_query_weights(a[:, 0], visible) == pytest.approx(0.8)
    assert sink.alpha_from_query_weights(a[:, 0], visible, include_self=False) == pytest.approx(0.6)


def test_sink_rate_counts_strictly_greater_and_by_layer():
    alpha = np.array([[[0.3, 0.31], [0.9, 0.1]], [[0.0, 0.5], [0.8, 0.81]]])  # [2 prompts, 2 layers, 2 heads]
    assert sink.sink_rate(alpha, 0.3) == pytest.approx(5 / 8)
    np.testing.assert_allclose(sink.sink_rate_by_layer(alpha, 0.8), [0.0, 0.5])
    np.testing.assert_allclose(sink.head_sink_frequency(alpha, 0.3), [[0.0, 1.0], [1.0, 0.5]])
    np.testing.assert_allclose(sink.alpha_map(alpha), alpha.mean(0))


def test_first_k_mass_hand_computed():
    a = np.array([[1.0, 0.0, 0.0], [0.6, 0.4, 0.0], [0.2, 0.5, 0.3]])
    assert sink.first_k_mass(a, 2) == pytest.approx((1.0 + 1.0 + 0.7) / 3)
    with pytest.raises(ValueError):
        sink.first_k_mass(a, 0)


def test_empty_and_nonsquare_inputs_raise():
    with pytest.raises(ValueError):
        sink.sink_rate(np.array([]))
    with pytest.raises(ValueError):
        sink.key_alpha(np.zeros((3, 4)))

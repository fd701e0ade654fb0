"""Property-based tests (hypothesis): invariants of the metric functions on arbitrary inputs, and of the
captured attention on random token sequences (rows sum to one; a prompt's numbers do not depend on the
batch it ran in, the batch size or the padding side). The profile in conftest.py makes them deterministic."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

import sinkscope as ss
from helpers import VOCAB, tiny_model
from sinkscope.capture import AttentionWeights, CaptureEngine, FirstTokenAttention
from sinkscope.metrics import collapse, loss, sink

# -- strategies --------------------------------------------------------------------------------------------

finite = st.floats(-30, 30, allow_nan=False, allow_infinity=False, width=64)
unit = st.floats(0, 1, allow_nan=False, width=64)


def causal_softmax(logits: np.ndarray) -> np.ndarray:
    t = logits.shape[-1]
    masked = np.where(np.tril(np.ones((t, t), dtype=bool)), logits, -np.inf)
    weights = np.exp(masked - masked.max(-1, keepdims=True))
    return weights / weights.sum(-1, keepdims=True)


@st.composite
def attention(draw, max_t: int = 9) -> np.ndarray:
    """Causal softmax attention [prompts, layers, heads, T, T] from arbitrary finite logits."""
    shape = (draw(st.integers(1, 3)), draw(st.integers(1, 3)), draw(st.integers(1, 3)), *(2 * [draw(
        st.integers(1, max_t))]))
    return causal_softmax(draw(arrays(np.float64, shape, elements=finite)))


alphas = arrays(np.float64, st.tuples(st.integers(1, 4), st.integers(1, 5), st.integers(1, 4)), elements=unit)


@st.composite
def token_matrix(draw) -> np.ndarray:
    n, d = draw(st.integers(2, 8)), draw(st.integers(1, 8))
    h = draw(arrays(np.float64, (n, d), elements=st.floats(-1e3, 1e3, allow_nan=False, width=64)))
    assume(np.linalg.norm(h) > 1e-3)
    return h


# -- sink metrics ----------------------------------------------------------------------------------------


@given(attention())
def test_softmax_rows_sum_to_one_and_alpha_lies_in_unit_interval(a):
    np.testing.assert_allclose(a.sum(-1), 1.0, rtol=1e-12)
    for include_self in (True, False):
        values = sink.first_token_alpha(a, include_self=include_self)
        values = values[~np.isnan(values)]  # a one-token prompt has no query t > 0
        assert ((values >= 0) & (values <= 1 + 1e-12)).all()
    key = sink.key_alpha(a)
    assert ((key >= 0) & (key <= 1 + 1e-12)).all()
    assert (sink.first_k_mass(a, 1) <= 1 + 1e-12).all()


@given(attention(), st.data())
def test_alpha_from_query_weights_agrees_with_the_matrix_and_stays_in_unit_interval(a, data):
    np.testing.assert_allclose(sink.alpha_from_query_weights(a[..., :, 0]), sink.first_token_alpha(a), atol=1e-12)
    visible = data.draw(arrays(bool, a.shape[:-1]))
    values = sink.alpha_from_query_weights(a[..., :, 0], visible)
    shown = visible.any(-1)
    assert np.isnan(values[~shown]).all()
    assert ((values[shown] >= 0) & (values[shown] <= 1 + 1e-12)).all()


@given(alphas, unit, unit)
def test_sink_rate_is_non_increasing_in_eps(alpha, eps1, eps2):
    low, high = sorted((eps1, eps2))
    assert sink.sink_rate(alpha, low) >= sink.sink_rate(alpha, high)
    assert (sink.sink_rate_by_layer(alpha, low) >= sink.sink_rate_by_layer(alpha, high)).all()
    assert sink.sink_rate(alpha, 1.0) == 0.0


@given(alphas, unit)
def test_per_layer_and_per_head_rates_are_consistent_with_the_overall_rate(alpha, eps):
    by_layer = sink.sink_rate_by_layer(alpha, eps)
    assert by_layer.shape == (alpha.shape[1],)
    assert by_layer.mean() == pytest.approx(sink.sink_rate(alpha, eps), abs=1e-12)  # equal heads per layer
    for layer in range(alpha.shape[1]):
        assert by_layer[layer] == pytest.approx(sink.sink_rate(alpha[:, layer], eps), abs=1e-12)
    np.testing.assert_allclose(sink.head_sink_frequency(alpha, eps).mean(-1), by_layer, atol=1e-12)
    assert sink.alpha_map(alpha).mean() == pytest.approx(sink.mean_sink_mass(alpha), abs=1e-12)


@given(attention(), st.integers(1, 10), st.integers(1, 10))
def test_first_k_mass_is_monotone_in_k_and_whole_once_k_covers_the_prompt(a, k1, k2):
    small, large = sorted((k1, k2))
    assert (sink.first_k_mass(a, small) <= sink.first_k_mass(a, large) + 1e-12).all()
    np.testing.assert_allclose(sink.first_k_mass(a, a.shape[-1]), 1.0, rtol=1e-12)
    first = sink.first_k_mass(a, 1)
    alpha = sink.first_token_alpha(a)
    np.testing.assert_allclose(first, alpha, atol=1e-12)  # k = 1 is alpha with query 0 included


@given(attention(), unit)
def test_sink_rate_by_key_at_position_zero_is_the_rate_of_first_token_alpha(a, eps):
    assert sink.sink_rate_by_key(a, eps)[0] == pytest.approx(sink.sink_rate(sink.first_token_alpha(a), eps))


# -- collapse metrics ----------------------------------------------------------------------------------


@given(token_matrix(), st.floats(1e-3, 1e3).flatmap(lambda c: st.sampled_from([c, -c])), st.booleans())
def test_collapse_measures_do_not_depend_on_the_scale_of_h(h, scale, exclude_sink):
    assume(np.linalg.norm(h[1:] if exclude_sink else h) > 1e-3)
    for name, value in collapse.rank_collapse_measures(h, exclude_sink).items():
        scaled = collapse.rank_collapse_measures(h * scale, exclude_sink)[name]
        assert scaled == pytest.approx(value, rel=1e-6, abs=1e-9), name


@given(token_matrix(), st.integers(0, 2**32 - 1))
def test_collapse_measures_are_invariant_to_token_order_and_spectral_ones_to_rotations(h, seed):
    rng = np.random.default_rng(seed)
    permuted = h[rng.permutation(len(h))]
    rotation = np.linalg.qr(rng.normal(size=(h.shape[1], h.shape[1])))[0]
    base = collapse.rank_collapse_measures(h)
    for name, value in collapse.rank_collapse_measures(permuted).items():
        assert value == pytest.approx(base[name], rel=1e-6, abs=1e-9), name
    rotated = collapse.rank_collapse_measures(h @ rotation)
    for name in ("frobenius_residual", "sigma1_energy", "effective_rank"):
        assert rotated[name] == pytest.approx(base[name], rel=1e-6, abs=1e-9), name


@given(token_matrix())
def test_collapse_measures_lie_in_their_ranges(h):
    n, d = h.shape
    measures = collapse.rank_collapse_measures(h)
    assert -1e-12 <= measures["frobenius_residual"] <= 1 + 1e-12
    assert 1 / min(n, d) - 1e-9 <= measures["sigma1_energy"] <= 1 + 1e-12
    assert 1 - 1e-9 <= measures["effective_rank"] <= min(n, d) + 1e-9
    assert measures["composite_residual"] >= 0


@given(arrays(np.float64, st.integers(1, 8), elements=st.floats(-1e3, 1e3, allow_nan=False, width=64)))
def test_a_matrix_of_identical_rows_has_collapsed(row):
    assume(np.linalg.norm(row) > 1e-3)
    h = np.tile(row, (5, 1))
    assert collapse.frobenius_residual(h) == pytest.approx(0, abs=1e-9)
    assert collapse.effective_rank(h) == pytest.approx(1, abs=1e-6)


# -- loss metrics ----------------------------------------------------------------------------------------


@given(st.lists(st.tuples(st.integers(0, 5000), st.floats(0, 50, allow_nan=False)), min_size=1, max_size=60))
def test_bucket_means_are_consistent_with_the_overall_mean(pairs):
    positions, nll = map(np.array, zip(*pairs, strict=True))
    buckets = loss.bucket_losses(positions, nll)
    assert buckets["n"].sum() == len(pairs)
    assert (buckets["n"] * buckets["mean_loss"]).sum() / buckets["n"].sum() == pytest.approx(
        loss.mean_loss(nll), rel=1e-9, abs=1e-12)
    index = loss.bucket_index(positions)
    assert (buckets["start"][np.searchsorted(buckets["index"], index)] <= positions).all()
    assert (positions < buckets["stop"][np.searchsorted(buckets["index"], index)]).all()


@given(arrays(np.float64, st.tuples(st.integers(1, 4), st.integers(2, 12)), elements=finite), st.data())
def test_token_nll_is_non_negative_and_torch_agrees_with_numpy(logits, data):
    targets = data.draw(arrays(np.int64, logits.shape[:-1], elements=st.integers(0, logits.shape[-1] - 1)))
    values = loss.token_nll(logits, targets)
    assert (values >= -1e-12).all()
    np.testing.assert_allclose(loss.token_nll(torch.from_numpy(logits), torch.from_numpy(targets)).numpy(), values,
                               rtol=1e-10, atol=1e-10)
    assert loss.perplexity(values) >= 1 - 1e-12


# -- captured attention on random token sequences -------------------------------------------------------


@functools.cache
def tiny(family: str):
    return ss.load(tiny_model(family))


prompts = st.lists(st.lists(st.integers(3, VOCAB - 1), min_size=1, max_size=10), min_size=1, max_size=4)


def pad(rows: list[list[int]], side: str) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, rows))
    ids, mask = torch.zeros(len(rows), width, dtype=torch.long), torch.zeros(len(rows), width, dtype=torch.long)
    for i, row in enumerate(rows):
        span = slice(0, len(row)) if side == "right" else slice(width - len(row), width)
        ids[i, span], mask[i, span] = torch.tensor(row), 1
    return ids, mask


@settings(max_examples=25)
@given(st.sampled_from(["llama", "mistral", "gemma2", "gpt_oss"]), prompts, st.sampled_from(["left", "right"]))
def test_captured_attention_rows_sum_to_one_on_real_queries(family, rows, side):
    probe = AttentionWeights()
    ids, mask = pad(rows, side)
    with CaptureEngine(tiny(family), [probe], path="eager") as engine:
        engine.forward(ids, mask)
    weights = probe.stacked().double()  # [L, B, H, T, S]
    sums = weights.sum(-1)[:, mask.bool()[:, None, :].expand(-1, weights.shape[2], -1)]
    assert (weights >= 0).all()
    if family == "gpt_oss":  # a learned sink logit takes a share: rows sum to less than one
        assert (sums <= 1 + 1e-5).all() and (sums > 0).all()
    else:
        torch.testing.assert_close(sums, torch.ones_like(sums), rtol=0, atol=1e-5)


@settings(max_examples=25)
@given(st.sampled_from(["llama", "mistral", "gemma3_text"]), prompts, st.sampled_from(["left", "right"]),
       st.sampled_from(["auto", "chunked", "eager"]), st.randoms(use_true_random=False))
def test_a_prompts_first_token_attention_does_not_depend_on_its_batch(family, rows, side, path, random):
    lm = tiny(family)

    def first_token_attention(batch: list[list[int]], padding: str) -> list[torch.Tensor]:
        probe = FirstTokenAttention()
        ids, mask = pad(batch, padding)
        with CaptureEngine(lm, [probe], path=path) as engine:
            engine.forward(ids, mask)
        return [probe.per_prompt(i)["attention"] for i in range(len(batch))]

    alone = [first_token_attention([row], "right")[0] for row in rows]
    order = list(range(len(rows)))
    random.shuffle(order)
    batched = first_token_attention([rows[i] for i in order], side)
    for position, index in enumerate(order):
        value = batched[position]
        torch.testing.assert_close(value, alone[index], rtol=0, atol=1e-5)
        assert ((value >= 0) & (value <= 1 + 1e-5)).all()

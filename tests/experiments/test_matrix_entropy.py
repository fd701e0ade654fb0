"""Matrix entropy: the metric on known matrices and against an eigendecomposition written out here, and
`matrix_entropy` (the experiment) against transformers' own eager residual stream and scan's alpha."""

from __future__ import annotations

import json

import numpy as np
import pytest

from helpers import SENTENCES, invoke, reference_residual, tiny_model, word_tokenizer
from sinkscope.experiments.matrix_entropy import matrix_entropy_by_depth
from sinkscope.experiments.scan import scan
from sinkscope.metrics.matrix_entropy import gram_spectrum, matrix_entropy
from sinkscope.models import load


def hand_entropy(z: np.ndarray, order: float) -> float:
    """From the n x n Gram matrix itself: eigenvalues / trace, then the Renyi (or von Neumann) formula."""
    gram = z @ z.T
    lam = np.clip(np.linalg.eigvalsh(gram), 0.0, None) / np.trace(gram)
    lam = lam[lam > 1e-15]
    if order == 1.0:
        return float(-(lam * np.log(lam)).sum())
    return float(np.log((lam ** order).sum()) / (1.0 - order))


def test_rank_one_has_zero_entropy():
    z = np.outer(np.array([1.0, -2.0, 0.5, 3.0]), np.array([0.3, 1.0, -1.0, 2.0, 0.1]))
    for order in (1.0, 2.0, 0.5):
        assert matrix_entropy(z, order) == pytest.approx(0.0, abs=1e-10)


def test_orthonormal_tokens_have_entropy_log_n():
    q, _ = np.linalg.qr(np.random.default_rng(0).normal(size=(16, 6)))
    z = q.T  # 6 orthonormal tokens in 16 dimensions
    for order in (1.0, 2.0, 3.0):
        assert matrix_entropy(z, order) == pytest.approx(np.log(6), abs=1e-10)
    assert matrix_entropy(5.0 * z) == pytest.approx(np.log(6))  # a common scale does not change it


@pytest.mark.parametrize("shape", [(7, 12), (12, 5), (3, 3)])
@pytest.mark.parametrize("order", [1.0, 2.0, 0.5])
def test_entropy_matches_the_gram_eigendecomposition(shape, order):
    z = np.random.default_rng(sum(shape)).normal(size=shape) * np.linspace(0.2, 3.0, shape[1])
    assert matrix_entropy(z, order) == pytest.approx(hand_entropy(z, order), abs=1e-9)
    assert 0.0 < matrix_entropy(z, order) < np.log(min(shape))


def test_centring_removes_a_direction_every_token_shares():
    q, _ = np.linalg.qr(np.random.default_rng(2).normal(size=(12, 5)))
    z = q.T + 50.0 * np.random.default_rng(3).normal(size=12)  # 5 orthonormal tokens plus one large shared vector
    assert matrix_entropy(z) < 0.1
    centred = z - z.mean(0)
    assert matrix_entropy(z, centre=True) == pytest.approx(hand_entropy(centred, 1.0), abs=1e-9)
    assert matrix_entropy(z, 2.0, centre=True) == pytest.approx(hand_entropy(centred, 2.0), abs=1e-9)
    assert matrix_entropy(z, centre=True) == pytest.approx(np.log(4), abs=1e-9)  # n - 1 equal directions left


def test_one_dominant_token_lowers_the_entropy_and_batches_broadcast():
    z = np.random.default_rng(1).normal(size=(10, 8))
    loud = z.copy()
    loud[0] *= 100.0  # a massive activation on the first token
    assert matrix_entropy(loud) < 0.1 < matrix_entropy(z)
    stacked = np.stack([z, loud])
    np.testing.assert_allclose(matrix_entropy(stacked), [matrix_entropy(z), matrix_entropy(loud)])
    np.testing.assert_allclose(gram_spectrum(stacked).sum(-1), 1.0)
    with pytest.raises(ValueError):
        matrix_entropy(z, order=0.0)


@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
def test_experiment_against_the_eager_residual_stream_and_scan(family):
    model = load(tiny_model(family), tokenizer=word_tokenizer())
    result = matrix_entropy_by_depth(model, SENTENCES[:4], max_tokens=16, progress=False)
    frame = result.to_frame("matrix_entropy")
    ids = word_tokenizer()(SENTENCES[2])["input_ids"][:16]
    residual = reference_residual(model.model, ids)  # [depths, n, d], no capture engine involved
    rows = frame[(frame["prompt"] == 2) & (frame["bos"] == "add")].sort_values("depth")
    np.testing.assert_allclose(rows["entropy"], [hand_entropy(h, 1.0) for h in residual], atol=1e-6)
    np.testing.assert_allclose(rows["renyi2"], [hand_entropy(h, 2.0) for h in residual], atol=1e-6)
    np.testing.assert_allclose(rows["entropy_without_first"], [hand_entropy(h[1:], 1.0) for h in residual], atol=1e-6)
    np.testing.assert_allclose(rows["first_norm"], np.linalg.norm(residual[:, 0], axis=-1), rtol=1e-5)
    np.testing.assert_allclose(rows["entropy_centred"], [hand_entropy(h - h.mean(0), 1.0) for h in residual],
                               atol=1e-6)
    # the sink rate per layer is scan's, on the same prompts
    scanned = scan(model, SENTENCES[:4], bos="add", max_tokens=16, progress=False)
    per_depth = result.tables["per_depth"]
    added = per_depth[per_depth["bos"] == "add"].sort_values("depth")
    assert added["layer"].isna().tolist() == [True] + [False] * 3  # depth 0 has no layer; depth d: layer d - 1
    np.testing.assert_allclose(added["sink_rate"].iloc[1:], scanned.sink_rate_by_layer(0.3))
    np.testing.assert_allclose(added["entropy"], frame[frame["bos"] == "add"].groupby("depth")["entropy"].mean())
    difference = result.summary["entropy_difference"]
    strip = frame[frame["bos"] == "strip"].groupby("depth")["entropy"].mean()
    add = frame[frame["bos"] == "add"].groupby("depth")["entropy"].mean()
    np.testing.assert_allclose([d["mean"] for d in difference["by_depth"]], add - strip, atol=1e-9)


def test_matrix_entropy_command(model_dir, prompt_file, tmp_path):
    out = tmp_path / "run"
    result = invoke("matrix-entropy", "--model", str(model_dir), "--prompts", str(prompt_file), "--max-tokens", "12",
                    "--quiet", "--out", str(out))
    assert result.exit_code == 0, result.output
    assert "valley at depth" in result.output and (out / "matrix_entropy.png").is_file()
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["conditions"]) == {"add", "strip"} and summary["n_prompts"] == 6
    bad = invoke("matrix-entropy", "--model", str(model_dir), "--eps", "0", "--quiet")
    assert bad.exit_code == 2 and "--eps" in bad.output
    resumed = invoke("matrix-entropy", "--model", str(model_dir), "--prompts", str(prompt_file), "--max-tokens", "12",
                     "--quiet", "--out", str(out), "--resume")
    assert resumed.exit_code == 0, resumed.output


@pytest.mark.bundled
@pytest.mark.slow
def test_matrix_entropy_on_a_bundled_model():
    result = matrix_entropy_by_depth("smollm2-135m", SENTENCES[:3], max_tokens=32, progress=False)
    for condition in result.summary["conditions"].values():
        assert all(0.0 <= e <= np.log(32) + 1e-9 for e in condition["entropy_by_depth"])

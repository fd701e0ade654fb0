"""Massive activations: metrics against brute force, the experiment against a plain eager forward (and a
planted massive activation), and the `massive` command."""

from __future__ import annotations

import json
import statistics

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import sinkscope as ss
import sinkscope.cli  # noqa: F401  registers the commands on the app
from helpers import SENTENCES, eager_twin, reference_residual, tiny_model, word_tokenizer
from sinkscope.cli import app
from sinkscope.errors import InputError
from sinkscope.experiments.massive import massive_activations
from sinkscope.metrics import activations

runner = CliRunner()
PLANTED_DIM = 5


def brute_top(h: np.ndarray, k: int) -> list[tuple[int, int, float]]:
    entries = [(-abs(h[t, d]), t, d) for t in range(h.shape[0]) for d in range(h.shape[1])]
    return [(t, d, float(h[t, d])) for _, t, d in sorted(entries)[:k]]




# -- metrics ---------------------------------------------------------------------------------------------
def test_ratio_of_a_hand_built_state():
    h = np.ones((4, 5))
    h[2, 3] = -1500.0
    assert activations.massive_ratio(h) == pytest.approx(1500.0)
    assert activations.median_abs(h) == 1.0 and activations.max_abs(h) == 1500.0
    assert activations.count_above_median(h, 100) == 1 and activations.count_above_median(h, 2000) == 0
    tokens, dims, values = activations.top_activations(h, 1)
    assert (tokens[0], dims[0], values[0]) == (2, 3, -1500.0)


def test_ratio_and_counts_match_loops_on_batched_states():
    rng = np.random.default_rng(0)
    h = rng.standard_cauchy(size=(3, 6, 8))  # heavy tails: some entries far above the median
    stats = activations.activation_stats(h)
    for layer in range(3):
        magnitudes = [abs(x) for x in h[layer].ravel().tolist()]
        median = statistics.median(magnitudes)
        assert stats["median_abs"][layer] == pytest.approx(median)
        assert stats["ratio"][layer] == pytest.approx(max(magnitudes) / median)
        for factor in (100, 1000):
            expected = sum(m > factor * median for m in magnitudes)
            assert stats[f"n_above_{factor}x"][layer] == expected
            assert activations.count_above_median(h, factor)[layer] == expected
    np.testing.assert_allclose(activations.massive_ratio(h), stats["ratio"])


def test_top_activations_match_brute_force_including_ties():
    rng = np.random.default_rng(1)
    h = rng.integers(-4, 5, size=(2, 5, 3)).astype(float)  # many equal magnitudes
    tokens, dims, values = activations.top_activations(h, 6)
    assert tokens.shape == dims.shape == values.shape == (2, 6)
    for layer in range(2):
        got = list(zip(tokens[layer].tolist(), dims[layer].tolist(), values[layer].tolist(), strict=True))
        assert got == brute_top(h[layer], 6)
    tokens, _, _ = activations.top_activations(h, 100)
    assert tokens.shape == (2, 15)  # capped at n * d
    with pytest.raises(ValueError, match="k must be"):
        activations.top_activations(h, 0)


def test_degenerate_states():
    assert np.isnan(activations.massive_ratio(np.zeros((3, 3))))
    h = np.zeros((3, 3))
    h[0, 0] = 1.0
    assert np.isinf(activations.massive_ratio(h))
    with pytest.raises(ValueError, match="n, d > 0"):
        activations.massive_ratio(np.ones(4))


# -- the experiment on tiny models --------------------------------------------------------------------------
def loaded(plant: float | None = None):
    model = tiny_model("llama")
    if plant is not None:  # a massive activation on <s> (id 1), carried by the residual stream
        with torch.no_grad():
            model.get_input_embeddings().weight[1, PLANTED_DIM] = plant
    return ss.load(model, tokenizer=word_tokenizer())


def test_massive_activations_match_a_plain_eager_forward():
    lm = loaded()
    result = massive_activations(lm, SENTENCES, bos=("add", "strip"), top_k=3, batch_size=4, progress=False)
    frame, top = result.to_frame(), result.to_frame("top_activations")
    n_depths = lm.info.n_layers + 1
    assert len(frame) == len(SENTENCES) * 2 * n_depths and len(top) == len(frame) * 3
    assert not frame.duplicated(["prompt", "bos", "depth"]).any()
    twin = eager_twin(lm.model)
    for condition, prefix in (("add", [1]), ("strip", [])):
        for index, sentence in enumerate(SENTENCES):
            ids = prefix + lm.tokenizer(sentence, add_special_tokens=False)["input_ids"]
            residual = reference_residual(twin, ids)
            rows = frame[(frame["bos"] == condition) & (frame["prompt"] == index)].sort_values("depth")
            magnitudes = np.abs(residual).reshape(n_depths, -1)
            np.testing.assert_allclose(rows["ratio"], magnitudes.max(1) / np.median(magnitudes, 1), rtol=1e-4)
            np.testing.assert_allclose(rows["median_abs"], np.median(magnitudes, 1), rtol=1e-4)
            tokens = lm.tokenizer.convert_ids_to_tokens(ids)
            for depth in range(n_depths):
                expected = brute_top(residual[depth], 3)
                got = top[(top["bos"] == condition) & (top["prompt"] == index) & (top["depth"] == depth)]
                got = got.sort_values("rank")
                np.testing.assert_allclose(got["value"], [v for _, _, v in expected], rtol=1e-4, atol=1e-5)
                gaps = np.diff(np.abs([v for _, _, v in expected]))
                if len(gaps) and abs(gaps[0]) > 1e-3:  # a clear winner: its coordinates must agree
                    first = got.iloc[0]
                    assert (first["token_index"], first["dim"]) == expected[0][:2]
                    assert first["token"] == tokens[expected[0][0]]
                    row = rows[rows["depth"] == depth].iloc[0]
                    assert (row["top_token_index"], row["top_dim"]) == expected[0][:2]


def test_a_planted_massive_activation_is_found_on_bos_only(tmp_path):
    result = massive_activations(loaded(plant=1e4), SENTENCES, progress=False)
    summary = result.summary["conditions"]
    frame = result.to_frame()
    with_bos = frame[frame["bos"] == "add"]
    assert (with_bos["massive_1000x"]).all()  # the residual stream carries it through every layer
    assert (with_bos["top_token"] == "<s>").all() and (with_bos["top_dim"] == PLANTED_DIM).all()
    assert summary["add"]["max_ratio_at"]["token"] == "<s>" and summary["add"]["max_ratio_at"]["dim"] == PLANTED_DIM
    assert summary["add"]["flagged_top1_at_position0"] == 1.0
    assert summary["add"]["flagged_top1_dims"] == {str(PLANTED_DIM): len(with_bos)}
    without = frame[frame["bos"] == "strip"]
    assert summary["strip"]["max_ratio"] < summary["add"]["max_ratio"] / 10
    assert not (without["top_dim"] == PLANTED_DIM).all()
    out = result.save(tmp_path / "massive")
    for name in ("massive.parquet", "massive.csv", "top_activations.parquet", "summary.json",
                 "massive_activations.png"):
        assert (out / name).is_file(), name
    saved = json.loads((out / "summary.json").read_text())
    assert saved["conditions"]["add"]["max_ratio"] == pytest.approx(frame[frame["bos"] == "add"]["ratio"].max())
    np.testing.assert_allclose(result.ratio_by_depth("add"), with_bos.groupby("depth")["ratio"].median())


def test_massive_activations_errors():
    lm = loaded()
    with pytest.raises(InputError, match="top_k"):
        massive_activations(lm, SENTENCES, top_k=0, progress=False)
    with pytest.raises(InputError, match="no prompts"):
        massive_activations(lm, [], progress=False)
    with pytest.raises(InputError, match="no rows"):
        massive_activations(lm, SENTENCES[:1], bos="add", progress=False).ratio_by_depth("strip")


# -- command line ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llama-planted")
    loaded(plant=1e4).model.save_pretrained(path)
    word_tokenizer().save_pretrained(path)
    return path


def test_cli_massive(model_dir, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(SENTENCES) + "\n")
    out = tmp_path / "massive"
    result = runner.invoke(app, ["massive", "--model", str(model_dir), "--prompts", str(prompts), "--limit", "3",
                                 "--top-k", "2", "--out", str(out), "--quiet"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_prompts"] == 3 and summary["top_k"] == 2 and summary["bos"] == ["add", "strip"]
    assert f"{summary['conditions']['add']['max_ratio']:.0f}" in result.output and "'<s>'@0" in result.output
    assert (out / "massive_activations.png").is_file()
    bad = runner.invoke(app, ["massive", "--model", str(model_dir), "--top-k", "0", "--quiet"])
    assert bad.exit_code == 2
    bad = runner.invoke(app, ["massive", "--model", str(model_dir), "--max-tokens", "1", "--quiet"],
                        catch_exceptions=False)
    assert bad.exit_code == 2 and "max_tokens" in bad.output and "Traceback" not in bad.output

"""`ablate`: loss metrics on hand-built arrays, the chunked loss against cross-entropy on the model's own
logits, the same targets in every `<bos>` condition, the offline text locator, and the CLI."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

import sinkscope.cli  # noqa: F401  registers every command on the app
from helpers import TEXT, bundled_gemma, lm, tiny_model, word_tokenizer
from sinkscope.capture import CaptureEngine
from sinkscope.cli import app
from sinkscope.errors import InputError
from sinkscope.experiments.ablate import ablate
from sinkscope.experiments.inputs import make_windows, prefix_ids, text_tokens
from sinkscope.experiments.loss import window_nll
from sinkscope.metrics.loss import (
    bucket_index,
    bucket_label,
    bucket_losses,
    delta_summary,
    perplexity,
    token_nll,
)


# -- metrics -----------------------------------------------------------------------------------------
def test_token_nll_matches_cross_entropy_for_numpy_and_torch():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 7, 50, generator=g) * 4
    targets = torch.randint(0, 50, (3, 7), generator=g)
    reference = F.cross_entropy(logits.reshape(-1, 50), targets.reshape(-1), reduction="none").reshape(3, 7)
    got = token_nll(logits, targets)
    assert isinstance(got, torch.Tensor) and torch.allclose(got, reference, atol=1e-5)
    got_np = token_nll(logits.numpy(), targets.numpy())
    assert isinstance(got_np, np.ndarray)
    np.testing.assert_allclose(got_np, reference.numpy(), atol=1e-5)
    huge = np.array([[1000.0, 0.0]])  # the shifted log-sum-exp does not overflow
    np.testing.assert_allclose(token_nll(huge, [1]), [1000.0])


def test_position_buckets_hand_checked():
    positions = [0, 1, 63, 64, 255, 256, 1023, 1024, 4095, 4096, 16383, 16384]
    assert bucket_index(positions).tolist() == [0, 0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5]
    assert [bucket_label(i) for i in range(5)] == ["0-63", "64-255", "256-1023", "1024-4095", "4096-16383"]
    losses = bucket_losses([1, 2, 63, 64, 300], [1.0, 2.0, 3.0, 10.0, 7.0])
    assert losses["bucket"].tolist() == ["0-63", "64-255", "256-1023"]
    assert losses["n"].tolist() == [3, 1, 1]
    assert losses["mean_loss"].tolist() == [2.0, 10.0, 7.0]
    assert losses["start"].tolist() == [0, 64, 256] and losses["stop"].tolist() == [64, 256, 1024]
    with pytest.raises(ValueError):
        bucket_index([-1])


def test_perplexity_and_delta_summary():
    assert perplexity([1.0, 3.0]) == pytest.approx(math.exp(2.0))
    assert perplexity(0.0) == 1.0 and perplexity(1e6) == math.inf
    summary = delta_summary([1.0, 1.0, 2.0, 2.0], [2.0, 1.0, 3.0, 4.0])
    assert summary["delta_loss"] == pytest.approx(1.0)
    assert summary["delta_se"] == pytest.approx(np.std([1, 0, 1, 2], ddof=1) / 2)
    assert summary["fraction_worse"] == 0.75 and summary["ppl_ratio"] == pytest.approx(math.e)
    with pytest.raises(ValueError, match="not the same tokens"):
        delta_summary([1.0], [1.0, 2.0])


# -- chunked loss vs the model's logits --------------------------------------------------------------
@pytest.mark.parametrize("family", ["llama", "gemma2", "gemma3_text", "gpt2", "qwen3"])
@pytest.mark.parametrize("prefix", [[1], []])
def test_chunked_loss_equals_cross_entropy_on_model_logits(family, prefix):
    model = tiny_model(family)
    if family == "gemma2":
        model.config.final_logit_softcapping = 1.5  # small enough to matter for these logits
    windows = torch.randint(3, 90, (2, 21), generator=torch.Generator().manual_seed(2))
    with CaptureEngine(model, []) as engine:
        got = window_nll(engine, windows, prefix, chunk=7)  # several chunks, the last one partial
    ids = torch.cat([torch.tensor(prefix, dtype=torch.long).repeat(2, 1), windows], 1)
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    k = len(prefix)
    predicting = logits[:, k: k + 20]  # text token j (position k + j) is predicted at k + j - 1
    reference = F.cross_entropy(predicting.reshape(-1, predicting.shape[-1]), windows[:, 1:].reshape(-1),
                                reduction="none").view(2, 20)
    assert got.shape == (2, 20)
    assert (got - reference).abs().max() <= 1e-4
    if family == "gemma2":  # the soft-cap was applied, not skipped
        raw = model.get_output_embeddings()(model.model(input_ids=ids).last_hidden_state)[:, k: k + 20]
        uncapped = F.cross_entropy(raw.reshape(-1, raw.shape[-1]), windows[:, 1:].reshape(-1), reduction="none")
        assert (uncapped.view(2, 20) - reference).abs().max() > 1e-2


# -- the experiment ----------------------------------------------------------------------------------
def test_same_targets_in_every_condition_and_independent_losses():
    model = lm()
    result = ablate(model, TEXT, bos=["add", "strip", "replace:\\n", "replace:eos"], window=24, max_windows=3,
                    per_token=True, progress=False)
    tokens = result.to_frame("tokens")
    per_condition = {c: g.reset_index(drop=True) for c, g in tokens.groupby("condition", sort=False)}
    reference = per_condition["add"]
    for frame in per_condition.values():
        assert frame[["window", "position", "target"]].equals(reference[["window", "position", "target"]])
    assert reference["position"].min() == 1 and reference["position"].max() == 23  # first text token left out
    text_ids = word_tokenizer()(TEXT, add_special_tokens=False)["input_ids"]
    for condition, prefix in (("add", [1]), ("strip", []), ("replace:\\n", [4]), ("replace:eos", [2])):
        for window in range(3):
            chunk = text_ids[24 * window: 24 * (window + 1)]
            with torch.no_grad():
                logits = model.model(input_ids=torch.tensor([prefix + chunk])).logits[0]
            expected = F.cross_entropy(logits[len(prefix): len(prefix) + 23], torch.tensor(chunk[1:]), reduction="none")
            got = per_condition[condition].query(f"window == {window}")["nll"].to_numpy()
            np.testing.assert_allclose(got, expected.numpy(), atol=1e-4)
    summary = result.summary
    assert summary["first_tokens"] == {"add": "<s>", "strip": "(first text token)", "replace:\\n": "\n",
                                       "replace:eos": "</s>"}
    assert {v["n_tokens"] for v in summary["loss"].values()} == {3 * 23}
    strip = per_condition["strip"]["nll"].to_numpy()
    assert summary["loss"]["strip"]["mean_loss"] == pytest.approx(strip.mean(), abs=1e-5)
    delta = strip.mean() - reference["nll"].mean()
    assert summary["loss"]["strip"]["delta_loss_vs_add"] == pytest.approx(delta, abs=1e-5)
    assert summary["by_bucket"]["add"].keys() == {"0-63"}


def test_buckets_table_and_files(tmp_path):
    result = ablate(lm(), TEXT, bos=["add", "strip"], window=100, max_windows=1, progress=False)
    frame = result.to_frame()
    assert frame["bucket"].tolist() == ["0-63", "64-255"] * 2
    assert frame["n_tokens"].tolist() == [63, 36] * 2  # positions 1-63 and 64-99
    result.save(tmp_path)
    for name in ("ablate.parquet", "ablate.csv", "summary.json", "loss_by_position.png"):
        assert (tmp_path / name).is_file(), name
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["provenance"]["experiment"] == "ablate" and summary["provenance"]["settings"]["text"] == "string"


def test_windows_prefixes_and_errors():
    assert [s for s, _ in make_windows(list(range(10)), 4)] == [0, 4]
    assert [s for s, _ in make_windows(list(range(10)), 4, stride=3, max_windows=2)] == [0, 3]
    assert make_windows([5, 6, 7], 8) == [(0, [5, 6, 7])]  # shorter than a window: one window of it all
    with pytest.raises(InputError):
        make_windows([1], 4)
    tokenizer = word_tokenizer()
    assert prefix_ids(tokenizer, "add") == [1] and prefix_ids(tokenizer, "strip") == []
    assert prefix_ids(tokenizer, "replace:\\n") == [4] and prefix_ids(tokenizer, "replace:eos") == [2]
    long_text = " ".join([TEXT] * 50)  # long enough that only its head is encoded
    assert text_tokens(tokenizer, long_text, needed=30) == text_tokens(tokenizer, TEXT)[:30]
    with pytest.raises(InputError, match="exceeds"):
        ablate(lm(), TEXT * 3, window=300, max_windows=1, progress=False)


# -- CLI ---------------------------------------------------------------------------------------------
def test_ablate_command(tmp_path, model_dir):
    text = tmp_path / "t.txt"
    text.write_text(TEXT, encoding="utf-8")
    out = tmp_path / "run"
    runner = CliRunner()
    result = runner.invoke(app, ["ablate", "--model", str(model_dir), "--text", str(text), "--window", "40",
                                 "--max-windows", "2", "--out", str(out), "--quiet"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["conditions"] == ["add", "strip", "replace:\\n", "replace:eos"] and summary["n_windows"] == 2
    assert (out / "loss_by_position.png").is_file()
    bad = runner.invoke(app, ["ablate", "--model", str(model_dir), "--text", str(tmp_path / "nope.txt"), "--quiet"])
    assert bad.exit_code == 2
    assert bad.output.strip().count("\n") == 0 and "no such text file" in bad.output


@pytest.mark.bundled
def test_gemma3_loss_rises_without_its_bos():
    result = ablate(bundled_gemma(), bos=["add", "strip"], window=96, max_windows=1, progress=False)
    loss = result.summary["loss"]
    assert loss["strip"]["mean_loss"] > loss["add"]["mean_loss"] + 0.3
    assert 1.0 < loss["add"]["mean_loss"] < 6.0

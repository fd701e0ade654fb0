"""`scan` end to end on tiny models: values against an independent eager computation, files, resume."""

from __future__ import annotations

import importlib
import json

import numpy as np
import pandas as pd
import pytest
import torch

import sinkscope as ss
from helpers import SENTENCES, eager_twin, tiny_model, word_tokenizer
from sinkscope.errors import InputError, TokenizationError
from sinkscope.metrics import sink

scan_module = importlib.import_module("sinkscope.experiments.scan")


def loaded(family: str = "llama", **kwargs):
    return ss.load(tiny_model(family, **kwargs), tokenizer=word_tokenizer())


def reference_alpha(model, sequences) -> np.ndarray:
    """Gu et al.'s alpha from transformers' eager attention matrices, one prompt at a time."""
    twin = eager_twin(model)
    out = []
    for seq in sequences:
        with torch.no_grad():
            attentions = twin(input_ids=torch.tensor([seq]), output_attentions=True).attentions
        out.append(np.stack([sink.first_token_alpha(a[0].numpy()) for a in attentions]))
    return np.stack(out)


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2"])
def test_alpha_matches_eager_attention_matrices(family):
    lm = loaded(family)
    result = ss.scan(lm, SENTENCES, bos="add", batch_size=4, progress=False)
    sequences = [[1] + lm.tokenizer(s, add_special_tokens=False)["input_ids"] for s in SENTENCES]
    expected = reference_alpha(lm.model, sequences)
    assert result.alpha.shape == (len(SENTENCES), 3, 4)
    np.testing.assert_allclose(result.alpha, expected, atol=1e-5)
    assert result.sink_rate(0.3) == pytest.approx(sink.sink_rate(result.alpha, 0.3))
    frame = result.to_frame()
    assert len(frame) == len(SENTENCES) * 3 * 4
    assert {"prompt", "layer", "head", "alpha", "first_token", "layer_type", "n_tokens"} <= set(frame.columns)
    assert [t["token"] for t in result.first_tokens] == ["<s>"] * len(SENTENCES)


def test_sliding_layers_average_only_queries_that_see_the_first_token():
    lm = loaded("gemma3_text")
    long_text = " ".join(SENTENCES[:2])  # 20 tokens > window 6
    result = ss.scan(lm, [long_text], bos="add", max_tokens=None, progress=False)
    seq = [1] + lm.tokenizer(long_text, add_special_tokens=False)["input_ids"]
    twin = eager_twin(lm.model)
    with torch.no_grad():
        attentions = twin(input_ids=torch.tensor([seq]), output_attentions=True).attentions
    window = lm.model.config.sliding_window
    for layer, kind in enumerate(lm.info.layer_types):
        column = attentions[layer][0, :, :, 0].numpy()  # [H, T]
        visible = slice(0, window) if kind == "sliding_attention" else slice(None)
        np.testing.assert_allclose(result.alpha[0, layer], column[:, visible].mean(-1), atol=1e-5)
    assert (result.frame.query("layer_type == 'sliding_attention'")["n_visible"] == window).all()


def test_bos_conditions_and_input_ids(tokenizer):
    lm = loaded()
    stripped = ss.scan(lm, SENTENCES[:2], bos="strip", progress=False)
    assert [t["token"] for t in stripped.first_tokens] == ["the", "a"]
    replaced = ss.scan(lm, SENTENCES[:2], bos="replace:</s>", progress=False)
    assert {t["id"] for t in replaced.first_tokens} == {2}
    ids = [[5, 6, 7, 8], [9, 10, 11]]
    given = ss.scan(lm, input_ids=ids, progress=False)
    assert given.meta["bos"] == "given" and [t["id"] for t in given.first_tokens] == [5, 9]
    np.testing.assert_allclose(given.alpha, reference_alpha(lm.model, ids), atol=1e-5)
    no_bos = ss.load(tiny_model("llama"), tokenizer=word_tokenizer(with_bos=False))
    with pytest.raises(TokenizationError, match="prompt 0"):
        ss.scan(no_bos, SENTENCES, bos="add", progress=False)
    with pytest.raises(InputError, match="token ids"):
        ss.scan(lm, input_ids=[[1, 500]], progress=False)


def test_learned_sink_mass_is_reported_for_gpt_oss():
    result = ss.scan(loaded("gpt_oss"), SENTENCES[:3], bos="add", progress=False)
    assert result.sink_logit_mass is not None and result.sink_logit_mass.max() > 0.01
    assert "learned_sink_mass" in result.summary
    assert ss.scan(loaded("llama"), SENTENCES[:1], progress=False).sink_logit_mass is None


def test_outputs_written_and_reloaded(tmp_path):
    out = tmp_path / "run"
    result = ss.scan(loaded(), SENTENCES, bos="add", out=out, progress=False, eps=(0.3, 0.8))
    for name in ("alpha.parquet", "summary.json", "per_layer.csv", "alpha_heatmap.png", "run.json"):
        assert (out / name).is_file(), name
    summary = json.loads((out / "summary.json").read_text())
    for key in ("model", "bos", "first_tokens", "n_prompts", "n_layers", "n_heads", "sink_rate", "alpha_mean"):
        assert key in summary
    assert summary["sink_rate"]["0.3"] == pytest.approx(result.sink_rate(0.3))
    assert np.array(summary["alpha_mean"]).shape == (3, 4)
    assert summary["provenance"]["versions"]["sinkscope"] == ss.__version__
    again = ss.ScanResult.load(out)
    np.testing.assert_array_equal(again.alpha, result.alpha)
    with pytest.raises(InputError, match="--resume"):
        ss.scan(loaded(), SENTENCES, bos="add", out=out, progress=False)
    with pytest.raises(InputError, match="bos"):
        ss.scan(loaded(), SENTENCES, bos="strip", out=out, resume=True, progress=False)


def test_resume_after_interrupt_loses_and_duplicates_nothing(tmp_path, monkeypatch):
    out = tmp_path / "run"
    full = ss.scan(loaded(), SENTENCES, bos="add", batch_size=2, progress=False)
    original = scan_module._rows_for_batch
    calls = {"n": 0}

    def interrupted(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(scan_module, "_rows_for_batch", interrupted)
    with pytest.raises(KeyboardInterrupt):
        ss.scan(loaded(), SENTENCES, bos="add", batch_size=2, out=out, progress=False)
    assert len(list((out / "parts").glob("*.done"))) == 1
    monkeypatch.setattr(scan_module, "_rows_for_batch", original)
    resumed = ss.scan(loaded(), SENTENCES, bos="add", batch_size=2, out=out, resume=True, progress=False)
    assert not resumed.frame.duplicated(["prompt", "layer", "head"]).any()
    pd.testing.assert_frame_equal(resumed.frame, full.frame, check_exact=False, atol=1e-6)


def test_per_position_rows_match_eager_attention_on_sliding_layers(tmp_path):
    lm = loaded("gemma3_text")
    long_text = " ".join(SENTENCES[:3])  # longer than the window: sliding layers lose position 0
    result = ss.scan(lm, [long_text, SENTENCES[0]], bos="add", max_tokens=None, per_position=True,
                     batch_size=2, progress=False, out=tmp_path / "run")
    positions = result.tables["positions"]
    seq = [1] + lm.tokenizer(long_text, add_special_tokens=False)["input_ids"]
    twin = eager_twin(lm.model)
    with torch.no_grad():
        attentions = twin(input_ids=torch.tensor([seq]), output_attentions=True).attentions
    window = lm.model.config.sliding_window
    first = positions[positions["prompt"] == 0]
    for layer, kind in enumerate(lm.info.layer_types):
        expected = attentions[layer][0, :, :, 0].numpy().copy()  # [H, T]
        if kind == "sliding_attention":
            expected[:, window:] = np.nan  # the window no longer holds position 0
        got = first[first["layer"] == layer].pivot(index="head", columns="position", values="attention").to_numpy()
        np.testing.assert_allclose(got, expected, atol=1e-5)
    # alpha is the mean over the visible positions of this table
    mean = positions.groupby(["prompt", "layer", "head"])["attention"].mean().to_numpy()
    np.testing.assert_allclose(mean, result.frame["alpha"].to_numpy(), atol=1e-6)
    assert (tmp_path / "run" / "positions.parquet").is_file()
    assert (tmp_path / "run" / "first_token_by_position.png").is_file()

"""The shared experiment protocol: inputs (text span by alignment, batching) and `run` (resume, fingerprint)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

import sinkscope as ss
from helpers import SENTENCES, tiny_model, word_tokenizer
from sinkscope.errors import InputError, TokenizationError
from sinkscope.experiments import base
from sinkscope.experiments.inputs import encode_prompts, length_batches, prefix_ids, text_span


def loaded(with_eos: bool = False, **kwargs):
    return ss.load(tiny_model("llama", **kwargs), tokenizer=word_tokenizer(with_eos=with_eos))


@pytest.mark.parametrize(("ids", "text", "span"), [
    ([1, 5, 6, 7], [5, 6, 7], (1, 4)),  # <bos> + text
    ([5, 6, 7], [5, 6, 7], (0, 3)),  # text only
    ([1, 5, 6, 7, 2], [5, 6, 7], (1, 4)),  # <bos> + text + <eos>
    ([1, 5, 6], [5, 6, 7, 8], (1, 3)),  # cut by max_tokens
    ([1, 5, 5, 5, 2], [5, 5, 5], (1, 4)),  # repeated tokens
    ([9, 5, 6], [5, 6], (1, 3)),  # a replacement token
])
def test_text_span_finds_the_text_tokens_by_alignment(ids, text, span):
    assert text_span(ids, text) == span


def test_text_span_refuses_a_sequence_without_the_text():
    with pytest.raises(TokenizationError, match="text tokens"):
        text_span([1, 2, 3], [7, 8])


def test_eos_appending_tokenizer_spans_exclude_the_eos():
    """--bos auto with a tokenizer that appends </s>: the text span is the same tokens as under add (the
    length arithmetic len(ids) - len(text) was off by one here, and by two for short prompts)."""
    lm = loaded(with_eos=True)
    auto, add = (encode_prompts(lm, SENTENCES[:3], [mode], 64) for mode in ("auto", "add"))
    for a, b in zip(auto, add, strict=True):
        assert a.ids[-1] == 2 and a.text_stop == len(a.ids) - 1
        assert a.text_ids == b.text_ids and a.text_start == b.text_start == 1
    short = encode_prompts(lm, ["the cat"], ["auto"], 64)[0]
    assert short.ids == [1, 5, 7, 2] and (short.text_start, short.text_stop) == (1, 3)
    assert prefix_ids(lm.tokenizer, "auto") == [1]
    cut = encode_prompts(lm, [SENTENCES[0]], ["auto"], 4)[0]  # eos cut away by max_tokens
    assert cut.ids[-1] != 2 and (cut.text_start, cut.text_stop) == (1, 4)


def test_length_batches_respect_size_and_token_budget():
    assert length_batches([4, 4, 4, 4, 4], 2) == [[0, 1], [2, 3], [4]]
    batches = length_batches([10, 10, 100, 10], 8, tokens_per_batch=150)
    assert sorted(i for b in batches for i in b) == [0, 1, 2, 3]
    assert all(max([10, 10, 100, 10][i] for i in b) * len(b) <= 150 or len(b) == 1 for b in batches)
    with pytest.raises(InputError):
        length_batches([3], 0)


def test_resume_redoes_a_batch_whose_marker_is_missing(tmp_path, monkeypatch):
    """A kill between a batch's tables and its marker leaves the batch unfinished: it is measured again."""
    out = tmp_path / "run"
    full = ss.scan(loaded(), SENTENCES, bos="add", batch_size=2, progress=False)
    real = base.RunDir.write_batch

    def torn(self, index, tables, seconds=None):
        real(self, index, tables, seconds)
        if index == 1:
            self._batch_dir(index).with_suffix(".done").unlink()
            raise KeyboardInterrupt

    monkeypatch.setattr(base.RunDir, "write_batch", torn)
    with pytest.raises(KeyboardInterrupt):
        ss.scan(loaded(), SENTENCES, bos="add", batch_size=2, out=out, progress=False)
    monkeypatch.setattr(base.RunDir, "write_batch", real)
    assert sorted(p.name for p in (out / "parts").glob("*.done")) == ["batch-000000.done"]
    resumed = ss.scan(loaded(), SENTENCES, bos="add", batch_size=2, out=out, resume=True, progress=False)
    pd.testing.assert_frame_equal(resumed.frame, full.frame, check_exact=False, atol=1e-6)


@pytest.mark.parametrize(("first", "second", "named"), [
    ({"precision": "float32"}, {"precision": "float64"}, "precision"),
    ({"path": "fused"}, {"path": "eager"}, "path"),
    ({"batch_size": 2}, {"batch_size": 3}, "batch_size"),
    ({"max_tokens": 64}, {"max_tokens": 8}, "max_tokens"),
])
def test_resume_refuses_a_run_with_other_settings(tmp_path, first, second, named):
    """Every setting that changes a number is in the fingerprint (precision and kernel path were not)."""
    out = tmp_path / "run"
    ss.scan(loaded(), SENTENCES[:2], bos="add", out=out, progress=False, **first)
    with pytest.raises(InputError, match=named):
        ss.scan(loaded(), SENTENCES[:2], bos="add", out=out, resume=True, progress=False, **second)


def test_resume_refuses_a_model_in_another_dtype(tmp_path):
    import torch

    out = tmp_path / "run"
    ss.scan(loaded(), SENTENCES[:2], bos="add", out=out, progress=False)
    half = loaded()
    half.model.to(torch.bfloat16)
    half.info.dtype = "bfloat16"
    with pytest.raises(InputError, match="dtype"):
        ss.scan(half, SENTENCES[:2], bos="add", out=out, resume=True, progress=False)


def test_saved_result_loads_back_as_its_experiment(tmp_path):
    out = tmp_path / "run"
    result = ss.scan(loaded(), SENTENCES[:3], bos="add", out=out, progress=False)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["experiment"] == "scan" and summary["provenance"]["settings"]["bos"] == "add"
    again = base.Result.load(out)
    assert isinstance(again, ss.ScanResult)
    np.testing.assert_array_equal(again.alpha, result.alpha)
    assert set(again.figures()) == {"alpha_heatmap"}


def test_reuse_loads_a_finished_run_resumes_an_unfinished_one_and_replaces_a_stale_one(tmp_path, monkeypatch):
    """The rule `paper` runs each experiment under (`run(..., reuse=True, replace_stale=True)`), kept by
    `RunDir.start`: the same fingerprint finished is loaded (nothing measured), unfinished is continued, another
    fingerprint is deleted and measured anew."""
    from sinkscope.experiments.inputs import prompt_list
    from sinkscope.experiments.scan import Scan

    out = tmp_path / "run"

    def scan(**settings):
        experiment = Scan(prompts=prompt_list(SENTENCES[:4]), bos="add", batch_size=2, **settings)
        return base.run(experiment, loaded(), out=out, resume=True, reuse=True, replace_stale=True, progress=False)

    first = scan()
    assert first.run_status == "measured"
    seconds = base.RunDir(out).batch_seconds()
    assert sorted(seconds) == [0, 1] and all(s is not None and s >= 0 for s in seconds.values())
    measured = []
    monkeypatch.setattr(base, "_measure", lambda *args, **kwargs: measured.append(1) or {})
    again = scan()
    assert again.run_status == "reused" and not measured
    np.testing.assert_array_equal(again.alpha, first.alpha)
    monkeypatch.undo()
    (out / "summary.json").unlink()
    (out / "parts" / "batch-000001.done").unlink()
    resumed = scan()
    assert resumed.run_status == "resumed"
    np.testing.assert_allclose(resumed.alpha, first.alpha, rtol=0, atol=1e-6)  # float32 sums, another batch order
    other = scan(max_tokens=8)
    assert other.run_status == "measured" and other.summary["provenance"]["settings"]["max_tokens"] == 8
    assert len(list((out / "parts").glob("*.done"))) == 2  # the stale run's parts are gone, the new run's written

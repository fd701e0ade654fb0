"""Where the text starts under a `<bos>` condition when the tokenizer also appends `<eos>` (``--bos auto``):
passkey's key position and ablate/knockout's prefix are found by alignment, not by length arithmetic
(``len(ids) - len(text)`` counted the appended `<eos>` as prefix)."""

from __future__ import annotations

import numpy as np
import pytest

import sinkscope as ss
from helpers import KEY_START, TEXT, passkey_tokenizer, tiny_model, word_tokenizer


def with_eos(tokenizer):
    """The same tokenizer, appending </s> by default (as some tokenizers do): auto gives <s> text </s>."""
    from tokenizers import processors

    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", special_tokens=[("<s>", 1), ("</s>", 2)])
    return tokenizer


def test_the_test_tokenizers_append_eos():
    for tokenizer in (with_eos(passkey_tokenizer()), word_tokenizer(with_eos=True)):
        ids = tokenizer("the grass is green")["input_ids"]
        assert ids[0] == 1 and ids[-1] == 2


def test_passkey_key_position_points_at_the_key_sentence_with_an_eos_appending_tokenizer():
    tokenizer = with_eos(passkey_tokenizer())
    loaded = ss.load(tiny_model("llama"), tokenizer=tokenizer)
    result = ss.passkey(loaded, lengths=[120, 160], depths=[0.2, 0.8], trials=1, bos=["auto", "add"],
                        max_new_tokens=1, progress=False)
    frame = result.to_frame()
    for row in frame.itertuples():
        text = make_text(tokenizer, row)
        ids = tokenizer(text)["input_ids"] if row.bos == "auto" else [1] + tokenizer(text, add_special_tokens=False)[
            "input_ids"]
        assert row.n_tokens == len(ids)
        assert tokenizer.convert_ids_to_tokens(ids[row.key_position: row.key_position + 4]) == KEY_START.split()
    positions = frame.pivot_table("key_position", ["length", "depth", "trial"], "bos")
    assert (positions["auto"] == positions["add"]).all()  # the appended </s> does not move the key


def make_text(tokenizer, row) -> str:
    from sinkscope.data.passkey import make_passkey_prompt

    return make_passkey_prompt(tokenizer, row.length, row.depth, key=row.key).text


@pytest.mark.parametrize("experiment", ["ablate", "knockout"])
def test_auto_with_an_eos_appending_tokenizer_scores_the_same_tokens_as_add(experiment):
    loaded = ss.load(tiny_model("llama"), tokenizer=word_tokenizer(with_eos=True))
    if experiment == "ablate":
        result = ss.ablate(loaded, TEXT, bos=["auto", "add"], window=16, max_windows=2, per_token=True,
                           progress=False)
        assert result.summary["prefix_ids"] == {"auto": [1], "add": [1]}
        assert result.summary["first_tokens"]["auto"] == "<s>"
        tokens = result.to_frame("tokens")
        auto, add = (tokens[tokens["condition"] == c].reset_index(drop=True) for c in ("auto", "add"))
        assert auto[["window", "position", "target"]].equals(add[["window", "position", "target"]])
        np.testing.assert_array_equal(auto["nll"], add["nll"])
    else:
        auto = ss.knockout(loaded, TEXT, bos="auto", window=12, max_windows=1, per_head=False, progress=False)
        add = ss.knockout(loaded, TEXT, bos="add", window=12, max_windows=1, per_head=False, progress=False)
        assert auto.summary["first_token"] == "<s>"
        assert auto.summary["baseline"] == add.summary["baseline"]
        np.testing.assert_array_equal(auto.to_frame()["loss"], add.to_frame()["loss"])

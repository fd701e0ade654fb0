"""The explain experiments on the shared protocol: one definition of alpha (scan's), text spans found by
alignment (a tokenizer that appends `<eos>`), determinism, and resuming a run directory."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

import sinkscope as ss
from helpers import SENTENCES, tiny_model, word_tokenizer

LONG_TEXT = " ".join(SENTENCES[:2])  # 20 tokens: longer than the tiny sliding window of 6
TRIGGER_TEXTS = ["the cat , sat on the mat , then it ran", "a dog , ran over the hills , and the sun rose"]


def eos_tokenizer():
    """The word tokenizer, but its default encoding is '<s> text </s>' (as some tokenizers do)."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    backend = word_tokenizer().backend_tokenizer
    backend.post_processor = processors.TemplateProcessing(single="<s> $A </s>",
                                                           special_tokens=[("<s>", 1), ("</s>", 2)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")


def loaded(family: str = "llama", tokenizer=None):
    return ss.load(tiny_model(family), tokenizer=tokenizer or word_tokenizer())


# -- issue 9 §1.6: noop's alpha is scan's alpha ------------------------------------------------------------
def test_noop_alpha_equals_scan_alpha_on_sliding_layers():
    lm = loaded("gemma3_text")
    noop = ss.noop(lm, [LONG_TEXT], bos=["add"], max_tokens=None, progress=False).to_frame()
    scan = ss.scan(lm, [LONG_TEXT], bos="add", max_tokens=None, progress=False)
    assert set(lm.info.layer_types) == {"sliding_attention", "full_attention"}
    for layer in range(lm.info.n_layers):
        got = noop[noop["layer"] == layer].sort_values("head")["alpha"].to_numpy()
        np.testing.assert_allclose(got, scan.alpha[0, layer], atol=1e-6, err_msg=f"layer {layer}")


def test_noop_counts_only_queries_that_can_see_position_0():
    lm = loaded("gemma3_text")
    frame = ss.noop(lm, [LONG_TEXT], bos=["add"], max_tokens=None, progress=False).to_frame()
    window = lm.model.config.sliding_window
    for layer, kind in enumerate(lm.info.layer_types):
        rows = frame[frame["layer"] == layer]
        # text queries 1..: on a sliding layer only those inside the window of position 0
        expected = window - 1 if kind == "sliding_attention" else rows["n_tokens"].iloc[0] - 1
        assert (rows["n_queries"] == expected).all(), (layer, kind)


def test_conditional_heads_alpha_counts_only_queries_that_can_see_position_0():
    lm = loaded("gemma3_text")
    texts = [" ".join(["the cat , sat on the mat ,"] * 3)]  # commas beyond the window of 6
    result = ss.conditional_heads(lm, texts, trigger=",", progress=False)
    queries = result.to_frame("queries")
    for kind, layer in ((k, i) for i, k in enumerate(lm.info.layer_types)):
        rows = queries[queries["layer"] == layer]
        if kind == "sliding_attention":
            assert not rows.loc[rows["position"] >= lm.model.config.sliding_window, "sees_first"].any()
        visible = rows[rows["sees_first"] & rows["follows_trigger"]]
        expected = visible.groupby("head")["first_attention"].mean()
        got = result.to_frame().query(f"layer == {layer}").set_index("head")["alpha_trigger"]
        np.testing.assert_allclose(got.sort_index(), expected.sort_index(), rtol=1e-6)


# -- issue 9 §1.4: a tokenizer that appends <eos> under --bos auto ---------------------------------------------
@pytest.fixture(scope="module")
def eos_lm():
    return loaded("llama", eos_tokenizer())


def test_text_span_excludes_the_appended_eos(eos_lm):
    from sinkscope.experiments.inputs import encode_prompts

    auto = encode_prompts(eos_lm, SENTENCES, ["auto"], 64)
    add = encode_prompts(eos_lm, SENTENCES, ["add"], 64)
    for a, b in zip(auto, add, strict=True):
        assert a.ids[-1] == 2 and a.ids == b.ids + [2]
        assert (a.text_start, a.text_stop) == (1, len(a.ids) - 1)
        assert a.text_ids == b.text_ids


def test_smoothing_auto_with_eos_equals_add(eos_lm):
    frame = ss.attention_smoothing(eos_lm, SENTENCES[:3], bos=["auto", "add"], progress=False).to_frame()
    auto, add = (frame[frame["bos"] == b].drop(columns=["bos", "condition"]).reset_index(drop=True)
                 for b in ("auto", "add"))
    pd.testing.assert_frame_equal(auto, add, check_exact=False, rtol=1e-5, atol=1e-6)


def test_noop_text_queries_under_auto_with_eos_equal_add(eos_lm):
    frame = ss.noop(eos_lm, SENTENCES[:3], bos=["auto", "add"], progress=False).to_frame()
    columns = ["first_share", "sinking_fraction", "output_norm_sinking", "output_norm_other", "n_queries"]
    auto, add = (frame[frame["bos"] == b][columns].reset_index(drop=True) for b in ("auto", "add"))
    pd.testing.assert_frame_equal(auto, add, check_exact=False, rtol=1e-5, atol=1e-6)


def test_conditional_heads_auto_with_eos_equals_add(eos_lm):
    runs = {bos: ss.conditional_heads(eos_lm, TRIGGER_TEXTS, trigger=",", bos=bos, progress=False)
            for bos in ("auto", "add")}
    auto, add = (runs[b].to_frame().drop(columns="condition") for b in ("auto", "add"))  # the label differs
    pd.testing.assert_frame_equal(auto, add, check_exact=False, rtol=1e-5, atol=1e-6)
    for key in ("n_trigger_queries", "n_other_queries"):
        assert runs["auto"].summary[key] == runs["add"].summary[key]


def test_perturb_auto_with_eos_equals_add(eos_lm):
    result = ss.perturb(eos_lm, SENTENCES[0], swap=("cat", "dog"), bos=["auto", "add"], progress=False)
    frame = result.to_frame()
    auto, add = (frame[frame["bos"] == b].drop(columns=["bos", "condition"]).reset_index(drop=True)
                 for b in ("auto", "add"))
    pd.testing.assert_frame_equal(auto, add)
    assert len(add) == (eos_lm.info.n_layers + 1) * len(SENTENCES[0].split())  # no </s> among the tokens
    conditions = result.summary["conditions"]
    assert conditions["auto"] == conditions["add"]


def test_oversquash_auto_with_eos_targets_the_last_text_token(eos_lm):
    result = ss.oversquash(eos_lm, SENTENCES[0], probes=3, bos=["auto", "add"], progress=False)
    assert result.summary["target_token"] == SENTENCES[0].split()[-1]
    frame = result.to_frame()
    auto, add = (frame[frame["bos"] == b].drop(columns=["bos", "condition"]).reset_index(drop=True)
                 for b in ("auto", "add"))
    pd.testing.assert_frame_equal(auto, add)


def test_repr_collapse_auto_with_eos_equals_add(eos_lm):
    frame = ss.representational_collapse(eos_lm, lengths=(3, 7), text=" ".join(SENTENCES), bos=["auto", "add"],
                                         progress=False).to_frame()
    auto, add = (frame[frame["bos"] == b].drop(columns=["bos", "condition"]).reset_index(drop=True)
                 for b in ("auto", "add"))
    pd.testing.assert_frame_equal(auto, add)


# -- issue 9 §3: determinism ----------------------------------------------------------------------------------
def test_perturb_twice_gives_identical_numbers():
    first, second = (ss.perturb(loaded(), SENTENCES[0], swap=("cat", "dog"), progress=False) for _ in range(2))
    pd.testing.assert_frame_equal(first.to_frame(), second.to_frame(), check_exact=True)
    drop = ("provenance",)
    assert {k: v for k, v in first.summary.items() if k not in drop} == \
        {k: v for k, v in second.summary.items() if k not in drop}


# -- resume ------------------------------------------------------------------------------------------------------
def test_massive_resumes_after_an_interrupt_without_losing_or_repeating_rows(tmp_path, monkeypatch):
    from sinkscope.experiments.massive import MassiveActivations

    full = ss.massive_activations(loaded(), SENTENCES, batch_size=2, progress=False)
    original = MassiveActivations.measure
    calls = {"n": 0}

    def interrupted(self, ctx, engine, units):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return original(self, ctx, engine, units)

    monkeypatch.setattr(MassiveActivations, "measure", interrupted)
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        ss.massive_activations(loaded(), SENTENCES, batch_size=2, out=out, progress=False)
    assert len(list((out / "parts").glob("*.done"))) == 2
    monkeypatch.setattr(MassiveActivations, "measure", original)
    resumed = ss.massive_activations(loaded(), SENTENCES, batch_size=2, out=out, resume=True, progress=False)
    for name in ("massive", "top_activations"):
        pd.testing.assert_frame_equal(resumed.to_frame(name), full.to_frame(name))
    assert resumed.summary["conditions"] == full.summary["conditions"]


RUNS = {
    "smoothing": lambda lm, **kw: ss.attention_smoothing(lm, SENTENCES[:2], **kw),
    "noop": lambda lm, **kw: ss.noop(lm, SENTENCES[:2], **kw),
    "conditional_heads": lambda lm, **kw: ss.conditional_heads(lm, TRIGGER_TEXTS, trigger=",", **kw),
    "rank_collapse": lambda lm, **kw: ss.rank_collapse(lm, SENTENCES[:2], **kw),
    "repr_collapse": lambda lm, **kw: ss.representational_collapse(lm, lengths=(2, 4), **kw),
    "massive": lambda lm, **kw: ss.massive_activations(lm, SENTENCES[:2], **kw),
    "perturb": lambda lm, **kw: ss.perturb(lm, SENTENCES[0], swap=("cat", "dog"), **kw),
    "oversquash": lambda lm, **kw: ss.oversquash(lm, SENTENCES[0], probes=2, **kw),
}


@pytest.mark.parametrize("name", list(RUNS))
def test_saved_run_resumes_to_the_same_result_and_reloads(name, tmp_path, monkeypatch):
    from sinkscope.experiments.base import Experiment, Result

    lm = loaded()
    out = tmp_path / name
    first = RUNS[name](lm, out=out, progress=False)
    assert first.experiment == name and first.summary["provenance"]["experiment"] == name
    assert (out / "summary.json").is_file() and list(out.glob("*.png"))

    def measured_again(*args, **kwargs):
        raise AssertionError("a finished batch was measured again")

    for cls in Experiment.__subclasses__():
        if cls.name == name:
            monkeypatch.setattr(cls, "measure", measured_again)
    again = RUNS[name](lm, out=out, resume=True, progress=False)
    reloaded = Result.load(out)
    assert type(reloaded) is type(first)
    for table in first.tables:
        pd.testing.assert_frame_equal(again.to_frame(table), first.to_frame(table))
        pd.testing.assert_frame_equal(reloaded.to_frame(table), first.to_frame(table))

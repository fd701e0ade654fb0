"""`kv`: the loss through the cache against a plain forward, retrieval through the cache against greedy decoding
(and the teacher-forced shortcut against decoding), what eviction does to the sink mass, the recommendation,
the grids, resume and bad input on the command line."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

import sinkscope as ss
from helpers import TEXT, invoke, lm, passkey_tokenizer, refused, tiny_model, word_tokenizer
from sinkscope.capture.kvcache import QuantisedCache
from sinkscope.errors import InputError
from sinkscope.experiments.base import Result
from sinkscope.experiments.kv import GRIDS, KV, Method, kv, kv_settings
from sinkscope.experiments.ruler import greedy_continuation

SMALL = dict(window=24, context=14, max_windows=3, step=4, group_size=4, retrieval_length=0)


def test_full_cache_loss_equals_a_plain_forward():
    model = lm()
    result = kv(model, TEXT, bits=(), presses=(), progress=False, **SMALL)
    text_ids = word_tokenizer()(TEXT, add_special_tokens=False)["input_ids"]
    expected = []
    for i in range(3):
        window = text_ids[24 * i: 24 * (i + 1)]
        ids = torch.tensor([[1] + window])
        with torch.no_grad():
            logits = model.model(input_ids=ids).logits[0]
        # text token j sits at position j + 1; targets are text tokens 15..23, predicted from positions 15..23
        expected.append(F.cross_entropy(logits[15:24], torch.tensor(window[15:24])).item())
    windows = result.tables["windows"]
    assert windows["n_tokens"].eq(9).all()
    assert windows["loss"].tolist() == pytest.approx(expected, abs=1e-5)
    assert result.tables["kv"]["delta_loss"].iloc[0] == 0.0


@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
def test_methods_table_quantisation_and_eviction(family):
    model = ss.load(tiny_model(family), tokenizer=word_tokenizer())
    result = kv(model, TEXT, bits=(8, 2), axes=("token", "channel"), protect=(0, 2), presses=("window", "snapkv"),
                ratios=(0.5,), progress=False, **SMALL)
    table = result.tables["kv"].set_index("method")
    assert len(table) == 1 + 2 * 2 * 2 + 2 * 2
    assert table.loc["full", "bytes_ratio"] == 1.0
    for axis in ("token", "channel"):  # fewer bits, fewer bytes; protection costs bytes
        assert table.loc[f"int2-{axis} k=0", "bytes_ratio"] < table.loc[f"int8-{axis} k=0", "bytes_ratio"] < 1
        assert table.loc[f"int2-{axis} k=2", "bytes_ratio"] > table.loc[f"int2-{axis} k=0", "bytes_ratio"]
    assert abs(table.loc["int2-token k=0", "delta_loss"]) > abs(table.loc["int8-token k=0", "delta_loss"])
    # the window without sinks evicts position 0 from every full-attention layer; with 2 kept, it is there
    window = result.tables["windows"]
    assert table.loc["window@0.5 k=2", "sink_mass"] > 0
    if family == "llama":  # every layer is full attention: nothing attends to position 0 any more
        assert window[window["method"] == "window@0.5 k=0"]["sink_mass"].eq(0.0).all()
    else:  # gemma3's sliding layers (window 6) no longer reach position 0 either once 14 tokens are in
        assert table.loc["window@0.5 k=0", "sink_mass"] == 0.0
    assert table.loc["full", "sink_mass_kept"] == 1.0
    for r in table.itertuples():
        assert r.delta_low <= r.delta_loss <= r.delta_high
    # eviction compresses the full-attention layers only: on those alone, half the tokens (+ protected) remain
    evicted = table.loc["window@0.5 k=0"]
    if family == "llama":
        assert evicted["bytes_full_layers_ratio"] == pytest.approx(evicted["bytes_ratio"], rel=1e-12)
    else:  # gemma3's sliding layers are left alone: the whole cache shrinks less than its full layers
        assert evicted["bytes_full_layers_ratio"] < evicted["bytes_ratio"] < 1
    assert table["recommended"].sum() == 1
    chosen = table[table["recommended"]].iloc[0]
    assert chosen["delta_high"] <= 0.02 or chosen.name == "full"
    assert result.summary["recommendation"]["method"] == chosen.name


@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
@pytest.mark.parametrize("axis", ["token", "channel"])
def test_a_quantised_cache_stores_the_full_prefill_quantised_unless_its_prefill_reads_the_cache(family, axis):
    """``quant_prefill`` full: the quantised cache holds what the full cache's prefill holds, stored quantised
    (`QuantisedCache.hold_quantised`, checked by hand in tests/capture/test_kvcache.py), its protected tokens bit
    for bit; ``quantised``: the prefill read the cache, so from the second layer on the stored keys differ."""
    model = ss.load(tiny_model(family), tokenizer=word_tokenizer())
    ids = [1, *word_tokenizer()(TEXT, add_special_tokens=False)["input_ids"][:16]]
    method = Method("quant", 2, bits=2, axis=axis)
    stored = {}
    for prefill in ("full", "quantised"):
        experiment = KV(text=TEXT, bits=(2,), axes=(axis,), protect=(0, 2), presses=(), quant_prefill=prefill,
                        **SMALL)
        ctx = experiment.prepare(model)
        with experiment.open(ctx) as engine:
            full = experiment._filled(ctx, engine, Method("full"), ("window", 0), ids)
            stored[prefill] = experiment._filled(ctx, engine, method, ("window", 0), ids)
    expected = QuantisedCache(model, 2, axis, 4, protect=2)
    expected.hold_quantised(full)
    for index, layer in enumerate(stored["full"].layers):
        assert torch.equal(layer.keys, expected.layers[index].keys)
        assert torch.equal(layer.values, expected.layers[index].values)
        assert not torch.equal(layer.keys, full.layers[index].keys)
        if layer.keys.shape[-2] == len(ids):  # a full-attention layer holds the protected positions 0 and 1
            assert torch.equal(layer.keys[..., :2, :], full.layers[index].keys[..., :2, :])
    assert torch.equal(stored["quantised"].layers[0].keys, stored["full"].layers[0].keys)
    assert not torch.equal(stored["quantised"].layers[1].keys, stored["full"].layers[1].keys)
    with pytest.raises(InputError, match="--quant-prefill"):
        KV(quant_prefill="half")


def test_the_recommendation_is_the_cheapest_cache_within_both_tolerances():
    from sinkscope.experiments.kv import recommend

    rows = [("full", 1.0, 0.0, 0.0, 0.9, 0.0), ("a", 0.2, 0.05, 0.08, 0.9, -0.01),  # loss interval too high
            ("b", 0.3, 0.0, 0.01, 0.5, -0.6),  # retrieval lost
            ("c", 0.4, 0.0, 0.015, 0.9, -0.01), ("d", 0.6, 0.0, 0.01, 0.9, 0.0)]
    kv_table = pd.DataFrame(rows, columns=["method", "bytes_ratio", "delta_loss", "delta_high", "retrieval",
                                           "retrieval_delta_low"])
    assert recommend(kv_table, 0.02, 0.02) == "c"
    assert recommend(kv_table, 0.1, 0.02) == "a"
    assert recommend(kv_table, 0.001, 0.02) == "full"  # nothing cheaper qualifies
    no_retrieval = kv_table.assign(retrieval=np.nan, retrieval_delta_low=np.nan)
    assert recommend(no_retrieval, 0.02, 0.02) == "b"  # loss alone


@pytest.mark.parametrize("task,tokenizer", [("passkey", passkey_tokenizer), ("niah_single", word_tokenizer),
                                            ("niah_multikey", word_tokenizer)])
def test_retrieval_through_the_full_cache_is_what_greedy_decoding_writes(task, tokenizer):
    tokenizer = tokenizer()
    model = ss.load(tiny_model("llama"), tokenizer=tokenizer)
    experiment = KV(text=TEXT, bits=(), presses=(), window=24, context=14, max_windows=1, tasks=(task,),
                    retrieval_length=120, retrieval_trials=3, retrieval_depths=(0.2, 0.8))
    result = ss.experiments.base.run(experiment, model, progress=False)
    retrievals = experiment.prepare(model).retrievals  # what the run measured (the run keeps no state on it)
    rows = result.tables["retrieval"]
    assert len(rows) == 3 and rows["task"].eq(task).all()
    for item, row in zip(retrievals, rows.itertuples(), strict=True):
        assert item.context[0] == 1 and len(item.context) > 60 and item.question  # <bos>, the haystack, the question
        written = greedy_continuation(model.model, item.context + item.question, item.max_new_tokens)
        text = tokenizer.decode(written, skip_special_tokens=True)
        # greedy decoding writes all of it, or (RULER tasks) stops once the text scores 1, which more text cannot
        # change; the shortcut saw the beginning of what greedy decoding writes
        assert text.startswith(row.answer)
        if row.decoded == "greedy" and (task == "passkey" or row.score < 1.0):
            assert row.answer == text
        assert row.score == item.score(text)
    assert [item.depth for item in retrievals] == [0.2, 0.8, 0.2]  # the depths, cycled


def test_teacher_forcing_decides_only_when_greedy_writes_the_answer():
    tokenizer = passkey_tokenizer()
    model = ss.load(tiny_model("llama"), tokenizer=tokenizer)
    experiment = KV(text=TEXT, bits=(), presses=(), window=24, context=14, max_windows=1, retrieval_length=80,
                    retrieval_trials=1)
    ctx = experiment.prepare(model)
    item = ctx.retrievals[0]
    written = greedy_continuation(model.model, item.context + item.question, 6)
    assert len(written) == 6  # the tiny model writes no end-of-sequence token here
    said = tokenizer.decode(written[:3], skip_special_tokens=True)
    follows = replace(item, task="niah_single", answer=written[:3], expected=(said,), max_new_tokens=6)
    other = next(t for t in range(10, 40) if t != written[0])
    differs = replace(follows, answer=[other, *written[1:3]], expected=("never written",))
    with experiment.open(ctx) as engine:
        shortcut = experiment._retrieve(ctx, engine, Method("full"), 0, follows)
        decoded = experiment._retrieve(ctx, engine, Method("full"), 1, differs)
        # not the expected tokens, but the expected text within the first 3 of 6: decoding stops there
        early = experiment._retrieve(ctx, engine, Method("full"), 2, replace(differs, expected=(said,)))
        passkey = experiment._retrieve(ctx, engine, Method("full"), 3, replace(differs, task="passkey",
                                                                               expected=("99999",)))
    assert shortcut["decoded"] == "teacher-forced" and shortcut["score"] == 1.0
    assert tokenizer.decode(written, skip_special_tokens=True).startswith(shortcut["answer"])
    assert decoded["decoded"] == "greedy" and decoded["score"] == 0.0
    assert decoded["answer"] == tokenizer.decode(written, skip_special_tokens=True)
    assert decoded["answer_nll"] > shortcut["answer_nll"]  # the greedy tokens are the likeliest ones
    whole = tokenizer.decode(written, skip_special_tokens=True)
    assert early["decoded"] == "greedy" and early["score"] == 1.0
    assert whole.startswith(early["answer"]) and said in early["answer"] and len(early["answer"]) < len(whole)
    assert passkey["answer"] == whole  # the passkey's first number could still change: no early stop


def test_policy_presses_spend_the_other_policies_on_the_presses_named_and_the_first_k_elsewhere():
    chosen = dict(bits=(), presses=("window", "knorm"), ratios=(0.5,), protect=(0, 4),
                  press_policies=("first", "found"))
    every = [m.label for m in KV(text=TEXT, **chosen).methods()]
    named = [m.label for m in KV(text=TEXT, policy_presses=("window",), **chosen).methods()]
    assert every == ["full", "window@0.5 k=0", "window@0.5 k=4", "window@0.5 k=4 found", "knorm@0.5 k=0",
                     "knorm@0.5 k=4", "knorm@0.5 k=4 found"]
    assert named == [m for m in every if m != "knorm@0.5 k=4 found"]
    with pytest.raises(InputError, match="--policy-press"):
        KV(text=TEXT, policy_presses=("snapkv",), **chosen)


def test_grids_are_valid_settings_and_given_settings_win():
    for name, grid in GRIDS.items():
        experiment = KV(text=TEXT, **grid)
        methods = experiment.methods()
        assert methods[0].kind == "full", name
        policies = {(m.kind, m.policy) for m in methods}
        assert ("press", "found") in policies and ("quant", "massive") in policies
        assert ("press", "massive") not in policies and ("quant", "found") not in policies
        # within the budget, the sinks found are compared with the first k on the window press alone
        assert {m.press for m in methods if m.policy == "found"} == {"window"}, name
        assert {m.press for m in methods if m.kind == "press"} == {"window", "knorm", "snapkv"}, name
    docs = kv_settings("docs", {"max_windows": 2, "ratios": None})
    assert docs["max_windows"] == 2 and docs["ratios"] == GRIDS["docs"]["ratios"]
    with pytest.raises(InputError, match="grid"):
        kv_settings("huge", {})
    with pytest.raises(InputError, match="no setting"):
        kv_settings(None, {"windows": 3})
    with pytest.raises(InputError, match="task"):
        KV(text=TEXT, tasks=("haystack",))


@pytest.mark.parametrize("options,says", [(["--bits", "3"], "bits"), (["--ratio", "1.5"], "ratio"),
                                          (["--ratio", "0"], "ratio"), (["--protect", "-1"], "protect"),
                                          (["--press", "h2o"], "press"), (["--context", "30"], "context"),
                                          (["--grid", "huge"], "grid"), (["--task", "vt2"], "task"),
                                          (["--context", "12", "--retrieval-depth", "1.5"], "depth")])
def test_bad_input_is_one_line_and_exit_2(model_dir, options, says):
    assert says in refused("kv", "--model", str(model_dir), "--window", "24", *options)


def test_cli_resumes_and_the_result_loads_back(tmp_path, model_dir):
    text = tmp_path / "text.txt"
    text.write_text(TEXT)
    out = tmp_path / "run"
    args = ["kv", "--model", str(model_dir), "--text", str(text), "--window", "20", "--context", "12",
            "--max-windows", "2", "--step", "4", "--group-size", "4", "--bits", "4", "--protect", "0",
            "--protect", "1", "--press", "window", "--ratio", "0.5", "--passkey-length", "0", "--out", str(out),
            "--quiet"]
    assert invoke(*args).exit_code == 0
    first = Result.load(out)
    assert (out / "kv_pareto.png").is_file() and (out / "kv.csv").is_file()
    # a fresh process that never imported the kv module loads it back as a KVResult (its figures included)
    code = ("import sys; from sinkscope.experiments.base import Result; r = Result.load(sys.argv[1]); "
            "print(type(r).__name__, sorted(r.figures()))")
    loaded = subprocess.run([sys.executable, "-c", code, str(out)], capture_output=True, text=True, check=True)
    assert loaded.stdout.split("\n")[-2] == "KVResult ['kv_pareto']"
    sorted((out / "parts").glob("batch-*.done"))[-1].unlink()
    assert invoke(*args, "--resume").exit_code == 0
    again = Result.load(out)
    for name, frame in first.tables.items():
        assert again.tables[name].equals(frame), name

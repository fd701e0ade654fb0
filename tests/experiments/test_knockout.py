"""`knockout`: the all-heads Δloss against an explicit 4D attention mask, that a layer's knock-out only
changes what comes after it, the random-key control against an eager computation with that key masked
(one key per query, reproducible by seed), the bootstrap intervals, the resume logic, and the CLI."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

import sinkscope.cli  # noqa: F401  registers every command on the app
from helpers import TEXT, WINDOW, bundled_gemma, lm, tiny_model, word_tokenizer
from sinkscope.capture import CaptureEngine, Probe, RandomKeyKnockout, SinkKnockout
from sinkscope.cli import app
from sinkscope.errors import InputError
from sinkscope.experiments.ablate import ablate
from sinkscope.experiments.knockout import knockout, parse_layers
from sinkscope.metrics.stats import bootstrap_interval


def explicit_mask_loss(model, windows: list[list[int]], hide_first: bool) -> float:
    """Mean text-token loss of [<bos>] + window from the plain model, key 0 hidden from every later query
    by a 4D boolean mask (no capture engine involved)."""
    losses = []
    for window in windows:
        ids = torch.tensor([[1] + window])
        t = ids.shape[1]
        allowed = torch.ones(t, t, dtype=torch.bool).tril()[None, None].clone()
        if hide_first:
            allowed[0, 0, 1:, 0] = False
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=allowed).logits[0]
        losses.append(F.cross_entropy(logits[1: t - 1], torch.tensor(window[1:]), reduction="none"))
    return torch.cat(losses).mean().item()


def test_all_heads_delta_loss_equals_an_explicit_attention_mask():
    model = lm()
    result = knockout(model, TEXT, window=16, max_windows=3, per_head=False, progress=False)
    text_ids = word_tokenizer()(TEXT, add_special_tokens=False)["input_ids"]
    windows = [text_ids[16 * i: 16 * (i + 1)] for i in range(3)]
    baseline = explicit_mask_loss(model.model, windows, hide_first=False)
    hidden = explicit_mask_loss(model.model, windows, hide_first=True)
    summary = result.summary
    assert summary["baseline"]["loss"] == pytest.approx(baseline, abs=1e-5)
    assert summary["all_heads"]["loss"] == pytest.approx(hidden, abs=1e-5)
    assert summary["all_heads"]["delta_loss"] == pytest.approx(hidden - baseline, abs=1e-5)
    assert abs(hidden - baseline) > 1e-3  # the knock-out does change the loss
    frame = result.to_frame()
    assert frame["scope"].tolist() == ["all", "all"] + ["layer"] * 6 and frame["n_tokens"].eq(45).all()
    assert frame["target"].tolist() == ["first", "random"] * 4


def test_all_heads_knockout_equals_stripping_bos_on_a_rope_model():
    # With rotary positions only relative offsets matter, so hiding <bos> from every query is the text alone.
    model = lm()
    knocked = knockout(model, TEXT, window=16, max_windows=2, per_head=False, progress=False)
    stripped = ablate(model, TEXT, bos=["add", "strip"], window=16, max_windows=2, progress=False)
    assert knocked.summary["all_heads"]["loss"] == pytest.approx(stripped.summary["loss"]["strip"]["mean_loss"],
                                                                 abs=1e-5)


class Outputs(Probe):
    """Records each layer's attention output after the probes before it (the knock-out) have run."""

    def __init__(self) -> None:
        self.records: dict[int, torch.Tensor] = {}

    def on_attention(self, call):
        self.records[call.layer] = call.output.clone()


def test_knocking_out_one_layer_changes_only_what_follows_it():
    model = tiny_model("llama")
    ids = torch.randint(3, 90, (2, 14), generator=torch.Generator().manual_seed(3))
    runs = {}
    for name, heads in (("none", {}), ("layer1", {1: None}), ("head", {1: [2]})):
        outputs = Outputs()
        with CaptureEngine(model, [SinkKnockout(heads), outputs]) as engine:
            runs[name] = (engine.forward(ids, residual=True).residual, outputs.records)
    base_residual, base_out = runs["none"]
    residual, _ = runs["layer1"]
    assert torch.equal(residual[0], base_residual[0]) and torch.equal(residual[1], base_residual[1])
    assert not torch.allclose(residual[2], base_residual[2])  # layer 1's output onward
    _, head_out = runs["head"]
    assert torch.equal(head_out[0], base_out[0])
    others = [0, 1, 3]
    assert torch.equal(head_out[1][:, others], base_out[1][:, others])  # only head 2 of layer 1 is touched
    assert not torch.allclose(head_out[1][:, 2], base_out[1][:, 2])
    assert torch.allclose(head_out[1][:, 2, 0], base_out[1][:, 2, 0], atol=1e-6)  # query 0 sees only itself


def test_per_head_rows_and_parse_layers():
    result = knockout(lm(), TEXT, window=12, max_windows=1, layers="1-2", progress=False)
    frame = result.to_frame()
    assert len(frame) == 2 + 2 * (2 + 4)  # all heads and each layer also with the random-key control
    heads = frame[frame["scope"] == "head"]
    assert heads[["layer", "head"]].astype(int).values.tolist() == [[1, h] for h in range(4)] + [[2, h]
                                                                                               for h in range(4)]
    assert (frame["delta_loss"] - (frame["loss"] - result.summary["baseline"]["loss"])).abs().max() < 1e-5
    assert set(result.summary["delta_loss_by_layer"]) == {1, 2}
    assert parse_layers("0-2,5", 8) == [0, 1, 2, 5] and parse_layers(None, 3) == [0, 1, 2]
    assert parse_layers([2, 0], 3) == [0, 2]
    for bad in ("7", "a-b", ","):
        with pytest.raises(InputError):
            parse_layers(bad, 4)


def test_resume_continues_without_recomputing_finished_layers(tmp_path, monkeypatch):
    model = lm()
    out = tmp_path / "run"
    first = knockout(model, TEXT, window=12, max_windows=1, out=out, progress=False)
    parts = sorted((out / "parts").glob("batch-*.done"))
    assert len(parts) == 2 + 3 * (2 + 4)  # all heads, then each layer and each of its heads (+ the controls)
    for part in parts[-6:]:
        part.unlink()  # as if interrupted during the last layer
    with pytest.raises(InputError, match="already holds a run"):
        knockout(model, TEXT, window=12, max_windows=1, out=out, progress=False)
    with pytest.raises(InputError, match="different"):
        knockout(model, TEXT, window=10, max_windows=1, out=out, resume=True, progress=False)
    calls = []
    original = SinkKnockout.on_attention
    monkeypatch.setattr(SinkKnockout, "on_attention",
                        lambda self, call: calls.append(self.heads) or original(self, call))
    resumed = knockout(model, TEXT, window=12, max_windows=1, out=out, resume=True, progress=False)
    assert {json.dumps(h, sort_keys=True) for h in calls if h} == {json.dumps(h) for h in
                                                                    [{"2": None}] + [{"2": [i]} for i in range(4)]}
    assert resumed.to_frame().equals(first.to_frame())
    assert (out / "knockout.png").is_file() and (out / "summary.json").is_file()


def test_knockout_command(tmp_path):
    model_dir = tmp_path / "model"
    tiny_model("llama").save_pretrained(model_dir)
    word_tokenizer().save_pretrained(model_dir)
    text = tmp_path / "t.txt"
    text.write_text(TEXT, encoding="utf-8")
    out = tmp_path / "run"
    runner = CliRunner()
    args = ["knockout", "--model", str(model_dir), "--text", str(text), "--window", "12", "--max-windows", "1",
            "--quiet"]
    result = runner.invoke(app, [*args, "--out", str(out)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "all heads" in result.output and (out / "knockout.parquet").is_file()
    assert json.loads((out / "summary.json").read_text())["n_heads"] == 4
    bad = runner.invoke(app, [*args, "--layers", "9"])
    assert bad.exit_code == 2 and "out of range" in bad.output


@pytest.mark.bundled
def test_gemma3_needs_its_sink():
    result = knockout(bundled_gemma(), window=48, max_windows=1, layers="0", progress=False)
    summary = result.summary
    assert summary["all_heads"]["delta_loss"] > 0.5
    assert len(result.to_frame()) == 2 + 2 + 4  # all heads, layer 0 (each also with the control), its heads


class Calls(Probe):
    """Records each layer's call inputs and its output after the probes before it (an intervention) ran."""

    def __init__(self) -> None:
        self.records: dict[int, dict[str, torch.Tensor]] = {}

    def on_attention(self, call):
        self.records[call.layer] = {"query": call.query.clone(), "key": call.key.clone(), "value": call.value.clone(),
                                    "output": call.output.clone(), "scaling": torch.tensor(call.scaling)}


def eager_attention(record, allowed: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T * scale) v under a bool mask [B, T, S], written out here (GQA: kv head h // n_rep)."""
    q, k, v = record["query"].double(), record["key"].double(), record["value"].double()
    n_rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(n_rep, 1), v.repeat_interleave(n_rep, 1)
    scores = (q @ k.transpose(-1, -2)) * float(record["scaling"])
    scores = scores.masked_fill(~allowed[:, None], float("-inf"))
    return torch.softmax(scores, -1) @ v


@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
def test_random_key_control_removes_exactly_one_key_per_query(family):
    model = tiny_model(family)
    ids = torch.randint(3, 90, (2, 3 * WINDOW), generator=torch.Generator().manual_seed(7))
    n = ids.shape[1]
    control, calls = RandomKeyKnockout({1: None}, seed=3), Calls()
    with CaptureEngine(model, [control, calls]) as engine:
        engine.forward(ids)
    removed = control.removed[1]  # [B, T]
    assert set(control.removed) == {1}
    i, k = torch.arange(n)[:, None], torch.arange(n)[None, :]
    visible = i >= k
    if (getattr(model.config, "layer_types", None) or [""] * 3)[1] == "sliding_attention":
        visible = visible & (i - k < model.config.sliding_window)
    assert (removed[:, 0] == -1).all()  # the first token's query sees only the first key: left alone
    chosen = removed[:, 1:]
    assert (chosen >= 1).all()  # never the first key
    assert visible[torch.arange(1, n)[None, :].expand(2, -1), chosen].all()  # a key the query may see
    # the layer's output equals eager attention with exactly that key hidden from each query
    hidden = torch.zeros(2, n, n, dtype=torch.bool)
    for row in range(2):
        hidden[row, torch.arange(1, n), chosen[row]] = True
    expected = eager_attention(calls.records[1], visible[None] & ~hidden)
    torch.testing.assert_close(calls.records[1]["output"].double(), expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(expected, eager_attention(calls.records[1], visible[None].expand(2, -1, -1)),
                              atol=1e-3)
    assert len(set(chosen.flatten().tolist())) > n // 2  # the keys are spread, not one fixed key


def test_random_key_control_is_reproducible_by_seed_and_independent_of_batching():
    model = tiny_model("llama")
    ids = torch.randint(3, 90, (3, 16), generator=torch.Generator().manual_seed(8))

    def draws(batch: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        control = RandomKeyKnockout(None, seed=seed)
        with CaptureEngine(model, [control]) as engine:
            hidden = engine.forward(batch).last_hidden_state
        return torch.stack([control.removed[layer] for layer in sorted(control.removed)]), hidden

    removed, hidden = draws(ids, seed=5)
    again, hidden_again = draws(ids, seed=5)
    assert torch.equal(removed, again) and torch.equal(hidden, hidden_again)
    alone, hidden_alone = draws(ids[1:2], seed=5)  # the same row in another batch: the same keys
    assert torch.equal(alone[:, 0], removed[:, 1])
    torch.testing.assert_close(hidden_alone[0], hidden[1], atol=1e-5, rtol=1e-5)
    other, _ = draws(ids, seed=6)
    assert not torch.equal(other, removed)
    assert not torch.equal(removed[0], removed[1])  # drawn anew for every layer


def test_knockout_control_and_bootstrap_intervals():
    result = knockout(lm(), TEXT, window=12, max_windows=4, per_head=False, seed=2, progress=False)
    frame, windows, summary = result.to_frame(), result.tables["windows"], result.summary
    for row in frame.itertuples():
        per_window = windows[(windows["scope"] == row.scope) & (windows["target"] == row.target)
                             & (windows["layer"].fillna(-1) == (-1 if row.layer is pd.NA else row.layer))]
        assert len(per_window) == 4
        assert per_window["delta_loss"].mean() == pytest.approx(row.delta_loss, abs=1e-6)  # equal-size windows
        _, low, high = bootstrap_interval(per_window["delta_loss"].to_numpy(), seed=2)
        assert (row.delta_loss_low, row.delta_loss_high) == pytest.approx((low, high))
        assert low <= row.delta_loss <= high
    all_first = frame[(frame["scope"] == "all") & (frame["target"] == "first")].iloc[0]
    all_random = frame[(frame["scope"] == "all") & (frame["target"] == "random")].iloc[0]
    assert summary["all_heads"]["delta_loss"] == pytest.approx(all_first.delta_loss)
    assert summary["all_heads"]["delta_loss_ci"] == pytest.approx([all_first.delta_loss_low, all_first.delta_loss_high])
    control = summary["control"]
    assert control["all_heads"]["delta_loss"] == pytest.approx(all_random.delta_loss)
    paired = control["first_minus_random"]["all_heads"]
    assert paired["delta_loss"] == pytest.approx(all_first.delta_loss - all_random.delta_loss, abs=1e-6)
    assert set(control["first_minus_random"]["by_layer"]) == {0, 1, 2}
    assert np.isfinite(all_random.delta_loss) and all_random.delta_loss != all_first.delta_loss
    without = knockout(lm(), TEXT, window=12, max_windows=4, per_head=False, control=False, progress=False)
    assert without.summary["control"] is None and set(without.to_frame()["target"]) == {"first"}
    assert without.summary["all_heads"]["delta_loss"] == pytest.approx(all_first.delta_loss, abs=1e-6)

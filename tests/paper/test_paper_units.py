"""Independent units for the paper's verdicts: stream segments, over-squashing over several texts (and after the
final norm), one representational-collapse slope per repeated token, the dose per layer band, and the sink's
whereabouts read on an experiment's own forward. Each against an independent reference or hand-built evidence."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

import sinkscope as ss
from helpers import SENTENCES, eager_twin, scans, tiny_model, word_tokenizer
from sinkscope.capture import CaptureEngine
from sinkscope.data import Prompt
from sinkscope.errors import InputError
from sinkscope.experiments.base import Result, run
from sinkscope.experiments.inputs import Encoded
from sinkscope.experiments.oversquash import oversquash
from sinkscope.experiments.repr_collapse import ReprCollapse
from sinkscope.experiments.scan import Scan
from sinkscope.experiments.spread import Spread
from sinkscope.experiments.stream import Stream
from sinkscope.experiments.whereabouts import WhereaboutsRider, whereabouts_rows
from sinkscope.metrics import sensitivity
from sinkscope.paper.verdicts import (
    INSUFFICIENT,
    NOT_REPRODUCED,
    REPRODUCED,
    Context,
    judge_band_doses,
    judge_oversquash,
    judge_repr_collapse,
    judge_stream,
    layer_bands,
)

TEXT = " ".join(SENTENCES * 2)  # the word tokenizer gives one token per word


def lm(family: str = "llama"):
    return ss.load(tiny_model(family), tokenizer=word_tokenizer())


# -- stream: segments -------------------------------------------------------------------------------------------
def test_stream_segments_are_streamed_together_exactly_as_alone():
    loaded = lm()
    width = 23  # text tokens per segment: length 24 with the <bos> prefix
    together = run(Stream(text=TEXT, window=8, sinks=(0, 2), length=width + 1, segments=3), loaded, progress=False)
    frame = together.tables["stream"]
    assert sorted(frame["segment"].unique()) == [0, 1, 2] and together.summary["segments"] == 3
    words = TEXT.split(" ")
    assert len(words) >= 3 * width
    for segment in range(3):
        alone = run(Stream(text=" ".join(words[segment * width:(segment + 1) * width]), window=8, sinks=(0, 2),
                           length=width + 1), loaded, progress=False).tables["stream"]
        mine = frame[frame["segment"] == segment]
        assert mine["token_id"].tolist() == alone["token_id"].tolist()  # the same tokens, <bos> first
        # a batch of rows against one row: float32 sums in another order (1e-7 relative per op, ~30 layers of ops)
        np.testing.assert_allclose(mine["nll"].to_numpy(), alone["nll"].to_numpy(), rtol=0, atol=1e-4)
    # the full cache is one plain forward per segment: an independent reference for the batched decode
    ids = torch.tensor([[loaded.tokenizer.bos_token_id] + [loaded.tokenizer.convert_tokens_to_ids(w)
                                                           for w in words[width:2 * width]]])
    with torch.no_grad():
        logp = torch.log_softmax(loaded.model(input_ids=ids).logits[0], -1)
    expected = -logp[torch.arange(width), ids[0, 1:]]
    full = run(Stream(text=TEXT, window=8, sinks=(0,), length=width + 1, segments=2), loaded, progress=False)
    second = full.tables["stream"].query("cache == 'full' and segment == 1")["nll"].to_numpy()
    np.testing.assert_allclose(second, expected.numpy(), rtol=0, atol=1e-4)


def test_stream_segments_refuse_a_text_too_short():
    with pytest.raises(InputError, match="need 40 x"):
        run(Stream(text=TEXT, window=8, sinks=(0,), length=24, segments=40), lm(), progress=False)
    with pytest.raises(InputError, match="at least 1"):
        Stream(text=TEXT, segments=0)


def stream_result(gap: float, n: int, seed: int = 0) -> Result:
    rng = np.random.default_rng(seed)
    rows = [{"cache": cache, "segment": s, "position": p, "nll": 3.0 + (gap if cache == "k=0" else 0.0)
             + rng.normal(0, 0.05)} for cache in ("k=0", "k=4") for s in range(n) for p in range(20, 40)]
    return Result({"stream": pd.DataFrame(rows)}, {"eval_start": 24, "ppl": {"k=0": 1.0, "k=4": 1.0}})


def test_the_stream_verdict_pairs_segments_not_positions():
    (found,) = judge_stream(Context("m", {"stream": stream_result(0.5, 12)}, {}))
    assert found.verdict == REPRODUCED and found.n_units == 12
    (one,) = judge_stream(Context("m", {"stream": stream_result(0.5, 1)}, {}))
    assert one.verdict == INSUFFICIENT and one.n_units == 1  # 16 positions of one segment are not 16 units
    (none,) = judge_stream(Context("m", {"stream": stream_result(-0.5, 12)}, {}))
    assert none.verdict == NOT_REPRODUCED


# -- over-squashing: several texts, and the state after the final norm --------------------------------------------
def test_oversquash_after_the_final_norm_equals_autograd_with_the_same_probes():
    loaded = lm()
    text = SENTENCES[0]
    result = oversquash(loaded, text, probes=3, path_sum=False, bos=("add",), normed=True, progress=False)
    frame = result.tables["sensitivity"]
    ids = [loaded.tokenizer.bos_token_id] + [loaded.tokenizer.convert_tokens_to_ids(w) for w in text.split(" ")]
    twin = eager_twin(loaded.model)
    first = twin.get_input_embeddings()(torch.tensor([ids])).detach()

    def normed_last(embeddings: torch.Tensor) -> torch.Tensor:
        return twin.model(inputs_embeds=embeddings).last_hidden_state[0, -1]  # after the final norm

    jacobian = torch.autograd.functional.jacobian(normed_last, first)[:, 0].double()  # [d, T, d]
    directions = torch.from_numpy(sensitivity.gaussian_probes(3, jacobian.shape[0], 0)).double()
    expected = torch.einsum("rd,dte->rte", directions, jacobian).pow(2).sum(-1).mean(0).numpy()  # [T]
    # two float32 kernels (fused and eager) through 2 layers and a norm: agreement to ~1e-5 relative
    np.testing.assert_allclose(frame["s2_normed"].to_numpy(), expected, rtol=1e-4, atol=1e-9)
    assert not np.allclose(frame["s2_normed"], frame["s2"], rtol=0.1)  # the norm changes the sensitivity


def test_oversquash_over_texts_gives_one_unit_per_text():
    loaded = lm()
    texts = tuple(SENTENCES[:3])
    several = oversquash(loaded, texts=texts, probes=2, path_sum=False, progress=False)
    frame = several.tables["sensitivity"]
    assert sorted(frame["text"].unique()) == [0, 1, 2] and several.summary["n_texts"] == 3
    alone = oversquash(loaded, texts[1], probes=2, path_sum=False, progress=False).tables["sensitivity"]
    mine = frame[frame["text"] == 1].reset_index(drop=True)
    # the same computation on the same tokens: equal up to float32 re-association (none expected)
    np.testing.assert_allclose(mine["s2"].to_numpy(), alone["s2"].to_numpy(), rtol=1e-6)
    assert len(several.summary["R_s2_mean_by_text"]) == 3


def sensitivity_result(ratio: float, n: int) -> Result:
    rng = np.random.default_rng(0)
    rows = []
    for text in range(n):
        base = rng.uniform(1.0, 2.0)
        for bos, scale in (("add", 1.0), ("strip", ratio)):
            rows += [{"text": text, "bos": bos, "text_position": p, "distance": 6 - p,
                      "s2": base * scale * rng.uniform(0.95, 1.05), "s2_normed": base} for p in range(1, 6)]
    return Result({"sensitivity": pd.DataFrame(rows)}, {"method": "2-probe estimate"})


def test_the_oversquash_verdict_pairs_texts():
    gone = scans(0.8, 0.0)  # the sink is removed without <bos>: the premise holds
    (found,) = judge_oversquash(Context("g", {**gone, "oversquash": sensitivity_result(1.5, 20)}, {}))
    assert found.verdict == REPRODUCED and found.n_units == 20 and "after the final norm R = 1.000" in found.note
    (few,) = judge_oversquash(Context("g", {**gone, "oversquash": sensitivity_result(1.5, 3)}, {}))
    assert few.verdict == INSUFFICIENT
    (other,) = judge_oversquash(Context("g", {**gone, "oversquash": sensitivity_result(0.6, 20)}, {}))
    assert other.verdict == NOT_REPRODUCED


# -- representational collapse: a slope per repeated token ------------------------------------------------------
def test_repr_collapse_runs_one_sequence_per_repeated_token():
    loaded = lm()
    words = SENTENCES[0].split(" ")[:4]
    result = run(ReprCollapse(lengths=(2, 4, 8), families=("repeated",), bos=("add",), repeat_token=words[0],
                              repeat_tokens=tuple(words[1:])), loaded, progress=False)
    frame = result.tables["repr_collapse"]
    assert sorted(frame["repeat_token"].unique()) == sorted(set(words))
    first = frame[frame["repeat_token"] == words[0]].sort_values("n")
    alone = run(ReprCollapse(lengths=(2, 4, 8), families=("repeated",), bos=("add",), repeat_token=words[0]),
                loaded, progress=False).tables["repr_collapse"].sort_values("n")
    np.testing.assert_allclose(first["l2"].to_numpy(), alone["l2"].to_numpy(), rtol=1e-6)
    assert result.summary["curves"]["repeated"]["add"]["n"] == [2, 4, 8]  # the curves: the first token's
    finding = judge_repr_collapse(Context("m", {"repr_collapse": result}, {}))
    assert finding.n_units == len(set(words)) and finding.verdict == INSUFFICIENT  # 4 tokens < 10


# -- the dose per layer band --------------------------------------------------------------------------------------
def band_losses(rise: dict[str, float], n: int, spread: float = 0.01) -> pd.DataFrame:
    rng = np.random.default_rng(3)
    columns = {"add": np.full(n, 3.0)}
    for band, layers in layer_bands(6).items():
        columns[f"add+scale:0.5@{layers}"] = 3.0 + rise[band] / 2 + rng.normal(0, spread, n)
        columns[f"add+knockout@{layers}"] = 3.0 + rise[band] + rng.normal(0, spread, n)
    return pd.DataFrame(columns)


def test_the_band_dose_reads_a_trend_per_window_in_each_third():
    context = Context("m", {}, {}, meta={"n_layers": 6})
    findings = judge_band_doses(context, band_losses({"early": 1.0, "middle": -1.0, "late": 0.0}, n=12))
    assert [f.verdict for f in findings][:2] == [REPRODUCED, NOT_REPRODUCED]
    assert findings[0].conditions == "add+scale:λ@0-1" and findings[0].value == pytest.approx(-1.0, abs=1e-12)
    assert findings[2].verdict != REPRODUCED  # no trend: noise alone
    few = judge_band_doses(context, band_losses({"early": 1.0, "middle": 1.0, "late": 1.0}, n=4))
    assert {f.verdict for f in few} == {INSUFFICIENT}
    missing = judge_band_doses(context, pd.DataFrame({"add": np.full(12, 3.0)}))
    assert all("no add+scale:0.5@" in f.note or f.verdict != REPRODUCED for f in missing)


# -- whereabouts on the experiment's own forward ------------------------------------------------------------------
def test_whereabouts_ride_on_the_forward_and_match_their_own_forward():
    loaded = lm()
    prompts = [Prompt(f"p{i}", s, "test") for i, s in enumerate(SENTENCES[:4])]
    rode = run(Scan(prompts=prompts, bos="add+scale:0.5"), loaded, progress=False).tables["whereabouts"]
    Scan.whereabouts_rides = False
    try:
        own = run(Scan(prompts=prompts, bos="add+scale:0.5"), loaded, progress=False).tables["whereabouts"]
    finally:
        Scan.whereabouts_rides = True
    pd.testing.assert_frame_equal(rode, own, rtol=1e-6, atol=1e-7)  # the same kernel on the same inputs
    # an experiment that runs several forwards per batch (the swaps) falls back to the separate forward
    spread = run(Spread(prompts=prompts[:2], bos=("add",), max_tokens=16), loaded, progress=False)
    assert spread.tables["whereabouts"]["alpha_first"].notna().all()


def test_the_rider_refuses_what_it_did_not_see_exactly_once():
    loaded = lm()
    tokenizer = loaded.tokenizer
    units = [Encoded(i, "add", [tokenizer.bos_token_id] + [tokenizer.convert_tokens_to_ids(w)
                                                           for w in s.split(" ")[:6]], 1, 7)
             for i, s in enumerate(SENTENCES[:2])]
    ids = torch.tensor([u.ids for u in units])
    with CaptureEngine(loaded) as engine:
        expected = whereabouts_rows(engine, units)
        once = WhereaboutsRider(units)
        engine.probes = [once]
        engine.forward(ids)
        pd.testing.assert_frame_equal(once.rows(len(engine.attention_layers)), expected, rtol=1e-6, atol=1e-7)
        twice = WhereaboutsRider(units)
        engine.probes = [twice]
        engine.forward(ids)
        engine.forward(ids)
        assert twice.rows(len(engine.attention_layers)) is None
        other = WhereaboutsRider(units)
        engine.probes = [other]
        engine.forward(ids[:, :5])  # other tokens than the units'
        assert other.rows(len(engine.attention_layers)) is None
        engine.probes = []


# -- the dose on the spread and on the rank measure -------------------------------------------------------------
def dose_frames(n: int, spread_rise: float, residual_rise: float) -> dict[str, Result]:
    rng = np.random.default_rng(5)
    doses = {"add": 1.0, "add+scale:0.75": 0.75, "add+scale:0.5": 0.5, "add+scale:0.25": 0.25, "add+scale:0": 0.0}
    spread_rows, rank_rows = [], []
    for prompt in range(n):
        for condition, dose in doses.items():
            for depth in range(3):
                spread_rows.append({"prompt": prompt, "bos": condition, "depth": depth,
                                    "S": 1.0 + spread_rise * (1 - dose) + rng.normal(0, 0.01)})
            for depth in range(3):
                rank_rows.append({"prompt": prompt, "bos": condition, "measure": "frobenius_residual",
                                  "depth": depth, "value": 0.5 + residual_rise * (1 - dose) + rng.normal(0, 0.005)})
    return {"spread": Result({"spread": pd.DataFrame(spread_rows)}, {}),
            "rank_collapse": Result({"rank_collapse": pd.DataFrame(rank_rows), "text_rows": pd.DataFrame(rank_rows)},
                                    {})}


def test_the_dose_is_judged_on_the_spread_and_on_the_rank_measure():
    from sinkscope.paper.verdicts import judge_dose

    found = {f.measurement.split(" across")[0]: f for f in judge_dose(Context("m", dose_frames(12, 1.0, -0.2), {}))}
    spread = next(f for k, f in found.items() if "spread S" in k)
    rank = next(f for k, f in found.items() if "relative residual" in k)
    assert spread.verdict == REPRODUCED and spread.value == pytest.approx(-1.0, abs=1e-12)  # ranks: exact
    assert rank.verdict == REPRODUCED and rank.n_units == 12  # the residual falls with λ: closer to rank one
    other = {f.measurement: f for f in judge_dose(Context("m", dose_frames(12, -1.0, 0.2), {}))}
    assert {f.verdict for k, f in other.items() if "spread S" in k or "relative residual" in k} == {NOT_REPRODUCED}
    few = judge_dose(Context("m", dose_frames(4, 1.0, -0.2), {}))
    assert all(f.verdict == INSUFFICIENT for f in few if "spread S" in f.measurement)

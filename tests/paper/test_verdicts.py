"""The verdict rules as data: each status follows from its rule (premise, units, side, margin, minimum effect,
Holm), on hand-built evidence where the right answer is known."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from helpers import scans
from sinkscope.experiments.base import Result
from sinkscope.paper.verdicts import (
    INCONCLUSIVE,
    INSUFFICIENT,
    NOT_APPLICABLE,
    NOT_MEASURED,
    NOT_REPRODUCED,
    REPRODUCED,
    Context,
    Evidence,
    Rule,
    holm,
    judge,
    judge_dose,
    judge_fig3,
    judge_knockout,
    judge_table2,
    layer_bands,
)

DIFF = Rule("x", "a claim", "Δ", "above", 0.0, 0.1, 0.05, "prompts", "strip vs add")


def noisy(mean: float, n: int = 40, spread: float = 0.05, seed: int = 0) -> np.ndarray:
    return mean + np.random.default_rng(seed).normal(0.0, spread, n)


def test_each_status_follows_from_the_rule():
    zero = np.zeros(40)
    assert judge(DIFF, "m", Evidence(noisy(0.5), zero)).verdict == REPRODUCED
    assert judge(DIFF, "m", Evidence(noisy(-0.5), zero)).verdict == NOT_REPRODUCED  # the other side
    assert judge(DIFF, "m", Evidence(noisy(0.0, spread=0.01), zero)).verdict == NOT_REPRODUCED  # TOST: no effect
    assert judge(DIFF, "m", Evidence(noisy(0.02, n=12, spread=0.5), np.zeros(12))).verdict == INCONCLUSIVE
    small = judge(DIFF, "m", Evidence(noisy(0.03, spread=0.01), zero))  # real, but below the minimum effect
    assert small.verdict in (INCONCLUSIVE, NOT_REPRODUCED) and small.low > 0
    assert judge(DIFF, "m", Evidence(noisy(0.5, n=9), np.zeros(9))).verdict == INSUFFICIENT
    assert judge(DIFF, "m", None, missing="not run").verdict == NOT_MEASURED
    moved = judge(DIFF, "m", Evidence(noisy(0.5), zero), premise=(False, "the sink moved"))
    assert moved.verdict == NOT_APPLICABLE and "the sink moved" in moved.note and moved.value is not None


def test_a_tie_at_the_ceiling_is_no_effect_only_with_enough_units():
    ones = np.ones(30)
    assert judge(DIFF, "m", Evidence(ones, ones)).verdict == NOT_REPRODUCED
    assert judge(DIFF, "m", Evidence(ones[:2], ones[:2])).verdict == INSUFFICIENT


def test_a_predicted_absence_of_change_is_judged_by_equivalence():
    equal = Rule("x", "no change", "Δ", "equal", 0.0, 0.0, 0.05, "windows")
    assert judge(equal, "m", Evidence(noisy(0.0, spread=0.02), np.zeros(40))).verdict == REPRODUCED
    assert judge(equal, "m", Evidence(noisy(0.5), np.zeros(40))).verdict == NOT_REPRODUCED
    ratio = Rule("x", "no change", "a / b", "equal", 1.0, 0.0, 0.2, "prompts", kind="ratio")
    base = noisy(0.6, spread=0.02)
    assert judge(ratio, "m", Evidence(base * 1.05, base)).verdict == REPRODUCED
    assert judge(ratio, "m", Evidence(base * 2.0, base)).verdict == NOT_REPRODUCED


def test_holm_downgrades_a_reproduced_claim_that_does_not_survive_the_correction():
    weak = judge(DIFF, "m", Evidence(noisy(0.3, n=10, spread=0.45, seed=3), np.zeros(10)))
    strong = judge(DIFF, "m", Evidence(noisy(0.5), np.zeros(40)))
    assert weak.p_value is not None and 0.01 < weak.p_value < 0.05 or weak.verdict != REPRODUCED
    corrected = holm([weak] + [strong] * 5)
    assert corrected[1].verdict == REPRODUCED and corrected[1].p_holm >= corrected[1].p_value
    if weak.verdict == REPRODUCED:  # six tests: 0.01 < p < 0.05 does not survive
        assert corrected[0].verdict == INCONCLUSIVE and "Holm" in corrected[0].note


def smoothing(delta: float, n: int = 20, doses: bool = False) -> Result:
    rows = []
    conditions = {"add": 0.0, "strip": delta}
    if doses:
        conditions |= {"add+scale:0.75": 0.02, "add+scale:0.5": 0.04, "add+scale:0.25": 0.06, "add+scale:0": 0.08}
    rng = np.random.default_rng(1)
    for prompt in range(n):
        for condition, shift in conditions.items():
            rows.append({"prompt": prompt, "bos": condition, "layer": 0, "head": 0,
                         "entropy": 1.0 + shift, "entropy_text": 1.0 + shift + rng.normal(0, 0.005)})
    tables = {"smoothing": pd.DataFrame(rows)}
    if doses:
        mass = {"add": 0.8, "strip": 0.8, "add+scale:0.75": 0.6, "add+scale:0.5": 0.4, "add+scale:0.25": 0.2,
                "add+scale:0": 0.0}
        tables["whereabouts"] = pd.DataFrame([{"unit": f"prompt={p}", "condition": c, "alpha_first": m}
                                              for p in range(n) for c, m in mass.items()])
    return Result(tables, {})


def test_a_claim_about_removing_the_sink_is_not_applicable_where_the_sink_moved():
    moved = Context("smol", {**scans(0.7, 0.75), "smoothing": smoothing(-0.04)}, {}, adds_bos=False)
    (finding,) = judge_fig3(moved)
    assert finding.verdict == NOT_APPLICABLE and "moved to the first text token" in finding.note
    removed = Context("gemma", {**scans(0.8, 0.0), "smoothing": smoothing(0.08)}, {})
    assert judge_fig3(removed)[0].verdict == REPRODUCED


def windows(losses: dict[str, float], n: int = 12, spread: float = 0.01) -> Result:
    rng = np.random.default_rng(2)
    rows = [{"condition": c, "window": w, "bucket": "all", "mean_loss": loss + rng.normal(0, spread),
             "n_tokens": 100} for c, loss in losses.items() for w in range(n)]
    return Result({"ablate": pd.DataFrame(rows)}, {})


def test_table2_judges_what_the_paper_predicts_for_each_kind_of_model():
    fixed = Context("g", {**scans(0.8, 0.0), "ablate": windows({"add": 3.0, "strip": 6.0})}, {}, adds_bos=True)
    assert [f.verdict for f in judge_table2(fixed)] == [REPRODUCED, REPRODUCED]
    free = Context("s", {**scans(0.7, 0.72), "ablate": windows({"add": 3.0, "strip": 3.0})}, {}, adds_bos=False)
    assert [f.verdict for f in judge_table2(free)] == [REPRODUCED, REPRODUCED]  # no change, as predicted
    too_few = Context("g", {**scans(0.8, 0.0), "ablate": windows({"add": 3.0, "strip": 6.0}, n=2)}, {})
    assert judge_table2(too_few)[1].verdict == INSUFFICIENT


def test_the_dose_response_reads_a_monotone_trend_per_unit():
    losses = {"add": 3.0, "add+scale:0.75": 3.1, "add+scale:0.5": 3.3, "add+scale:0.25": 3.6, "add+scale:0": 4.0,
              "add+zero-value": 3.005}
    context = Context("m", {"smoothing": smoothing(0.05, doses=True), "ablate": windows(losses, spread=0.005)}, {})
    entropy, spread, rank, loss, noop = judge_dose(context)
    assert spread.verdict == rank.verdict == NOT_MEASURED  # no spread or rank run given
    assert entropy.verdict == REPRODUCED and entropy.value == pytest.approx(-1.0, abs=0.2)
    assert loss.verdict == REPRODUCED and loss.value == pytest.approx(-1.0, abs=1e-12)  # ranks: exact
    assert noop.verdict == REPRODUCED  # zero-value within ±0.05 nats of add
    flat = {c: 3.0 for c in losses}
    _, _, _, loss, _ = judge_dose(Context("m", {"ablate": windows(flat, spread=0.05)}, {}))
    assert loss.verdict in (NOT_REPRODUCED, INCONCLUSIVE)


def test_knockout_is_judged_per_band_against_the_random_key():
    bands = layer_bands(6)
    assert bands == {"early": "0-1", "middle": "2-3", "late": "4-5"}
    losses = {"add": 3.0}
    for name, layers in bands.items():
        losses[f"add+knockout@{layers}"] = 3.5 if name == "early" else 3.01
        losses[f"add+random-key@{layers}"] = 3.01
    findings = judge_knockout(Context("m", {"ablate": windows(losses, spread=0.002)}, {}, meta={"n_layers": 6}))
    assert [f.verdict for f in findings] == [REPRODUCED, NOT_REPRODUCED, NOT_REPRODUCED]
    assert findings[0].conditions == "add+knockout@0-1 vs add+random-key@0-1"
    assert layer_bands(3) == {"early": "0", "middle": "1", "late": "2"}  # the canonical condition spelling


def test_no_change_is_vacuous_where_the_model_cannot_retrieve():
    from sinkscope.paper.verdicts import judge_table3

    rows = [{"task": "niah", "length": 64, "depth": 0.5, "trial": t, "bos": b, "score": 0.0}
            for t in range(12) for b in ("add", "strip")]
    ruler = Result({"ruler": pd.DataFrame(rows)}, {})
    moved = Context("smol", {**scans(0.7, 0.75), "ruler": ruler}, {}, adds_bos=False)
    finding = judge_table3(moved)[1]
    assert finding.verdict == INCONCLUSIVE and "cannot retrieve" in finding.note


def test_each_status_is_explained_with_its_own_numbers():
    zero = np.zeros(40)
    found = judge(DIFF, "m", Evidence(noisy(0.5), zero))
    assert found.interval in found.why and "reaches 0.1" in found.why
    assert "on the other side" in judge(DIFF, "m", Evidence(noisy(-0.5), zero)).why
    assert "TOST p" in judge(DIFF, "m", Evidence(noisy(0.0, spread=0.01), zero)).why
    assert judge(DIFF, "m", Evidence(noisy(0.5, n=9), np.zeros(9))).why.startswith("9 independent units")
    moved = judge(DIFF, "m", Evidence(noisy(0.5), zero), premise=(False, "the sink moved"))
    assert "premise not met" in moved.why and "the sink moved" in moved.why
    weak = judge(DIFF, "m", Evidence(noisy(0.3, n=10, spread=0.45, seed=3), np.zeros(10)))
    if weak.verdict == REPRODUCED:
        (corrected, *_) = holm([weak] + [found] * 5)
        assert corrected.verdict == INCONCLUSIVE and "after Holm" in corrected.why


def test_a_tie_at_the_retrieval_ceiling_says_nothing_either_way():
    from sinkscope.paper.verdicts import judge_table3

    def ruler(with_bos: float, without: float) -> Result:
        rows = [{"task": "niah", "length": 64, "depth": 0.5, "trial": t, "bos": b, "score": s}
                for t in range(30) for b, s in (("add", with_bos), ("strip", without))]
        return Result({"ruler": pd.DataFrame(rows)}, {})

    fixed = Context("gemma", {**scans(0.8, 0.0), "ruler": ruler(1.0, 1.0)}, {}, adds_bos=True)
    (finding,) = [f for f in judge_table3(fixed) if "RULER" in f.measurement]
    assert finding.verdict == INCONCLUSIVE and "too easy" in finding.why  # not "no effect"
    moved = Context("smol", {**scans(0.7, 0.75), "ruler": ruler(1.0, 1.0)}, {}, adds_bos=False)
    (finding,) = [f for f in judge_table3(moved) if "RULER" in f.measurement]
    assert finding.verdict == INCONCLUSIVE  # nor "no change, as predicted"
    mid = Context("smol", {**scans(0.7, 0.75), "ruler": ruler(0.6, 0.6)}, {}, adds_bos=False)
    (finding,) = [f for f in judge_table3(mid) if "RULER" in f.measurement]
    assert finding.verdict == REPRODUCED  # a tie below the ceiling is the predicted absence of change
    dropped = Context("gemma", {**scans(0.8, 0.0), "ruler": ruler(1.0, 0.2)}, {}, adds_bos=True)
    (finding,) = [f for f in judge_table3(dropped) if "RULER" in f.measurement]
    assert finding.verdict == REPRODUCED


def test_every_per_model_section_of_the_plan_has_a_registered_judge():
    """A section added to the plan without a judge would raise a KeyError only when a report is built."""
    from sinkscope.paper.plan import SECTIONS
    from sinkscope.paper.verdicts import JUDGES

    across_models = {"scale", "fig5"}  # judged from all models at once (judge_scale) or the lab (judge_lab)
    assert {s.key for s in SECTIONS} - across_models == set(JUDGES)

"""The verdict rules: each claim's rule is data (`Rule`: premise, measurement, units, direction, margin,
minimum effect), and one function (`judge`) turns a rule and the per-unit evidence into a `Finding`.

The rules were fixed before looking at any model's numbers and are never adjusted to agree with the paper.
Every judge reads only saved tables and summaries, so `sinkscope report` reaches the same verdicts from the
run directories as `sinkscope paper` did.

How a status follows (`judge`):

1. the claim's experiments were not run → *not measured*;
2. its premise does not hold (e.g. without `<bos>` the sink moved to the first text token instead of going
   away, so "without the sink" was never measured) → *not applicable*, with the measured relocation;
3. fewer than ``rule.min_units`` independent units (prompts, windows, texts, runs — never the tokens of one
   text) → *insufficient data*;
4. the 95% bootstrap interval lies on the paper's side of the null and the effect is at least the rule's
   minimum → *reproduced*; on the other side → *not reproduced*; a TOST equivalence test (statsmodels) with
   the rule's margin says "no effect" → *not reproduced*; otherwise *inconclusive*. A claim that predicts no
   change (``direction="equal"``) is *reproduced* by the equivalence test and *not reproduced* by an interval
   outside the margin.
5. Over one report, the one-sided p-values are Holm-corrected (`holm`); a *reproduced* whose corrected
   p-value is not below 0.05 becomes *inconclusive*. Both p-values are shown.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np
import pandas as pd

from ..experiments.base import Result
from ..metrics.stats import (
    bootstrap_interval,
    loglog_slope,
    paired_difference_interval,
    ratio_interval,
    spearman,
    statistic_interval,
)

REPRODUCED, NOT_REPRODUCED, INCONCLUSIVE = "reproduced", "not reproduced", "inconclusive"
INSUFFICIENT, NOT_APPLICABLE, NOT_MEASURED = "insufficient data", "not applicable", "not measured"
STATUSES = (REPRODUCED, NOT_REPRODUCED, INCONCLUSIVE, INSUFFICIENT, NOT_APPLICABLE, NOT_MEASURED)
SINK_EPS = 0.3  # Gu et al.'s threshold for "this head is a sink"
STRICT_EPS = 0.8  # Barbero et al.'s Table 1 threshold
MIN_UNITS = 10  # no verdict below this many independent units
ALPHA = 0.05  # the family-wise error rate of one report (Holm)
RELOCATED = 0.5  # without <bos>, a sink rate at the first text token >= this share of the one at <bos>: moved
DOSES = (1.0, 0.75, 0.5, 0.25, 0.0)  # λ of the dose-response conditions (add+scale:λ)


# -- findings ------------------------------------------------------------------------------------------------
@dataclass
class Finding:
    """One claim tested on one model (or across models): what was measured, how sure, and the status."""

    section: str
    model: str
    claim: str
    measurement: str
    value: float | None
    low: float | None
    high: float | None
    verdict: str
    rule: str
    units: str = ""
    note: str = ""
    n_units: int = 0
    conditions: str = ""  # the conditions compared, in the condition syntax (e.g. "strip vs add")
    p_value: float | None = None  # one-sided, in the paper's direction (the equivalence test's for "equal")
    p_holm: float | None = None  # Holm-corrected over the report's claims
    reason: str = ""  # one sentence: why this status follows from these numbers (set by `judge`, `holm`)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def interval(self) -> str:
        if self.value is None:
            return "n/a"
        if self.low is None or self.high is None:
            return f"{self.value:.3g}"
        return f"{self.value:.3g} [{self.low:.3g}, {self.high:.3g}]"

    @property
    def why(self) -> str:
        """One sentence: why the status follows from the numbers."""
        return self.reason or WHY.get(self.verdict, "")


WHY = {
    REPRODUCED: "the interval lies on the paper's side and the effect reaches the rule's minimum",
    NOT_REPRODUCED: "the interval lies on the other side, or the equivalence test says there is no effect",
    INCONCLUSIVE: "the interval straddles the null and the equivalence test cannot rule an effect out",
    INSUFFICIENT: f"fewer than {MIN_UNITS} independent units",
    NOT_APPLICABLE: "the claim's premise does not hold on this model (see the note)",
    NOT_MEASURED: "the experiments this claim needs were not run",
}


# -- rules ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Rule:
    """A claim's rule, as data. ``direction``: the paper's side of ``null`` ("above", "below"), or "equal"
    when the paper predicts no change. ``min_effect``: the smallest |value - null| that counts as reproduced;
    ``margin``: the equivalence margin of "no effect" (TOST), in the units of the per-unit values. ``kind``:
    "mean" (per-unit values), "difference" (paired a - b per unit) or "ratio" (mean a / mean b over paired
    units; tested on a - null·b)."""

    section: str
    claim: str
    measurement: str
    direction: str
    null: float
    min_effect: float
    margin: float
    units: str
    conditions: str = ""
    kind: str = "difference"
    premise: str = ""  # "sink removed": without <bos> the sink must go away, not move
    min_units: int = MIN_UNITS

    def text(self) -> str:
        side = {"above": f"above {self.null:g}", "below": f"below {self.null:g}",
                "equal": f"within ±{self.margin:g} of {self.null:g}"}[self.direction]
        parts = [f"{self.measurement} over {self.units} (≥ {self.min_units}), 95% bootstrap interval {side}"]
        if self.direction != "equal":
            parts.append(f"effect ≥ {self.min_effect:g}; TOST margin ±{self.margin:g} for 'no effect'")
        if self.premise:
            parts.append(f"premise: {PREMISES[self.premise]}")
        return "; ".join(parts)


PREMISES = {"sink removed": "without ⟨bos⟩ the sink goes away (the first text token does not take it over)"}


@dataclass
class Evidence:
    """Per-unit values for a rule: ``a`` (and ``b`` for a difference or a ratio), aligned by unit."""

    a: np.ndarray
    b: np.ndarray | None = None
    note: str = ""

    def __post_init__(self) -> None:
        self.a = np.asarray(self.a, dtype=np.float64)
        self.b = None if self.b is None else np.asarray(self.b, dtype=np.float64)
        keep = np.isfinite(self.a) & (np.isfinite(self.b) if self.b is not None else True)
        self.a = self.a[keep]
        self.b = None if self.b is None else self.b[keep]

    @property
    def n(self) -> int:
        return int(self.a.size)


def _differences(rule: Rule, evidence: Evidence) -> np.ndarray:
    """The per-unit values the tests run on (null 0 for differences and ratios)."""
    if rule.kind == "mean":
        return evidence.a - rule.null
    assert evidence.b is not None
    if rule.kind == "ratio":
        return evidence.a - rule.null * evidence.b
    return evidence.a - evidence.b - rule.null


def _one_sided_p(values: np.ndarray, direction: str) -> float:
    """p-value of a one-sample t-test of mean > 0 ("above") or < 0 ("below"); exact for constant values."""
    from scipy import stats

    if values.size < 2:
        return float("nan")
    if np.ptp(values) == 0.0:
        mean = float(values[0])
        return 0.0 if (mean > 0 if direction == "above" else mean < 0) else 1.0
    alternative = "greater" if direction == "above" else "less"
    with warnings.catch_warnings():  # nearly constant values: scipy warns, the p-value is still right
        warnings.simplefilter("ignore", RuntimeWarning)
        return float(stats.ttest_1samp(values, 0.0, alternative=alternative).pvalue)


def _equivalence_p(values: np.ndarray, margin: float) -> float:
    """TOST p-value that the mean lies within ±margin (statsmodels); exact for constant values."""
    from statsmodels.stats.weightstats import ttost_paired

    if values.size < 2 or margin <= 0:
        return float("nan")
    if np.ptp(values) == 0.0:
        return 0.0 if abs(float(values[0])) < margin else 1.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return float(ttost_paired(values, np.zeros_like(values), -margin, margin)[0])


def _estimate(rule: Rule, evidence: Evidence, seed: int = 0) -> tuple[float, float, float]:
    if rule.kind == "ratio":
        assert evidence.b is not None
        return ratio_interval(evidence.a, evidence.b, seed=seed)
    if rule.kind == "difference":
        assert evidence.b is not None
        return paired_difference_interval(evidence.a, evidence.b, seed=seed)
    return bootstrap_interval(evidence.a, seed=seed)


def judge(rule: Rule, model: str, evidence: Evidence | None, *, premise: tuple[bool, str] | None = None,
          missing: str = "", note: str = "") -> Finding:
    """The finding of ``rule`` on ``evidence`` (None: not measured, ``missing`` says why)."""
    base = Finding(rule.section, model, rule.claim, rule.measurement, None, None, None, NOT_MEASURED, rule.text(),
                   rule.units, note or missing, 0, rule.conditions)
    if evidence is None:
        return replace(base, reason=f"not measured: {missing}" if missing else WHY[NOT_MEASURED])
    base.n_units, base.note = evidence.n, "; ".join(x for x in (note, evidence.note) if x)
    if evidence.n:
        base.value, base.low, base.high = _estimate(rule, evidence)
    if premise is not None and not premise[0]:
        return replace(base, verdict=NOT_APPLICABLE, note="; ".join(x for x in (premise[1], base.note) if x),
                       reason=f"premise not met ({PREMISES.get(rule.premise, 'comparable conditions')}): "
                              f"{premise[1].split(';')[0]}")
    if evidence.n < rule.min_units:
        return replace(base, verdict=INSUFFICIENT, reason=f"{evidence.n} independent units, fewer than the "
                                                          f"{rule.min_units} the rule needs")
    values = _differences(rule, evidence)
    # a ratio's margin is in ratio units: mean(a) / mean(b) within 1 ± m is mean(a - b) within ±m·mean(b)
    margin = rule.margin * (abs(float(np.mean(evidence.b))) if rule.kind == "ratio" and evidence.b is not None
                            else 1.0)
    p_equivalent = _equivalence_p(values, margin)
    equivalent = p_equivalent < ALPHA
    assert base.value is not None and base.low is not None and base.high is not None
    if rule.direction == "equal":
        outside = (base.low > rule.null + rule.margin) or (base.high < rule.null - rule.margin)
        verdict = REPRODUCED if equivalent else NOT_REPRODUCED if outside else INCONCLUSIVE
        band = f"±{rule.margin:g} of {rule.null:g}"
        reason = {REPRODUCED: f"equivalence shown: TOST p = {p_equivalent:.2g} < {ALPHA:g} for {band}",
                  NOT_REPRODUCED: f"the interval {base.interval} lies outside {band}",
                  INCONCLUSIVE: f"the interval {base.interval} reaches outside {band} and TOST (p = "
                                f"{p_equivalent:.2g}) cannot show equivalence"}[verdict]
        return replace(base, verdict=verdict, p_value=p_equivalent, reason=reason)
    sign = 1.0 if rule.direction == "above" else -1.0
    low, high = sorted((sign * (base.low - rule.null), sign * (base.high - rule.null)))
    effect = sign * (base.value - rule.null)
    if low > 0 and effect >= rule.min_effect:
        verdict = REPRODUCED
    elif high < 0 or equivalent:
        verdict = NOT_REPRODUCED
    else:
        verdict = INCONCLUSIVE
    if verdict == INCONCLUSIVE and low > 0:
        base.note = "; ".join(x for x in (base.note, f"an effect smaller than the rule's minimum "
                                                     f"({rule.min_effect:g})") if x)
    return replace(base, verdict=verdict, p_value=_one_sided_p(values, rule.direction),
                   reason=_side_reason(rule, base.interval, verdict, effect, low > 0, high < 0, p_equivalent))


def _side_reason(rule: Rule, interval: str, verdict: str, effect: float, on_side: bool, other_side: bool,
                 p_equivalent: float) -> str:
    """Why a directional rule gave ``verdict``, in one sentence with the numbers."""
    side = f"{rule.direction} {rule.null:g}"
    if verdict == REPRODUCED:
        return f"the interval {interval} lies {side} and the effect {effect:.3g} reaches {rule.min_effect:g}"
    if verdict == NOT_REPRODUCED and other_side:
        return f"the interval {interval} lies on the other side of {rule.null:g}"
    if verdict == NOT_REPRODUCED:
        return f"no effect: TOST p = {p_equivalent:.2g} < {ALPHA:g} puts it within ±{rule.margin:g} of {rule.null:g}"
    if on_side:
        return (f"the interval {interval} lies {side}, but the effect {effect:.3g} is below the rule's minimum "
                f"{rule.min_effect:g}")
    return (f"the interval {interval} straddles {rule.null:g} and TOST (p = {p_equivalent:.2g}) cannot rule out an "
            f"effect beyond ±{rule.margin:g}")


def holm(findings: Sequence[Finding]) -> list[Finding]:
    """Holm-correct the one-sided p-values of a report's findings (statsmodels); a reproduced finding whose
    corrected p-value is not below `ALPHA` becomes inconclusive."""
    from statsmodels.stats.multitest import multipletests

    tested = [i for i, f in enumerate(findings) if f.p_value is not None and math.isfinite(f.p_value)
              and f.verdict in (REPRODUCED, NOT_REPRODUCED, INCONCLUSIVE)]
    out = list(findings)
    if not tested:
        return out
    adjusted = multipletests([findings[i].p_value for i in tested], alpha=ALPHA, method="holm")[1]
    for i, p in zip(tested, adjusted, strict=True):
        finding = replace(out[i], p_holm=float(p))
        if finding.verdict == REPRODUCED and p >= ALPHA:
            finding.verdict = INCONCLUSIVE
            finding.reason = (f"{finding.reason}, but p = {finding.p_value:.2g} becomes {p:.2g} after Holm over "
                              f"the report's {len(tested)} tests")
            finding.note = "; ".join(x for x in (finding.note, f"not significant after Holm over the report "
                                                               f"(p = {p:.3g})") if x)
        out[i] = finding
    return out


# -- what a judge gets -----------------------------------------------------------------------------------------
@dataclass
class Context:
    """What a judge gets for one model: its results by experiment key (missing: not measured) and facts."""

    model: str
    results: dict[str, Result]
    errors: dict[str, str]
    adds_bos: bool = True
    meta: dict[str, Any] = field(default_factory=dict)

    def absent(self, *keys: str) -> str:
        """Why some of ``keys`` cannot be read ('' when all are there)."""
        gone = [k for k in keys if k not in self.results]
        return "; ".join(f"{k}: {self.errors.get(k, 'not run')}" for k in gone)

    def sink_premise(self) -> tuple[bool, str] | None:
        """Does removing <bos> remove the sink on this model? From the two scans: the sink rate (ε = 0.3) at
        position 0 without <bos> (the first text token) against the one at <bos>. None if not measured."""
        if "scan_add" not in self.results or "scan_strip" not in self.results:
            return None
        add = per_prompt_sink_rate(self.results["scan_add"], SINK_EPS).mean()
        strip = per_prompt_sink_rate(self.results["scan_strip"], SINK_EPS).mean()
        share = float(strip / add) if add > 0 else float("nan")
        if math.isfinite(share) and share >= RELOCATED:
            return False, (f"without ⟨bos⟩ the sink moved to the first text token (sink rate there {strip:.2f} vs "
                           f"{add:.2f} at ⟨bos⟩): 'without the sink' was not measured")
        return True, f"without ⟨bos⟩ the sink rate at position 0 is {strip:.2f} (vs {add:.2f} at ⟨bos⟩)"


def per_prompt_sink_rate(result: Result, eps: float) -> pd.Series:
    """Fraction of (layer, head) with alpha > eps, per prompt (indexed by prompt id)."""
    frame = result.tables["alpha"]
    return (frame["alpha"] > eps).groupby(frame["prompt_id"].astype(str)).mean()


def per_window_loss(result: Result) -> pd.DataFrame:
    """[window x condition] mean loss per window (buckets weighted by their token counts)."""
    frame = result.tables["ablate"].assign(weighted=lambda f: f["mean_loss"] * f["n_tokens"])
    sums = frame.groupby(["window", "condition"])[["weighted", "n_tokens"]].sum()
    return (sums["weighted"] / sums["n_tokens"]).unstack("condition")


def above(low: float, high: float, threshold: float) -> str:
    """The interval alone: above ``threshold`` -> reproduced; below -> not reproduced; else inconclusive."""
    if not (math.isfinite(low) and math.isfinite(high)):
        return INCONCLUSIVE
    return REPRODUCED if low > threshold else NOT_REPRODUCED if high < threshold else INCONCLUSIVE


def below(low: float, high: float, threshold: float) -> str:
    return above(-high, -low, -threshold)


def _paired(frame: pd.DataFrame, first: str, second: str) -> tuple[np.ndarray, np.ndarray] | None:
    """Columns ``first`` and ``second`` of a [unit x condition] frame, units holding both."""
    if first not in frame or second not in frame:
        return None
    both = frame[[first, second]].dropna()
    return both[first].to_numpy(float), both[second].to_numpy(float)


# -- the judges: one per section of the plan, registered by its key ---------------------------------------------
JUDGES: dict[str, Callable[[Context], list[Finding]]] = {}


def judges(section: str) -> Callable[[Callable[[Context], list[Finding]]], Callable[[Context], list[Finding]]]:
    """Register the function that judges a plan section's claims (`paper.plan.SECTIONS` keys)."""

    def register(judge: Callable[[Context], list[Finding]]) -> Callable[[Context], list[Finding]]:
        JUDGES[section] = judge
        return judge

    return register


# -- Table 1 and scale ------------------------------------------------------------------------------------------
TABLE1 = Rule("table1", "most heads are attention sinks", f"sink rate at ε = {SINK_EPS} (with ⟨bos⟩)", "above",
              0.5, 0.05, 0.05, "prompts", "add", kind="mean")


@judges("table1")
def judge_table1(ctx: Context) -> list[Finding]:
    why = ctx.absent("scan_add")
    if why:
        return [judge(TABLE1, ctx.model, None, missing=why)]
    rates = per_prompt_sink_rate(ctx.results["scan_add"], SINK_EPS)
    strict, s_low, s_high = bootstrap_interval(per_prompt_sink_rate(ctx.results["scan_add"], STRICT_EPS).to_numpy())
    return [judge(TABLE1, ctx.model, Evidence(rates.to_numpy()),
                  note=f"at ε = {STRICT_EPS}: {strict:.3f} [{s_low:.3f}, {s_high:.3f}] (paper, LLaMa 3.1 8B: 0.4597)")]


SCALE = Rule("scale", "larger / deeper models have stronger sinks", f"Δ sink rate at ε = {STRICT_EPS}, larger − "
             "smaller model", "above", 0.0, 0.05, 0.05, "shared prompts", "add")


def _family(meta: dict[str, Any]) -> tuple[str, str] | None:
    """(architecture, tokenizer) of a model, or None when the run did not record them."""
    if not meta.get("architecture") or not meta.get("tokenizer"):
        return None
    return str(meta["architecture"]), str(meta["tokenizer"])


def judge_scale(contexts: list[Context], meta: list[dict[str, Any]]) -> list[Finding]:
    """Only across models of one family (same architecture and tokenizer), ordered by total query heads and
    paired by prompt; across families the row is not applicable (size is confounded with everything else).
    The controlled test is the lab's depth sweep (`judge_lab`, seeds as units)."""
    usable = [(c, m) for c, m in zip(contexts, meta, strict=True) if "scan_add" in c.results]
    if len(usable) < 2:
        return [judge(SCALE, "all models", None, missing="needs two or more models of one family")]
    families = {_family(m) for _, m in usable}
    if len(families) > 1 or None in families:
        why = ("the runs do not record the models' architecture and tokenizer" if None in families else
               "the models are of different families (architecture, tokenizer, data)")
        finding = judge(SCALE, " vs ".join(c.model for c, _ in usable), Evidence(np.zeros(0)),
                        premise=(False, f"{why}: a difference between them says nothing about size; the lab's "
                                        "depth sweep (seeds as units) is the controlled test"))
        return [finding]
    usable.sort(key=lambda cm: cm[1]["n_layers"] * cm[1]["n_heads"])
    findings = []
    for (small, _), (large, _) in zip(usable, usable[1:], strict=False):
        a = per_prompt_sink_rate(small.results["scan_add"], STRICT_EPS)
        b = per_prompt_sink_rate(large.results["scan_add"], STRICT_EPS)
        shared = a.index.intersection(b.index)
        findings.append(judge(SCALE, f"{large.model} − {small.model}", Evidence(b[shared], a[shared])))
    return findings


# -- Table 2 -------------------------------------------------------------------------------------------------
def _table2_rules(fixed: bool) -> tuple[Rule, Rule]:
    if fixed:
        claim = "a fixed ⟨bos⟩ carries the sink: removing it destroys the sink and raises the loss"
        return (Rule("table2", claim, "sink rate without / with ⟨bos⟩ (ε = 0.3)", "below", 1.0, 0.5, 0.1,
                     "prompts", "strip vs add", kind="ratio"),
                Rule("table2", claim, "Δloss (nats), without − with ⟨bos⟩", "above", 0.0, 0.05, 0.02, "windows",
                     "strip vs add"))
    claim = "without a fixed ⟨bos⟩ the sink forms on whatever token comes first, and the loss does not change"
    return (Rule("table2", claim, "sink rate without / with ⟨bos⟩ (ε = 0.3)", "equal", 1.0, 0.0, 0.2, "prompts",
                 "strip vs add", kind="ratio"),
            Rule("table2", claim, "Δloss (nats), without − with ⟨bos⟩", "equal", 0.0, 0.0, 0.05, "windows",
                 "strip vs add"))


@judges("table2")
def judge_table2(ctx: Context) -> list[Finding]:
    rate_rule, loss_rule = _table2_rules(ctx.adds_bos)
    findings = []
    why = ctx.absent("scan_add", "scan_strip")
    if why:
        findings.append(judge(rate_rule, ctx.model, None, missing=why))
    else:
        add = per_prompt_sink_rate(ctx.results["scan_add"], SINK_EPS)
        strip = per_prompt_sink_rate(ctx.results["scan_strip"], SINK_EPS)
        shared = add.index.intersection(strip.index)
        findings.append(judge(rate_rule, ctx.model, Evidence(strip[shared], add[shared])))
    why = ctx.absent("ablate")
    paired = None if why else _paired(per_window_loss(ctx.results["ablate"]), "strip", "add")
    findings.append(judge(loss_rule, ctx.model, None if paired is None else Evidence(*paired),
                          missing=why or "ablate has no add / strip windows"))
    return findings


# -- Table 3 -------------------------------------------------------------------------------------------------
CEILING = 0.95  # retrieval accuracy both conditions reach: the task cannot show a drop


def _retrieval_rule(label: str, relocated: bool) -> Rule:
    if relocated:  # the paper's prediction for a model whose sink is not tied to <bos>: no change
        return Rule("table3", "without a fixed ⟨bos⟩, removing it changes nothing (the first token stays the sink)",
                    f"{label}, with − without ⟨bos⟩", "equal", 0.0, 0.0, 0.05, "prompts", "add vs strip")
    return Rule("table3", "removing ⟨bos⟩ lowers performance, most on long-context retrieval",
                f"{label}, with − without ⟨bos⟩", "above", 0.0, 0.05, 0.05, "prompts", "add vs strip")


def _paired_scores(frame: pd.DataFrame, index: list[str], score: str) -> pd.DataFrame:
    """One row per prompt, one column per ⟨bos⟩ condition (prompts measured under both only). A task without
    a target depth has none (NaN), which would drop its rows from the pivot: it is keyed as depth -1."""
    keyed = frame.assign(depth=frame["depth"].astype(float).fillna(-1.0))
    return keyed.pivot_table(index=index, columns="bos", values=score, aggfunc="mean").dropna()


@judges("table3")
def judge_table3(ctx: Context) -> list[Finding]:
    premise = ctx.sink_premise()
    relocated = premise is not None and not premise[0]
    findings = []
    for key, label, index, score in (("passkey", "passkey accuracy", ["length", "depth", "trial"], "correct"),
                                     ("ruler", "RULER-style score", ["task", "length", "depth", "trial"], "score")):
        rule = _retrieval_rule(label, relocated)
        why = ctx.absent(key)
        if why:
            findings.append(judge(rule, ctx.model, None, missing=why))
            continue
        paired = _paired_scores(ctx.results[key].tables[key], index, score)
        if not {"add", "strip"} <= set(paired.columns):
            findings.append(judge(rule, ctx.model, None, missing=f"{key} has no add / strip pairs"))
            continue
        with_bos, without = paired["add"].to_numpy(float), paired["strip"].to_numpy(float)
        note = f"{label} with ⟨bos⟩ {float(with_bos.mean()):.2f}, without {float(without.mean()):.2f}"
        if key == "ruler":
            lengths = ", ".join(str(n) for n in sorted({int(n) for n in paired.index.get_level_values("length")}))
            note += f" ({paired.index.get_level_values('task').nunique()} tasks at {lengths} tokens)"
        if relocated and premise is not None:
            note += f"; {premise[1].split(':')[0]}: the paper predicts no change"
        finding = judge(rule, ctx.model, Evidence(with_bos, without), note=note)
        # a model that cannot retrieve even with <bos> says nothing either way (no effect, or no change, is vacuous);
        # nor does a task both conditions solve: at the ceiling a drop cannot show
        vacuous = finding.verdict == NOT_REPRODUCED or (relocated and finding.verdict == REPRODUCED)
        if vacuous and min(float(with_bos.mean()), float(without.mean())) >= CEILING:
            finding = replace(finding, verdict=INCONCLUSIVE, note=finding.note + f"; both conditions at the ceiling "
                                                                                 f"(≥ {CEILING:g})",
                              reason=f"both conditions score ≥ {CEILING:g} ({float(with_bos.mean()):.2f} and "
                                     f"{float(without.mean()):.2f}): at this length the task is too easy to show a "
                                     "change either way")
        if vacuous and float(with_bos.mean()) < 0.2:
            finding = replace(finding, verdict=INCONCLUSIVE, note=finding.note + "; the model cannot retrieve even "
                                                                                 "with ⟨bos⟩ (accuracy < 0.2)",
                              reason=f"with ⟨bos⟩ the model scores {float(with_bos.mean()):.2f} (< 0.2): it cannot "
                                     "retrieve, so no change says nothing")
        findings.append(finding)
    return findings


# -- Fig. 2-4 ------------------------------------------------------------------------------------------------
FIG2 = Rule("fig2", "a one-token change spreads more without ⟨bos⟩", "R = spread without / with ⟨bos⟩ (Σ over "
            "depths and the text tokens after a one-token swap of ‖h − h'‖₂)", "above", 1.0, 0.1, 0.05,
            "prompts (one swap each)", "strip vs add", kind="ratio", premise="sink removed")


@judges("fig2")
def judge_fig2(ctx: Context) -> list[Finding]:
    """Prompts as units (`spread`); the paper's one text (`perturb`) is shown in the note."""
    notes = []
    if "perturb" in ctx.results:
        summary = ctx.results["perturb"].summary
        notes.append(f"the paper's one text (perturb): R = {summary.get('R_total', float('nan')):.3f}")
    why = ctx.absent("spread")
    if why:
        return [judge(FIG2, ctx.model, None, missing=why, note="; ".join(notes))]
    frame = ctx.results["spread"].tables["spread"]
    totals = frame.groupby(["prompt", "bos"])[["S", "S_normed"]].sum()
    paired = _paired(totals["S"].unstack("bos"), "strip", "add")
    if paired is None:
        return [judge(FIG2, ctx.model, None, missing="spread has no add / strip prompts")]
    normed = totals["S_normed"].unstack("bos")
    notes.append(f"after the final norm R = {float(normed['strip'].mean() / normed['add'].mean()):.3f}")
    return [judge(FIG2, ctx.model, Evidence(*paired), premise=ctx.sink_premise(), note="; ".join(notes))]


FIG3 = Rule("fig3", "attention is smoother without ⟨bos⟩", "Δ normalised entropy (entropy / log keys seen), "
            "without − with ⟨bos⟩", "above", 0.0, 0.01, 0.01, "prompts", "strip vs add", premise="sink removed")


@judges("fig3")
def judge_fig3(ctx: Context) -> list[Finding]:
    why = ctx.absent("smoothing")
    if why:
        return [judge(FIG3, ctx.model, None, missing=why)]
    frame = ctx.results["smoothing"].tables["smoothing"]
    # like for like: with <bos> every row sees one key more, which alone moves the raw entropy
    column = "entropy_norm" if "entropy_norm" in frame else "entropy"
    per_prompt = frame.groupby(["prompt", "bos"])[column].mean().unstack("bos")
    paired = _paired(per_prompt, "strip", "add")
    if paired is None:
        return [judge(FIG3, ctx.model, None, missing="smoothing has no add / strip prompts")]
    notes = []
    for other, label in (("entropy", "raw entropy"), ("entropy_text", "entropy over the text keys alone")):
        if other in frame and other != column:
            means = frame.groupby(["prompt", "bos"])[other].mean().unstack("bos")
            notes.append(f"{label} Δ = {float((means['strip'] - means['add']).mean()):.3f} nats")
    return [judge(FIG3, ctx.model, Evidence(*paired), premise=ctx.sink_premise(), note="; ".join(notes))]


NOOP = Rule("fig4", "the sink's value vector is small (approximate no-op)", "first-token value norm / the median "
            "token's, in sink heads (median per prompt)", "below", 1.0, 0.1, 0.05, "prompts", "add", kind="mean")
CONDITIONAL = Rule("fig4", "a head sinks by default and attends elsewhere after a trigger (the apostrophe head)",
                   "held-out drop of α after the trigger", "above", 0.0, 0.05, 0.02, "held-out texts", "add",
                   kind="mean")


def judge_noop(ctx: Context) -> Finding:
    why = ctx.absent("noop")
    if why:
        return judge(NOOP, ctx.model, None, missing=why)
    frame = ctx.results["noop"].tables["noop"]
    sinks = frame[frame["alpha"] > SINK_EPS]
    per_prompt = sinks.groupby("prompt")["first_value_ratio"].median()
    smallest = float((sinks["first_value_rank"] == 1).mean()) if len(sinks) else float("nan")
    return judge(NOOP, ctx.model, Evidence(per_prompt.to_numpy()),
                 note=f"the first token has the smallest value norm in {smallest:.0%} of (prompt, sink head) pairs")


def held_out_drop(queries: pd.DataFrame) -> tuple[tuple[int, int], pd.Series, pd.Series]:
    """The head with the largest drop on the even texts, and its per-text drop and default α on the odd ones
    (chosen on one half, measured on the other, so the selection does not inflate the number)."""
    visible = queries[queries["sees_first"]]
    keyed = visible.assign(half=visible["prompt"] % 2)

    def drops(part: pd.DataFrame, by: list[str]) -> pd.DataFrame:
        means = part.groupby([*by, "follows_trigger"])["first_attention"].mean().unstack("follows_trigger")
        return means.reindex(columns=[False, True]).rename(columns={False: "other", True: "trigger"})

    chosen = drops(keyed[keyed["half"] == 0], ["layer", "head"])
    best = (chosen["other"] - chosen["trigger"]).idxmax()
    rows = keyed[(keyed["half"] == 1) & (keyed["layer"] == best[0]) & (keyed["head"] == best[1])]
    held = drops(rows, ["prompt"]).dropna()
    return (int(best[0]), int(best[1])), held["other"] - held["trigger"], held["other"]


def judge_conditional(ctx: Context) -> Finding:
    why = ctx.absent("conditional")
    if why:
        return judge(CONDITIONAL, ctx.model, None, missing=why)
    (layer, head), drop, default = held_out_drop(ctx.results["conditional"].tables["queries"])
    finding = judge(CONDITIONAL, ctx.model, Evidence(drop.to_numpy()),
                    note=f"layer {layer} head {head}; its default α on the held-out texts {float(default.mean()):.2f}")
    if finding.verdict == REPRODUCED and float(default.mean()) <= SINK_EPS:
        finding = replace(finding, verdict=NOT_REPRODUCED, note=finding.note + " (not a sink by default)",
                          reason=f"the head drops after the trigger, but its default α {float(default.mean()):.2f} "
                                 f"is not a sink's (≤ {SINK_EPS})")
    return finding


@judges("fig4")
def judge_fig4(ctx: Context) -> list[Finding]:
    return [judge_noop(ctx), judge_conditional(ctx)]


# -- the dose-response: the sink turned down, not moved -------------------------------------------------------
# The entropy over the text keys alone: the dose keeps the text keys' ratios in the layer it acts on, so this
# moves only through what the turned-down sink changes downstream (the full entropy would rise by arithmetic).
DOSE_ENTROPY = Rule("dose", "turning the sink down makes attention over the text mix more",
                    "Spearman ρ(sink mass, entropy over the text keys) across add+scale:λ, λ ∈ {1, .75, .5, .25, 0}",
                    "below", 0.0, 0.3, 0.1, "prompts (ρ per prompt)", "add+scale:λ", kind="mean")
DOSE_LOSS = Rule("dose", "turning the sink down raises the loss", "Spearman ρ(λ, loss) across add+scale:λ, "
                 "λ ∈ {1, .75, .5, .25, 0}", "below", 0.0, 0.3, 0.1, "windows (ρ per window)", "add+scale:λ",
                 kind="mean")
DOSE_SPREAD = Rule("dose", "turning the sink down spreads a one-token change further",
                   "Spearman ρ(λ, spread S) across add+scale:λ, λ ∈ {1, .75, .5, .25, 0}", "below", 0.0, 0.3, 0.1,
                   "prompts (ρ per prompt, one swap each)", "add+scale:λ", kind="mean")
DOSE_RANK = Rule("dose", "turning the sink down brings the text rows closer to rank one",
                 "Spearman ρ(λ, relative residual ‖V − 1μᵀ‖_F / ‖V‖_F of the text rows at the last depth) across "
                 "add+scale:λ, λ ∈ {1, .75, .5, .25, 0}", "above", 0.0, 0.3, 0.1, "prompts (ρ per prompt)",
                 "add+scale:λ", kind="mean")
NOOP_LOSS = Rule("dose", "the sink writes almost nothing: zeroing its value changes the loss little",
                 "Δloss (nats), add+zero-value − add", "equal", 0.0, 0.0, 0.05, "windows", "add+zero-value vs add")


def dose_condition(dose: float) -> str:
    return "add" if dose == 1.0 else f"add+scale:{dose:g}"


def _trend(frame: pd.DataFrame, x: pd.DataFrame | dict[str, float]) -> np.ndarray:
    """Per unit (row of ``frame``: unit x condition), Spearman ρ between x (per condition, or unit x condition)
    and the values, over the conditions the frame has: x's own (a dict), else the all-layer dose's."""
    wanted = list(x) if isinstance(x, dict) else [dose_condition(d) for d in DOSES]
    columns = [c for c in wanted if c in frame]
    out = []
    for unit, row in frame[columns].iterrows():
        xs = np.array([x[c] if isinstance(x, dict) else x.loc[unit, c] for c in columns], dtype=float)
        out.append(spearman(xs, row.to_numpy(float)) if len(columns) >= 3 else np.nan)
    return np.asarray(out, dtype=float)


@judges("dose")
def judge_dose(ctx: Context) -> list[Finding]:
    findings = []
    why = ctx.absent("smoothing")
    if why:
        findings.append(judge(DOSE_ENTROPY, ctx.model, None, missing=why))
    else:
        smoothing = ctx.results["smoothing"]
        frame = smoothing.tables["smoothing"]
        entropy = frame.groupby(["prompt", "bos"])["entropy_text" if "entropy_text" in frame
                                                    else "entropy"].mean().unstack("bos")
        where = smoothing.tables.get("whereabouts")
        if where is None or entropy.shape[1] < 3:
            findings.append(judge(DOSE_ENTROPY, ctx.model, None, missing="smoothing ran no dose conditions"))
        else:
            mass = where.assign(prompt=where["unit"].str.extract(r"prompt=(\d+)", expand=False).astype(int))
            mass = mass.groupby(["prompt", "condition"])["alpha_first"].mean().unstack("condition")
            values = _trend(entropy, mass.reindex(entropy.index))
            curve = {dose_condition(d): float(entropy[dose_condition(d)].mean()) for d in DOSES
                     if dose_condition(d) in entropy}
            findings.append(judge(DOSE_ENTROPY, ctx.model, Evidence(values),
                                  note="entropy by λ: " + ", ".join(f"{k}: {v:.3f}" for k, v in curve.items())))
    findings += [judge_dose_trend(ctx, DOSE_SPREAD, "spread", spread_per_prompt),
                 judge_dose_trend(ctx, DOSE_RANK, "rank_collapse", residual_per_prompt)]
    key = loss_key(ctx)
    why = ctx.absent(key)
    if why:
        return findings + [judge(DOSE_LOSS, ctx.model, None, missing=why),
                           judge(NOOP_LOSS, ctx.model, None, missing=why)]
    losses = per_window_loss(ctx.results[key])
    doses = {dose_condition(d): d for d in DOSES}
    if sum(c in losses for c in doses) < 3:
        findings.append(judge(DOSE_LOSS, ctx.model, None, missing="ablate ran no dose conditions"))
    else:
        curve = {c: float(losses[c].mean()) for c in doses if c in losses}
        findings.append(judge(DOSE_LOSS, ctx.model, Evidence(_trend(losses, doses)),
                              note="loss by λ: " + ", ".join(f"{k}: {v:.3f}" for k, v in curve.items())))
    paired = _paired(losses, "add+zero-value", "add")
    findings.append(judge(NOOP_LOSS, ctx.model, None if paired is None else Evidence(*paired),
                          missing="ablate ran no add+zero-value"))
    return findings + judge_band_doses(ctx, losses)


def spread_per_prompt(result: Result) -> pd.DataFrame:
    """prompt x condition: the spread S summed over depths and text tokens."""
    frame = result.tables["spread"]
    return frame.groupby(["prompt", "bos"])["S"].sum().unstack("bos")


def residual_per_prompt(result: Result) -> pd.DataFrame:
    """prompt x condition: the relative residual of the text rows at the last depth."""
    frame = result.tables.get("text_rows")
    if frame is None:
        return pd.DataFrame()
    last = frame[frame["measure"] == "frobenius_residual"]
    last = last[last["depth"] == last["depth"].max()]
    return last.pivot_table(index="prompt", columns="bos", values="value")


def judge_dose_trend(ctx: Context, rule: Rule, key: str, per_unit: Any) -> Finding:
    """A measure's trend in λ, per unit (Spearman ρ over the dose conditions the unit has)."""
    why = ctx.absent(key)
    if why:
        return judge(rule, ctx.model, None, missing=why)
    values = per_unit(ctx.results[key])
    doses = {dose_condition(d): d for d in DOSES}
    if sum(c in values for c in doses) < 3:
        return judge(rule, ctx.model, None, missing=f"{key} ran no dose conditions")
    curve = ", ".join(f"{c}: {float(values[c].mean()):.3g}" for c in doses if c in values)
    return judge(rule, ctx.model, Evidence(_trend(values, doses)), note=f"by λ: {curve}")


def band_dose_rule(band: str, layers: str) -> Rule:
    return Rule("dose", "turning the sink down in one third of the layers raises the loss",
                f"Spearman ρ(λ, loss) across add, add+scale:0.5@{layers}, add+knockout@{layers} (λ = 1, .5, 0), "
                f"{band} layers", "below", 0.0, 0.3, 0.1, "windows (ρ per window)",
                f"add+scale:λ@{layers}", kind="mean")


def judge_band_doses(ctx: Context, losses: pd.DataFrame) -> list[Finding]:
    """The dose per third of the layers: λ = 1, 0.5, 0 (the knock-out of that band), paired by window."""
    n_layers = int(ctx.meta.get("n_layers", 0))
    findings = []
    for band, layers in (layer_bands(n_layers).items() if n_layers else ()):
        rule = band_dose_rule(band, layers)
        columns = {"add": 1.0, f"add+scale:0.5@{layers}": 0.5, f"add+knockout@{layers}": 0.0}
        if not all(c in losses for c in columns):
            findings.append(judge(rule, ctx.model, None, missing=f"no add+scale:0.5@{layers} loss windows"))
            continue
        curve = ", ".join(f"{c}: {float(losses[c].mean()):.3f}" for c in columns)
        findings.append(judge(rule, ctx.model, Evidence(_trend(losses[list(columns)].dropna(), columns)),
                              note=f"loss {curve}"))
    return findings


def loss_key(ctx: Context) -> str:
    """Where the dose and knock-out loss windows are: their own experiment, or (older runs) `ablate`."""
    return "dose_loss" if "dose_loss" in ctx.results or "ablate" not in ctx.results else "ablate"


# -- collapse, over-squashing, massive activations, knock-out, streaming ---------------------------------------
RANK = Rule("rank", "with the sink, the text tokens' representations stay further from rank one",
            "Δ relative residual ‖V − 1μᵀ‖_F / ‖V‖_F of the text rows at the last depth, with − without ⟨bos⟩",
            "above", 0.0, 0.01, 0.005, "prompts", "add vs strip", premise="sink removed")
REPR = Rule("rank", "last-token representations collapse as the sequence grows",
            "slope of log last-token distance vs log n (repeated tokens, with ⟨bos⟩)", "below", 0.0, 0.1, 0.05,
            "repeated tokens (one sequence each)", "add", kind="mean")


@judges("rank")
def judge_rank(ctx: Context) -> list[Finding]:
    return [judge_rank_collapse(ctx), judge_repr_collapse(ctx)]


def judge_rank_collapse(ctx: Context) -> Finding:
    why = ctx.absent("rank_collapse")
    if why:
        return judge(RANK, ctx.model, None, missing=why)
    result = ctx.results["rank_collapse"]
    note = ("the paper does not test T2 directly: this row tests whether the same text rows end further from "
            "rank one with the sink")
    frame = result.tables.get("text_rows")
    if frame is None:  # runs saved before the text-rows table
        frame = result.tables["rank_collapse"]
        frame = frame[frame["exclude_sink"]]
        note += "; rows: all but the first (older run: not the same rows in both conditions)"
    last = frame[(frame["measure"] == "frobenius_residual")]
    last = last[last["depth"] == last["depth"].max()]
    per_prompt = last.pivot_table(index="prompt", columns="bos", values="value")
    paired = _paired(per_prompt, "add", "strip")
    return judge(RANK, ctx.model, None if paired is None else Evidence(*paired), premise=ctx.sink_premise(),
                 missing="rank collapse has no add / strip prompts", note=note)


def judge_repr_collapse(ctx: Context) -> Finding:
    """Sequences as units: one slope per repeated token (each its own sequence family member)."""
    why = ctx.absent("repr_collapse")
    if why:
        return judge(REPR, ctx.model, None, missing=why)
    frame = ctx.results["repr_collapse"].tables["repr_collapse"]
    rows = frame[(frame["family"] == "repeated") & (frame["bos"] == "add")]
    if "repeat_token" not in rows:  # runs saved before several repeated tokens
        rows = rows.assign(repeat_token="")
    slopes = [loglog_slope(g.sort_values("n")["n"].to_numpy(float), g.sort_values("n")["l2"].to_numpy(float))
              for _, g in rows.groupby("repeat_token") if len(g) >= 2]
    return judge(REPR, ctx.model, Evidence(np.asarray(slopes, dtype=float)),
                 note=f"one slope per repeated token over n = {sorted(rows['n'].unique().tolist())}")


OVERSQUASH = Rule("oversquash", "removing ⟨bos⟩ raises the sensitivity between tokens",
                  "sensitivity ratio s²(strip) / s²(add): mean ‖∂h_j/∂h_i‖²_F over the text sources i shared by "
                  "both conditions, h_j the last text token's state before the final norm", "above", 1.0, 0.1, 0.05,
                  "texts", "strip vs add", kind="ratio", premise="sink removed")


@judges("oversquash")
def judge_oversquash(ctx: Context) -> list[Finding]:
    """Texts as units: per text, the mean s² over its shared sources, with and without ⟨bos⟩."""
    why = ctx.absent("oversquash")
    if why:
        return [judge(OVERSQUASH, ctx.model, None, missing=why)]
    result = ctx.results["oversquash"]
    frame = result.tables["sensitivity"]
    if "text" not in frame:  # runs saved before several texts: one text
        frame = frame.assign(text=0)
    inner = frame[(frame["text_position"] > 0) & (frame["distance"] > 0)]
    per_text = inner.groupby(["text", "bos"])["s2"].mean().unstack("bos")
    if not {"add", "strip"} <= set(per_text.columns):
        return [judge(OVERSQUASH, ctx.model, None, missing="over-squashing has no add / strip sources")]
    notes = [f"{result.summary.get('method', '')}"]
    if "s2_normed" in inner and inner["s2_normed"].notna().any():
        normed = inner.groupby(["text", "bos"])["s2_normed"].mean().unstack("bos")
        notes.append(f"after the final norm R = {float(normed['strip'].mean() / normed['add'].mean()):.3f}")
    paired = per_text[["strip", "add"]].dropna()
    evidence = Evidence(paired["strip"].to_numpy(float), paired["add"].to_numpy(float), note="; ".join(notes))
    return [judge(OVERSQUASH, ctx.model, evidence, premise=ctx.sink_premise())]


MASSIVE = Rule("massive", "massive activations sit on the first token", "share of massive states (> 100× the "
               "median) with the peak at position 0", "above", 0.5, 0.1, 0.05, "prompts", "add", kind="mean")


@judges("massive")
def judge_massive(ctx: Context) -> list[Finding]:
    why = ctx.absent("massive")
    if why:
        return [judge(MASSIVE, ctx.model, None, missing=why)]
    frame = ctx.results["massive"].tables["massive"]
    rows = frame[frame["bos"] == "add"]
    flagged = rows[rows["massive_100x"]]
    share = (flagged["top_token_index"] == 0).groupby(flagged["prompt"]).mean()
    share = share.reindex(sorted(rows["prompt"].unique()), fill_value=0.0)  # none flagged: share 0
    return [judge(MASSIVE, ctx.model, Evidence(share.to_numpy(dtype=float)),
                  note=f"largest max/median ratio {float(rows['ratio'].max()):.0f}")]


def knockout_rule(band: str) -> Rule:
    return Rule("knockout", "removing the attention to the sink hurts the model more than removing any one key",
                f"Δloss(knock-out) − Δloss(random key), {band} layers", "above", 0.0, 0.02, 0.01, "windows",
                f"add+knockout@{band} vs add+random-key@{band}")


def layer_bands(n_layers: int) -> dict[str, str]:
    """Early, middle and late thirds of the layers, as condition layer ranges ("0-9")."""
    edges = [round(n_layers * i / 3) for i in range(4)]
    return {name: str(lo) if hi - 1 == lo else f"{lo}-{hi - 1}"  # the canonical spelling of the condition
            for name, lo, hi in zip(("early", "middle", "late"), edges[:-1], edges[1:], strict=True) if hi > lo}


@judges("knockout")
def judge_knockout(ctx: Context) -> list[Finding]:
    """Per layer band, the knock-out against the equal-budget random-key control, paired by window. All-heads
    knock-out is not judged here: on RoPE models it is the same computation as stripping ⟨bos⟩ (Table 2)."""
    key = loss_key(ctx)
    why = ctx.absent(key)
    n_layers = int(ctx.meta.get("n_layers", 0))
    if why or not n_layers:
        return [judge(knockout_rule("each third of the"), ctx.model, None, missing=why or "number of layers unknown")]
    losses = per_window_loss(ctx.results[key])
    findings = []
    for name, layers in layer_bands(n_layers).items():
        rule = replace(knockout_rule(f"{name} ({layers})"), conditions=f"add+knockout@{layers} vs "
                                                                          f"add+random-key@{layers}")
        first, random = f"add+knockout@{layers}", f"add+random-key@{layers}"
        if first not in losses or random not in losses or "add" not in losses:
            findings.append(judge(rule, ctx.model, None, missing=f"ablate ran no {first} / {random}"))
            continue
        both = losses[[first, random, "add"]].dropna()
        findings.append(judge(rule, ctx.model, Evidence(both[first] - both["add"], both[random] - both["add"]),
                              note="all-heads knock-out in every layer ≡ stripping ⟨bos⟩ on RoPE models: "
                                   "not counted again here"))
    return findings


STREAM = Rule("stream", "keeping the sink tokens in a window cache keeps the loss; a window alone does not",
              "ΔNLL, window only − window with sinks (mean over the positions past the window)", "above", 0.0, 0.05,
              0.02, "segments (consecutive pieces of the text, each streamed from an empty cache)", "add",
              kind="difference")


@judges("stream")
def judge_stream(ctx: Context) -> list[Finding]:
    why = ctx.absent("stream")
    if why:
        return [judge(STREAM, ctx.model, None, missing=why)]
    result = ctx.results["stream"]
    table = result.tables["stream"]
    if "segment" not in table:  # runs saved before segments: one text
        table = table.assign(segment=0)
    evaluated = table[table["position"] >= int(result.summary["eval_start"])]
    caches = evaluated.pivot_table(index="segment", columns="cache", values="nll", aggfunc="mean")
    with_sinks = max((c for c in caches.columns if c.startswith("k=") and c != "k=0"),
                     key=lambda c: int(c[2:]), default=None)
    if with_sinks is None or "k=0" not in caches:
        return [judge(STREAM, ctx.model, None, missing="needs k = 0 and k > 0 caches")]
    ppl = result.summary["ppl"]
    rule = replace(STREAM, measurement=f"{STREAM.measurement}; sinks: {with_sinks}")
    evidence = Evidence(caches["k=0"].to_numpy(float), caches[with_sinks].to_numpy(float),
                        note=f"{len(caches)} segments × {evaluated['position'].nunique()} positions past the window; "
                             "perplexity " + ", ".join(f"{k}: {v:.2f}" for k, v in ppl.items()))
    return [judge(rule, ctx.model, evidence)]


# -- Fig. 5 and depth: the lab ---------------------------------------------------------------------------------
LAB_CONTEXT = Rule("fig5", "longer training contexts give stronger sinks", "Spearman ρ(training context length, "
                   "final sink rate) (ε = 0.3, ⟨bos⟩ + text)", "above", 0.0, 0.3, 0.1, "runs", "bos+text",
                   kind="mean")
LAB_DEPTH = Rule("fig5", "deeper models need the sink more (stronger sinks with depth)", "Spearman ρ(layers, final "
                 "sink rate) (ε = 0.3, ⟨bos⟩ + text)", "above", 0.0, 0.3, 0.1, "runs", "bos+text", kind="mean")
LAB_PACKING = Rule("fig5", "trained with a fixed ⟨bos⟩, removing it at inference destroys the sink (Table 2, "
                   "training side)", "Δ sink rate, ⟨bos⟩ + text − text", "above", 0.0, 0.1, 0.05, "runs",
                   "bos+text vs text")


def _lab_correlation(rule: Rule, runs: pd.DataFrame, column: str) -> Finding:
    x, y = runs[column].to_numpy(float), runs["sink_rate"].to_numpy(float)
    if len(runs) < 2 or np.unique(x).size < 3:
        return judge(rule, "lab", Evidence(np.zeros(len(runs))), note="needs three or more settings")
    value, low, high = statistic_interval(spearman, x, y)
    means = runs.groupby(column)["sink_rate"].mean()
    finding = judge(rule, "lab", Evidence(np.full(len(runs), value)),
                    note="sink rate by setting: " + ", ".join(f"{int(c)}: {v:.2f}" for c, v in means.items()))
    status = finding.verdict
    if finding.n_units >= rule.min_units:
        status = (REPRODUCED if low > 0 and value >= rule.min_effect else NOT_REPRODUCED if high < 0
                  else INCONCLUSIVE)
    reason = finding.reason
    if finding.n_units >= rule.min_units:
        interval = f"ρ = {value:.3g} [{low:.3g}, {high:.3g}] (bootstrap over runs)"
        reason = {REPRODUCED: f"{interval} lies above 0 and reaches {rule.min_effect:g}",
                  NOT_REPRODUCED: f"{interval} lies below 0",
                  INCONCLUSIVE: f"{interval} straddles 0 or stays below {rule.min_effect:g}"}[status]
    return replace(finding, value=value, low=low, high=high, verdict=status, p_value=None, reason=reason)


def judge_lab(summary: pd.DataFrame | None, reason: str) -> list[Finding]:
    if summary is None or summary.empty:
        return [judge(LAB_CONTEXT, "lab", None, missing=reason)]
    strict = summary[(summary["inference"] == "bos+text") & np.isclose(summary["eps"].astype(float), SINK_EPS)]
    findings = []
    context = strict[strict["group"] == "context"]
    if len(context):
        findings.append(_lab_correlation(LAB_CONTEXT, context, "context_length"))
    depth = strict[strict["group"] == "depth"]
    if len(depth) and "model.layers" in depth:
        findings.append(_lab_correlation(LAB_DEPTH, depth, "model.layers"))
    if "packing.bos" in summary:
        fixed = summary[(summary["group"] == "packing") & (summary["packing.bos"].astype(str) == "fixed")
                        & np.isclose(summary["eps"].astype(float), SINK_EPS)]
        paired = fixed.pivot_table(index="run", columns="inference", values="sink_rate")
        if not paired.empty and {"bos+text", "text"} <= set(paired.columns):
            findings.append(judge(LAB_PACKING, "lab", Evidence(paired["bos+text"], paired["text"])))
    return findings or [judge(LAB_CONTEXT, "lab", None, missing="the sweep has no context, depth or packing group")]



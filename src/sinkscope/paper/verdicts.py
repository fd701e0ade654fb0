"""The verdict rules: each section's saved numbers -> a measurement, its 95% bootstrap interval, and
*reproduced* / *not reproduced* / *inconclusive* by a rule written here and printed in the report.

The rules were fixed before looking at any model's numbers and are never adjusted to agree with the paper.
Every judge reads only saved tables and summaries, so `sinkscope report` reaches the same verdicts from the
run directories as `sinkscope paper` did. Intervals are percentile bootstraps over the independent units
the experiment has (prompts, windows, texts, runs); where the only units are tokens of one text, the
report says so.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
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
SINK_EPS = 0.3  # Gu et al.'s threshold for "this head is a sink"
STRICT_EPS = 0.8  # Barbero et al.'s Table 1 threshold


@dataclass
class Finding:
    """One claim tested on one model (or across models): what was measured, how sure, and the verdict."""

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

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def interval(self) -> str:
        if self.value is None:
            return "n/a"
        if self.low is None or self.high is None or (self.low == self.high == self.value):
            return f"{self.value:.3g}"
        return f"{self.value:.3g} [{self.low:.3g}, {self.high:.3g}]"


def above(low: float, high: float, threshold: float) -> str:
    """The interval lies above ``threshold`` -> reproduced; below it -> not reproduced; else inconclusive."""
    if not (math.isfinite(low) and math.isfinite(high)):
        return INCONCLUSIVE
    if low > threshold:
        return REPRODUCED
    if high < threshold:
        return NOT_REPRODUCED
    return INCONCLUSIVE


def below(low: float, high: float, threshold: float) -> str:
    """The interval lies below ``threshold`` -> reproduced; above it -> not reproduced; else inconclusive."""
    flipped = above(-high, -low, -threshold)
    return flipped


@dataclass
class Context:
    """What a judge gets for one model: its results by experiment key (missing: not measured) and facts."""

    model: str
    results: dict[str, Result]
    errors: dict[str, str]
    adds_bos: bool = True

    def missing(self, section: str, claim: str, *keys: str) -> Finding | None:
        """An inconclusive finding naming the experiments that could not be measured, or None."""
        absent = [k for k in keys if k not in self.results]
        if not absent:
            return None
        why = "; ".join(f"{k}: {self.errors.get(k, 'not run')}" for k in absent)
        return Finding(section, self.model, claim, "not measured", None, None, None, INCONCLUSIVE,
                       "needs " + ", ".join(absent), note=why)


# -- helpers on saved tables -------------------------------------------------------------------------------
def per_prompt_sink_rate(result: Result, eps: float) -> pd.Series:
    """Fraction of (layer, head) with alpha > eps, per prompt (indexed by prompt id)."""
    frame = result.tables["alpha"]
    return (frame["alpha"] > eps).groupby(frame["prompt_id"].astype(str)).mean()


def per_window_loss(result: Result) -> pd.DataFrame:
    """[window x condition] mean loss per window (buckets weighted by their token counts)."""
    frame = result.tables["ablate"].assign(weighted=lambda f: f["mean_loss"] * f["n_tokens"])
    sums = frame.groupby(["window", "condition"])[["weighted", "n_tokens"]].sum()
    return (sums["weighted"] / sums["n_tokens"]).unstack("condition")


# -- Table 1 -----------------------------------------------------------------------------------------------
def judge_table1(ctx: Context) -> list[Finding]:
    claim = "most heads are attention sinks"
    absent = ctx.missing("table1", claim, "scan_add")
    if absent:
        return [absent]
    scan = ctx.results["scan_add"]
    rule = f"sink rate at ε = {SINK_EPS} (Gu et al.'s threshold) > 50% of heads, its interval above 50%"
    rates = per_prompt_sink_rate(scan, SINK_EPS)
    value, low, high = bootstrap_interval(rates.to_numpy())
    strict, s_low, s_high = bootstrap_interval(per_prompt_sink_rate(scan, STRICT_EPS).to_numpy())
    return [Finding("table1", ctx.model, claim, f"sink rate at ε = {SINK_EPS} (with ⟨bos⟩)", value, low, high,
                    above(low, high, 0.5), rule, f"{len(rates)} prompts",
                    note=f"at ε = {STRICT_EPS}: {strict:.3f} [{s_low:.3f}, {s_high:.3f}] "
                         "(paper, LLaMa 3.1 8B: 0.4597)")]


def judge_scale(contexts: list[Context], meta: list[dict[str, Any]]) -> list[Finding]:
    """Larger models have stronger sinks: consecutive models by number of query heads, paired by prompt."""
    claim = "larger / deeper models have stronger sinks"
    rule = (f"for models ordered by total query heads (layers × heads), each next model's sink rate at ε = "
            f"{STRICT_EPS} minus the previous one's, paired by prompt, has its interval above 0 (all pairs)")
    usable = [(c, m) for c, m in zip(contexts, meta, strict=True) if "scan_add" in c.results]
    if len(usable) < 2:
        return [Finding("scale", "all models", claim, "needs two or more models", None, None, None, INCONCLUSIVE,
                        rule, note="run with several --model options, or `sinkscope report DIR DIR ...`")]
    usable.sort(key=lambda cm: cm[1]["n_layers"] * cm[1]["n_heads"])
    verdicts, findings = [], []
    for (small, _), (large, _) in zip(usable, usable[1:], strict=False):
        a = per_prompt_sink_rate(small.results["scan_add"], STRICT_EPS)
        b = per_prompt_sink_rate(large.results["scan_add"], STRICT_EPS)
        shared = a.index.intersection(b.index)
        if shared.empty:
            verdicts.append(INCONCLUSIVE)
            continue
        value, low, high = paired_difference_interval(b[shared].to_numpy(), a[shared].to_numpy())
        verdict = above(low, high, 0.0)
        verdicts.append(verdict)
        findings.append(Finding("scale", f"{large.model} − {small.model}", claim,
                                f"Δ sink rate at ε = {STRICT_EPS}", value, low, high, verdict, rule,
                                f"{len(shared)} shared prompts"))
    overall = REPRODUCED if all(v == REPRODUCED for v in verdicts) else (
        NOT_REPRODUCED if any(v == NOT_REPRODUCED for v in verdicts) else INCONCLUSIVE)
    for finding in findings:
        finding.note = f"overall across {len(usable)} models: {overall}"
    return findings


# -- Table 2 -----------------------------------------------------------------------------------------------
def judge_table2(ctx: Context) -> list[Finding]:
    claim = ("a fixed ⟨bos⟩ carries the sink: removing it destroys the sink and raises the loss" if ctx.adds_bos
             else "without a fixed ⟨bos⟩ the sink forms on whatever token comes first")
    absent = ctx.missing("table2", claim, "scan_add", "scan_strip", "ablate")
    if absent:
        return [absent]
    add = per_prompt_sink_rate(ctx.results["scan_add"], SINK_EPS)
    strip = per_prompt_sink_rate(ctx.results["scan_strip"], SINK_EPS)
    shared = add.index.intersection(strip.index)
    ratio, r_low, r_high = ratio_interval(strip[shared].to_numpy(), add[shared].to_numpy())
    losses = per_window_loss(ctx.results["ablate"])
    delta, d_low, d_high = paired_difference_interval(losses["strip"].to_numpy(), losses["add"].to_numpy())
    loss_note = f"Δloss (without − with ⟨bos⟩) {delta:.3f} [{d_low:.3f}, {d_high:.3f}] nats over {len(losses)} windows"
    if ctx.adds_bos:
        rule = ("the tokenizer puts ⟨bos⟩ first (trained with it fixed): sink rate at ε = 0.3 without / with "
                "⟨bos⟩ has its interval below 0.5 AND Δloss (without − with) has its interval above 0")
        parts = [below(r_low, r_high, 0.5), above(d_low, d_high, 0.0)]
    else:
        rule = ("the tokenizer does not put ⟨bos⟩ first (no fixed ⟨bos⟩ in training): sink rate at ε = 0.3 "
                "without / with ⟨bos⟩ has its interval above 0.5 (the first token stays a sink)")
        parts = [above(r_low, r_high, 0.5)]
    verdict = (REPRODUCED if all(p == REPRODUCED for p in parts)
               else NOT_REPRODUCED if any(p == NOT_REPRODUCED for p in parts) else INCONCLUSIVE)
    return [Finding("table2", ctx.model, claim, "sink rate without / with ⟨bos⟩ (ε = 0.3)", ratio, r_low, r_high,
                    verdict, rule, f"{len(shared)} prompts", note=loss_note)]


# -- Table 3 -----------------------------------------------------------------------------------------------
RETRIEVAL_RULE = ("accuracy with − without ⟨bos⟩, paired by prompt: interval above 0 → reproduced; below 0, or "
                  "[0, 0] while the accuracy with ⟨bos⟩ is ≥ 0.2 → not reproduced; otherwise (or when the model "
                  "cannot retrieve even with ⟨bos⟩, accuracy < 0.2) inconclusive")


def retrieval_verdict(with_bos: np.ndarray, without: np.ndarray) -> tuple[float, float, float, str]:
    """The paired difference of per-prompt scores (with − without ⟨bos⟩), its interval and the verdict of
    `RETRIEVAL_RULE` (shared by the passkey and the RULER-style tasks)."""
    value, low, high = paired_difference_interval(with_bos, without)
    accuracy = float(with_bos.mean())
    verdict = above(low, high, 0.0)
    if verdict == INCONCLUSIVE and high <= 0.0 and accuracy >= 0.2:
        verdict = NOT_REPRODUCED
    if accuracy < 0.2 and verdict != REPRODUCED:
        verdict = INCONCLUSIVE
    return value, low, high, verdict


def _paired_scores(frame: pd.DataFrame, index: list[str], score: str) -> pd.DataFrame:
    """One row per prompt, one column per ⟨bos⟩ condition (prompts measured under both only). A task without
    a target depth has none (NaN), which would drop its rows from the pivot: it is keyed as depth -1."""
    keyed = frame.assign(depth=frame["depth"].astype(float).fillna(-1.0))
    return keyed.pivot_table(index=index, columns="bos", values=score, aggfunc="mean").dropna()


def judge_table3(ctx: Context) -> list[Finding]:
    claim = "removing ⟨bos⟩ lowers performance, most on long-context retrieval"
    findings = []
    for key, label, index, score in (("passkey", "passkey accuracy", ["length", "depth", "trial"], "correct"),
                                     ("ruler", "RULER-style score", ["task", "length", "depth", "trial"], "score")):
        absent = ctx.missing("table3", claim, key)
        if absent:
            findings.append(absent)
            continue
        paired = _paired_scores(ctx.results[key].tables[key], index, score)
        with_bos, without = paired["add"].to_numpy(float), paired["strip"].to_numpy(float)
        value, low, high, verdict = retrieval_verdict(with_bos, without)
        note = f"{label} with ⟨bos⟩ {float(with_bos.mean()):.2f}, without {float(without.mean()):.2f}"
        if key == "ruler":
            lengths = ", ".join(str(n) for n in sorted({int(n) for n in paired.index.get_level_values("length")}))
            note += f" ({paired.index.get_level_values('task').nunique()} tasks at {lengths} tokens)"
        if key == "passkey" and "ablate" in ctx.results:
            loss = ctx.results["ablate"].summary["loss"]
            note += f"; perplexity with ⟨bos⟩ {loss['add']['ppl']:.2f}, without {loss['strip']['ppl']:.2f}"
        findings.append(Finding("table3", ctx.model, claim, f"{label}, with − without ⟨bos⟩", value, low, high,
                                verdict, RETRIEVAL_RULE, f"{len(paired)} prompts", note=note))
    return findings


# -- Fig. 2-4 ----------------------------------------------------------------------------------------------
def judge_fig2(ctx: Context) -> list[Finding]:
    claim = "a one-token change spreads more without ⟨bos⟩"
    absent = ctx.missing("fig2", claim, "perturb")
    if absent:
        return [absent]
    result = ctx.results["perturb"]
    frame = result.tables["delta"]
    after = frame[frame["after_swap"]]
    per_token = after.groupby(["bos", "position"])["delta"].sum().unstack("bos")
    value, low, high = ratio_interval(per_token["strip"].to_numpy(), per_token["add"].to_numpy())
    rule = ("R = spread without / with ⟨bos⟩ (sum over depths and the tokens after the swap of ‖h − h'‖₂): "
            "interval above 1 → reproduced, below 1 → not reproduced")
    return [Finding("fig2", ctx.model, claim, "R = S_total(strip) / S_total(add)", value, low, high,
                    above(low, high, 1.0), rule, f"{len(per_token)} tokens after the swap (one text, as the paper)",
                    note=f"relative-norm version R = {result.summary.get('R_total_rel', float('nan')):.3f}")]


def judge_fig3(ctx: Context) -> list[Finding]:
    claim = "attention is smoother without ⟨bos⟩"
    absent = ctx.missing("fig3", claim, "smoothing")
    if absent:
        return [absent]
    frame = ctx.results["smoothing"].tables["smoothing"]
    per_prompt = frame.groupby(["prompt", "bos"])["entropy"].mean().unstack("bos")
    value, low, high = paired_difference_interval(per_prompt["strip"].to_numpy(), per_prompt["add"].to_numpy())
    rule = "mean attention entropy of the text queries, without − with ⟨bos⟩, paired by prompt: interval above 0"
    return [Finding("fig3", ctx.model, claim, "Δ entropy (nats), without − with ⟨bos⟩", value, low, high,
                    above(low, high, 0.0), rule, f"{len(per_prompt)} prompts")]


def judge_noop(ctx: Context) -> Finding:
    claim = "the sink's value vector is small (approximate no-op)"
    absent = ctx.missing("fig4", claim, "noop")
    if absent:
        return absent
    frame = ctx.results["noop"].tables["noop"]
    sinks = frame[frame["alpha"] > SINK_EPS]
    rule = (f"in sink heads (α > {SINK_EPS}), the first token's value norm / the median token's, median per "
            "prompt: interval below 1 → reproduced, above 1 → not reproduced")
    if sinks.empty:
        return Finding("fig4", ctx.model, claim, "no sink heads", None, None, None, INCONCLUSIVE, rule)
    per_prompt = sinks.groupby("prompt")["first_value_ratio"].median()
    value, low, high = bootstrap_interval(per_prompt.to_numpy())
    smallest = float((sinks["first_value_rank"] == 1).mean())
    return Finding("fig4", ctx.model, claim, "first-token value norm / median (sink heads)", value, low, high,
                   below(low, high, 1.0), rule, f"{len(per_prompt)} prompts",
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
    claim = "a head sinks by default and attends elsewhere after a trigger (the apostrophe head)"
    absent = ctx.missing("fig4", claim, "conditional")
    if absent:
        return absent
    result = ctx.results["conditional"]
    rule = ("the head with the largest drop of first-token attention after the trigger, chosen on the even "
            f"texts; on the odd texts its drop has its interval above 0 and its default α > {SINK_EPS}")
    (layer, head), drop, default = held_out_drop(result.tables["queries"])
    if drop.empty:
        return Finding("fig4", ctx.model, claim, "no held-out text with a trigger", None, None, None, INCONCLUSIVE,
                       rule)
    value, low, high = bootstrap_interval(drop.to_numpy())
    verdict = above(low, high, 0.0)
    if verdict == REPRODUCED and float(default.mean()) <= SINK_EPS:
        verdict = NOT_REPRODUCED
    trigger = result.summary.get("trigger", "")
    return Finding("fig4", ctx.model, claim, f"held-out drop of α after {trigger!r}, layer {layer} head {head}",
                   value, low, high, verdict, rule, f"{len(drop)} held-out texts",
                   note=f"default α of that head on the held-out texts {float(default.mean()):.2f}")


def judge_fig4(ctx: Context) -> list[Finding]:
    return [judge_noop(ctx), judge_conditional(ctx)]


# -- collapse, over-squashing, massive activations, knock-out, streaming -------------------------------------
def judge_rank(ctx: Context) -> list[Finding]:
    return [judge_rank_collapse(ctx), judge_repr_collapse(ctx)]


def judge_rank_collapse(ctx: Context) -> Finding:
    claim = "the sink keeps token representations away from rank one"
    absent = ctx.missing("rank", claim, "rank_collapse")
    if absent:
        return absent
    frame = ctx.results["rank_collapse"].tables["rank_collapse"]
    last = frame[(frame["measure"] == "frobenius_residual") & frame["exclude_sink"]]
    last = last[last["depth"] == last["depth"].max()]
    per_prompt = last.pivot_table(index="prompt", columns="bos", values="value")
    value, low, high = paired_difference_interval(per_prompt["add"].to_numpy(), per_prompt["strip"].to_numpy())
    rule = ("relative residual ‖V − 1μᵀ‖_F / ‖V‖_F of the text tokens at the last depth, with − without ⟨bos⟩, "
            "paired by prompt: interval above 0 (further from rank one with the sink)")
    return Finding("rank", ctx.model, claim, "Δ relative residual, with − without ⟨bos⟩", value, low, high,
                   above(low, high, 0.0), rule, f"{len(per_prompt)} prompts")


def judge_repr_collapse(ctx: Context) -> Finding:
    claim = "last-token representations collapse as the sequence grows"
    absent = ctx.missing("rank", claim, "repr_collapse")
    if absent:
        return absent
    frame = ctx.results["repr_collapse"].tables["repr_collapse"]
    rows = frame[(frame["family"] == "repeated") & (frame["bos"] == "add")].sort_values("n")
    rule = ("log-log slope of the last-token L2 distance (sequence vs. the same + its last token repeated) "
            "against n, repeated tokens, with ⟨bos⟩: interval below 0; bootstrap over lengths")
    if len(rows) < 3:
        return Finding("rank", ctx.model, claim, "needs three or more lengths", None, None, None, INCONCLUSIVE, rule)
    value, low, high = statistic_interval(loglog_slope, rows["n"].to_numpy(float), rows["l2"].to_numpy(float))
    strip = frame[(frame["family"] == "repeated") & (frame["bos"] == "strip")].sort_values("n")
    note = ""
    if len(strip):
        note = (f"distance at n = {int(rows['n'].iloc[-1])}: with ⟨bos⟩ {rows['l2'].iloc[-1]:.3g}, without "
                f"{strip['l2'].iloc[-1]:.3g}")
    return Finding("rank", ctx.model, claim, "slope of log distance vs log n", value, low, high,
                   below(low, high, 0.0), rule, f"{len(rows)} lengths", note=note)


def judge_oversquash(ctx: Context) -> list[Finding]:
    claim = "removing ⟨bos⟩ raises the sensitivity between tokens"
    absent = ctx.missing("oversquash", claim, "oversquash")
    if absent:
        return [absent]
    result = ctx.results["oversquash"]
    frame = result.tables["sensitivity"]
    inner = frame[(frame["text_position"] > 0) & (frame["distance"] > 0)]
    paired = inner.pivot_table(index="text_position", columns="bos", values="s2").dropna()
    value, low, high = ratio_interval(paired["strip"].to_numpy(), paired["add"].to_numpy())
    rule = ("mean ‖∂h_j/∂h_i‖²_F over the text sources i (not position 0, not the target), without / with ⟨bos⟩: "
            "interval above 1")
    return [Finding("oversquash", ctx.model, claim, "sensitivity ratio s²(strip) / s²(add)", value, low, high,
                    above(low, high, 1.0), rule, f"{len(paired)} source tokens of one text",
                    note=f"{result.summary.get('method', '')}; path-sum bound ratio R_B = "
                         f"{result.summary.get('R_B_mean', float('nan')):.3f}")]


def judge_massive(ctx: Context) -> list[Finding]:
    claim = "massive activations sit on the first token"
    absent = ctx.missing("massive", claim, "massive")
    if absent:
        return [absent]
    frame = ctx.results["massive"].tables["massive"]
    rows = frame[frame["bos"] == "add"]
    flagged = rows[rows["massive_100x"]]
    rule = ("among residual states (prompt × depth, with ⟨bos⟩) holding an activation > 100× the median, the share "
            "whose largest one is at position 0, per prompt: interval above 0.5; none flagged → not reproduced")
    if flagged.empty:
        return [Finding("massive", ctx.model, claim, "no activation > 100× the median", float(rows["ratio"].max()),
                        None, None, NOT_REPRODUCED, rule, note="value: the largest max/median ratio seen")]
    share = (flagged["top_token_index"] == 0).groupby(flagged["prompt"]).mean()
    value, low, high = bootstrap_interval(share.to_numpy(dtype=float))
    return [Finding("massive", ctx.model, claim, "share of massive states with the peak at position 0", value, low,
                    high, above(low, high, 0.5), rule, f"{len(share)} prompts",
                    note=f"largest max/median ratio {float(rows['ratio'].max()):.0f}")]


def judge_knockout(ctx: Context) -> list[Finding]:
    claim = "removing the attention to the sink hurts the model"
    absent = ctx.missing("knockout", claim, "knockout")
    if absent:
        return [absent]
    everything = ctx.results["knockout"].summary["all_heads"]
    value, se = float(everything["delta_loss"]), float(everything["delta_se"])
    low, high = value - 1.96 * se, value + 1.96 * se
    rule = "Δloss with position 0 hidden from every head: normal 95% interval over tokens above 0"
    return [Finding("knockout", ctx.model, claim, "Δloss (nats), all heads knocked out", value, low, high,
                    above(low, high, 0.0), rule, "tokens of the text windows")]


def judge_stream(ctx: Context) -> list[Finding]:
    claim = "keeping the sink tokens in a window cache keeps the loss; a window alone does not"
    absent = ctx.missing("stream", claim, "stream")
    if absent:
        return [absent]
    result = ctx.results["stream"]
    table = result.tables["stream"]
    evaluated = table[table["position"] >= int(result.summary["eval_start"])]
    caches = evaluated.pivot_table(index="position", columns="cache", values="nll")
    with_sinks = max((c for c in caches.columns if c.startswith("k=") and c != "k=0"),
                     key=lambda c: int(c[2:]), default=None)
    rule = "NLL of the window-only cache (k = 0) − the cache with the most sinks, paired by position: interval above 0"
    if with_sinks is None or "k=0" not in caches:
        return [Finding("stream", ctx.model, claim, "needs k = 0 and k > 0 caches", None, None, None, INCONCLUSIVE,
                        rule)]
    value, low, high = paired_difference_interval(caches["k=0"].to_numpy(), caches[with_sinks].to_numpy())
    ppl = result.summary["ppl"]
    return [Finding("stream", ctx.model, claim, f"ΔNLL, window only − {with_sinks} sinks", value, low, high,
                    above(low, high, 0.0), rule, f"{len(caches)} positions of one text",
                    note="perplexity " + ", ".join(f"{k}: {v:.2f}" for k, v in ppl.items()))]


# -- Fig. 5: the lab ---------------------------------------------------------------------------------------
def judge_lab(summary: pd.DataFrame | None, reason: str) -> list[Finding]:
    claim = "longer training contexts give stronger sinks"
    rule = ("Spearman correlation between training context length and final sink rate (ε = 0.3, "
            "⟨bos⟩ + text), over the context-group runs: bootstrap interval above 0")
    if summary is None or summary.empty:
        return [Finding("fig5", "lab", claim, "not measured", None, None, None, INCONCLUSIVE, rule, note=reason)]
    runs = summary[(summary["group"] == "context") & (summary["inference"] == "bos+text")
                   & np.isclose(summary["eps"].astype(float), SINK_EPS)]
    if runs["context_length"].nunique() < 3:
        return [Finding("fig5", "lab", claim, "needs three or more context lengths", None, None, None, INCONCLUSIVE,
                        rule)]
    x, y = runs["context_length"].to_numpy(float), runs["sink_rate"].to_numpy(float)
    value, low, high = statistic_interval(spearman, x, y)
    means = runs.groupby("context_length")["sink_rate"].mean()
    findings = [Finding("fig5", "lab", claim, "Spearman ρ(context length, sink rate)", value, low, high,
                        above(low, high, 0.0), rule, f"{len(runs)} runs",
                        note="sink rate by context: " + ", ".join(f"{int(c)}: {v:.2f}" for c, v in means.items()))]
    return findings + judge_lab_packing(summary)


def judge_lab_packing(summary: pd.DataFrame) -> list[Finding]:
    claim = "trained with a fixed ⟨bos⟩, removing it at inference destroys the sink (Table 2, training side)"
    rule = ("runs of the packing group trained with a fixed ⟨bos⟩: sink rate (ε = 0.3) with ⟨bos⟩ + text minus "
            "text only, paired by run: interval above 0")
    if "packing.bos" not in summary:
        return []
    fixed = summary[(summary["group"] == "packing") & (summary["packing.bos"].astype(str) == "fixed")
                    & np.isclose(summary["eps"].astype(float), SINK_EPS)]
    paired = fixed.pivot_table(index="run", columns="inference", values="sink_rate")
    if paired.empty or not {"bos+text", "text"} <= set(paired.columns):
        return []
    value, low, high = paired_difference_interval(paired["bos+text"].to_numpy(), paired["text"].to_numpy())
    return [Finding("fig5", "lab", claim, "Δ sink rate, ⟨bos⟩ + text − text", value, low, high,
                    above(low, high, 0.0), rule, f"{len(paired)} runs")]


JUDGES: dict[str, Callable[[Context], list[Finding]]] = {
    "table1": judge_table1, "table2": judge_table2, "table3": judge_table3, "fig2": judge_fig2,
    "fig3": judge_fig3, "fig4": judge_fig4, "rank": judge_rank, "oversquash": judge_oversquash,
    "massive": judge_massive, "knockout": judge_knockout, "stream": judge_stream,
}

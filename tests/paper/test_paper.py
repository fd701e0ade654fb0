"""`sinkscope paper` / `report`: the verdict rules on hand-built numbers, the bootstrap helpers against
direct computations, and a tiny model's plan end to end (caching, escaping, the report from saved runs)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import sinkscope as ss
from helpers import SENTENCES, invoke, tiny_model, tiny_plan, word_tokenizer
from sinkscope.data import Prompt
from sinkscope.experiments.base import Result
from sinkscope.metrics.stats import loglog_slope, spearman, statistic_interval
from sinkscope.paper import QUICK, build_report, run_paper
from sinkscope.paper.plan import SECTIONS, Inputs, one_per_domain, sized
from sinkscope.paper.verdicts import (
    INCONCLUSIVE,
    INSUFFICIENT,
    NOT_APPLICABLE,
    NOT_MEASURED,
    NOT_REPRODUCED,
    REPRODUCED,
    Context,
    above,
    below,
    held_out_drop,
    judge_lab,
    judge_scale,
    judge_table1,
    judge_table3,
)

HOSTILE = "<script>alert('pwned')</script> the cat sat"
TINY = tiny_plan()
FAST = ("scan_add", "scan_strip", "ablate", "perturb", "smoothing")  # the sections with interactive figures


def prompts() -> list[Prompt]:
    return [Prompt(f"p{i}", s, "test") for i, s in enumerate(SENTENCES)] + [Prompt("hostile", HOSTILE, "test")]


def tiny_loaded(seed: int = 0):
    return ss.load(tiny_model("llama", seed), tokenizer=word_tokenizer())


# -- rules and statistics -----------------------------------------------------------------------------------
def test_interval_rules_put_each_case_on_its_side():
    assert above(1.2, 1.5, 1.0) == REPRODUCED and above(0.2, 0.9, 1.0) == NOT_REPRODUCED
    assert above(0.9, 1.1, 1.0) == INCONCLUSIVE and above(float("nan"), 1.0, 0.0) == INCONCLUSIVE
    assert below(0.2, 0.9, 1.0) == REPRODUCED and below(1.2, 1.5, 1.0) == NOT_REPRODUCED
    assert below(0.9, 1.1, 1.0) == INCONCLUSIVE


def test_spearman_and_slope_match_direct_computations():
    rng = np.random.default_rng(0)
    x = rng.permutation(20).astype(float)
    y = x + rng.normal(0, 3, 20)
    ranks = [np.argsort(np.argsort(v)).astype(float) for v in (x, y)]  # no ties: ranks are argsort positions
    assert spearman(x, y) == pytest.approx(np.corrcoef(*ranks)[0, 1])
    assert spearman(np.array([1.0, 2.0, 2.0, 3.0]), np.array([1.0, 2.0, 3.0, 4.0])) == pytest.approx(
        np.corrcoef([1, 2.5, 2.5, 4], [1, 2, 3, 4])[0, 1])
    n = np.array([8.0, 16, 32, 64])
    assert loglog_slope(n, 3.0 * n ** -0.7) == pytest.approx(-0.7)
    value, low, high = statistic_interval(lambda a, b: float(np.mean(a - b)), y, x)
    assert value == pytest.approx(float(np.mean(y - x))) and low < value < high


def scan_result(alpha: np.ndarray, model: str = "m") -> Result:
    """A saved-scan-like result from an [prompts, layers, heads] alpha cube."""
    p, n_layers, n_heads = alpha.shape
    index = pd.MultiIndex.from_product([range(p), range(n_layers), range(n_heads)], names=["prompt", "layer", "head"])
    frame = index.to_frame(index=False).assign(alpha=alpha.reshape(-1), domain="d")
    frame["prompt_id"] = "q" + frame["prompt"].astype(str)
    return Result({"alpha": frame}, {"model": model})


def test_table1_value_is_the_sink_rate_and_the_verdict_follows_the_interval():
    rng = np.random.default_rng(1)
    mostly = rng.uniform(0.35, 1.0, (30, 4, 3))
    mostly[:, 0, :] = 0.01  # one layer of four never sinks: rate 0.75
    finding = judge_table1(Context("m", {"scan_add": scan_result(mostly)}, {}))[0]
    assert finding.value == pytest.approx((mostly > 0.3).mean()) and finding.verdict == REPRODUCED
    rarely = rng.uniform(0.0, 0.29, (30, 4, 3))
    rarely[:, 0, 0] = 0.9
    assert judge_table1(Context("m", {"scan_add": scan_result(rarely)}, {}))[0].verdict == NOT_REPRODUCED
    missing = judge_table1(Context("m", {}, {"scan_add": "the model has no tokenizer"}))[0]
    assert missing.verdict == NOT_MEASURED and "no tokenizer" in missing.note
    few = judge_table1(Context("m", {"scan_add": scan_result(mostly[:9])}, {}))[0]
    assert few.verdict == INSUFFICIENT and few.n_units == 9  # 9 prompts: no verdict


def retrieval_result(key: str, score: str, scores: dict[str, np.ndarray], tasks: tuple[str, ...]) -> Result:
    """A saved passkey / RULER-like result: one row per task x trial x condition (depth None on the second
    task, as a task without a target depth has)."""
    rows = [{"task": task, "length": 64, "depth": 0.5 if t == 0 else None, "trial": trial, "bos": bos,
             score: float(values[t * len(values) // len(tasks) + trial])}
            for bos, values in scores.items() for t, task in enumerate(tasks)
            for trial in range(len(values) // len(tasks))]
    return Result({key: pd.DataFrame(rows)}, {"accuracy": {b: {"mean": float(v.mean())} for b, v in scores.items()}})


def test_table3_pairs_each_prompt_and_judges_passkey_and_ruler_alike():
    rng = np.random.default_rng(3)
    with_bos = rng.uniform(0.6, 1.0, 40)
    ruler = retrieval_result("ruler", "score", {"add": with_bos, "strip": with_bos - 0.3}, ("niah", "vt"))
    tie = (rng.uniform(size=40) < 0.5).astype(float)  # every prompt scores the same with and without
    passkey = retrieval_result("passkey", "correct", {"add": tie, "strip": tie}, ("passkey",))
    judged = judge_table3(Context("m", {"ruler": ruler, "passkey": passkey}, {}))
    found = {f.measurement.split(",")[0]: f for f in judged}
    assert found["RULER-style score"].value == pytest.approx(0.3) and found["RULER-style score"].verdict == REPRODUCED
    assert found["RULER-style score"].n_units == 40  # the depth-less task's rows are kept
    # a tie everywhere: the equivalence test says "no effect"
    assert found["passkey accuracy"].value == 0 and found["passkey accuracy"].verdict == NOT_REPRODUCED
    hopeless = retrieval_result("ruler", "score", {"add": np.zeros(40), "strip": np.zeros(40)}, ("niah", "vt"))
    (missing, ruler_finding) = judge_table3(Context("m", {"ruler": hopeless}, {}))
    assert ruler_finding.verdict == INCONCLUSIVE  # cannot retrieve even with <bos>: says nothing
    assert missing.verdict == NOT_MEASURED
    few = retrieval_result("passkey", "correct", {"add": np.ones(2), "strip": np.ones(2)}, ("passkey",))
    assert judge_table3(Context("m", {"passkey": few}, {}))[0].verdict == INSUFFICIENT  # a tie of 2 says nothing


def test_scale_pairs_prompts_and_orders_models_by_heads():
    rng = np.random.default_rng(2)
    small = rng.uniform(0.0, 1.0, (25, 2, 2))
    large = np.clip(small.repeat(2, axis=1) + 0.3, 0, 1)  # every prompt sinks more in the larger model
    contexts = [Context("large", {"scan_add": scan_result(large)}, {}),
                Context("small", {"scan_add": scan_result(small)}, {})]
    family = {"architecture": "LlamaForCausalLM", "tokenizer": "T/100/<s>"}
    meta = [{"n_layers": 4, "n_heads": 2, **family}, {"n_layers": 2, "n_heads": 2, **family}]
    (finding,) = judge_scale(contexts, meta)
    assert finding.model == "large − small" and finding.verdict == REPRODUCED
    assert finding.value == pytest.approx((large > 0.8).mean() - (small > 0.8).mean())
    assert judge_scale(contexts[:1], meta[:1])[0].verdict == NOT_MEASURED
    other = [meta[0], {**meta[1], "architecture": "Gemma3ForCausalLM"}]
    (across,) = judge_scale(contexts, other)  # two families: size is confounded with everything else
    assert across.verdict == NOT_APPLICABLE and "different families" in across.note


def test_conditional_head_is_chosen_on_half_the_texts_and_measured_on_the_other():
    rows = []
    for prompt in range(6):
        for layer, head in ((0, 0), (0, 1)):
            for follows in (False, True):
                # head (0, 1) drops only on the even texts (the selection half): held out, it does not drop
                drop = 0.6 if (layer, head) == (0, 1) and prompt % 2 == 0 else (0.2 if head == 0 else 0.0)
                rows.append({"prompt": prompt, "layer": layer, "head": head, "follows_trigger": follows,
                             "sees_first": True, "first_attention": 0.9 - (drop if follows else 0.0)})
    best, drop, default = held_out_drop(pd.DataFrame(rows))
    assert best == (0, 1)
    assert drop.tolist() == pytest.approx([0.0, 0.0, 0.0]) and default.tolist() == pytest.approx([0.9] * 3)


def test_lab_rule_reads_a_sweep_summary():
    rows = []
    for seed in (0, 1, 2):
        for context, rate in ((32, 0.05), (64, 0.2), (128, 0.5), (256, 0.7)):
            for inference in ("bos+text", "text"):
                rows.append({"group": "context", "run": f"c{context}-s{seed}", "context_length": context,
                             "inference": inference, "eps": 0.3, "sink_rate": rate + 0.01 * seed})
    finding = judge_lab(pd.DataFrame(rows), "")[0]
    assert finding.value == pytest.approx(spearman(  # the same float64 computation on the same runs
        np.repeat([32, 64, 128, 256], 3).astype(float),
        np.array([r + 0.01 * s for r in (0.05, 0.2, 0.5, 0.7) for s in (0, 1, 2)])), abs=1e-12)
    assert finding.verdict == REPRODUCED and finding.n_units == 12
    two_seeds = pd.DataFrame([r for r in rows if not r["run"].endswith("s2")])
    assert judge_lab(two_seeds, "")[0].verdict == INSUFFICIENT  # 8 runs
    assert judge_lab(None, "no lab run given")[0].verdict == NOT_MEASURED


def test_quick_plan_spreads_prompts_over_domains():
    chosen = one_per_domain(ss.data.probe_set(), 18)
    assert len(chosen) == 18 and len({p.domain for p in chosen}) == 18


# -- a tiny model end to end --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def paper_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("paper")
    run_paper([tiny_loaded()], out, TINY, Inputs(prompts(), "hostile <prompts>.txt"), progress=False, only=FAST)
    build_report([out], out, prompt_texts=[(p.id, p.text) for p in prompts()])
    return out


def test_report_escapes_user_text_and_holds_every_section(paper_dir):
    page = (paper_dir / "report.html").read_text()
    assert "<script>alert(" not in page and "&lt;script&gt;alert(" in page
    assert "hostile &lt;prompts&gt;.txt" in page
    for section in SECTIONS:
        assert f'<section id="{section.key}">' in page
    assert page.count('class="plotly-graph-div"') == 4  # alpha map, entropy difference, two perturbation maps
    assert page.count("<noscript><img") == 4 and '<script src=' not in page  # nothing fetched from the network
    markdown = (paper_dir / "report.md").read_text()
    assert "<script>" not in markdown and "&lt;prompts&gt;" in markdown
    assert "the dose-response: each measure against the measured sink mass" in page  # drawn from the saved runs


def test_findings_come_from_the_saved_tables(paper_dir):
    findings = pd.read_csv(paper_dir / "findings.csv")
    table1 = findings[findings["section"] == "table1"].iloc[0]
    alpha = pd.read_parquet(paper_dir / "LlamaForCausalLM" / "scan_add" / "alpha.parquet")
    assert table1["value"] == pytest.approx((alpha["alpha"] > 0.3).mean())
    not_run = findings[findings["section"] == "stream"].iloc[0]
    assert not_run["verdict"] == NOT_MEASURED and not_run["n_units"] == 0
    assert {"conditions", "n_units", "p_value", "p_holm"} <= set(findings.columns)
    assert findings["n_units"].dtype.kind == "i" and table1["conditions"] == "add"


def test_rerun_reuses_finished_sections_and_remeasures_what_changed(paper_dir, tmp_path):
    manifest = run_paper([tiny_loaded()], paper_dir, TINY, Inputs(prompts(), "x"), progress=False, only=FAST)
    statuses = {k: v["status"] for k, v in manifest["models"][0]["experiments"].items()}
    assert set(statuses.values()) == {"reused"}
    changed = sized(TINY, ablate_windows=1)
    manifest = run_paper([tiny_loaded()], paper_dir, changed, Inputs(prompts(), "x"), progress=False,
                         only=("scan_add", "ablate"))
    statuses = {k: v["status"] for k, v in manifest["models"][0]["experiments"].items()}
    assert statuses == {"scan_add": "reused", "ablate": "measured"}
    summary = json.loads((paper_dir / "LlamaForCausalLM" / "ablate" / "summary.json").read_text())
    assert summary["n_windows"] == 1


def test_report_command_rebuilds_from_saved_runs_and_puts_models_side_by_side(paper_dir, tmp_path):
    other = tmp_path / "other"
    run_paper([ss.load(tiny_model("qwen2", 1), tokenizer=word_tokenizer())], other, TINY, Inputs(prompts(), "x"),
              progress=False, only=("scan_add",))
    out = tmp_path / "side-by-side"
    findings_md = tmp_path / "findings.md"
    result = invoke("report", str(paper_dir), str(other), "--out", str(out), "--findings-md", str(findings_md))
    assert result.exit_code == 0, result.output
    page = (out / "report.html").read_text()
    assert "Qwen2ForCausalLM" in page and "LlamaForCausalLM" in page
    findings = pd.read_csv(out / "findings.csv")
    scale = findings[findings["section"] == "scale"]
    assert len(scale) == 1 and scale["verdict"].iloc[0] == NOT_APPLICABLE  # a Llama and a Qwen2: two families
    assert findings_md.read_text() == (out / "findings.md").read_text()


def test_bad_inputs_are_one_line_errors(tmp_path):
    result = invoke("paper", "--lab", str(tmp_path / "nowhere"), "--out", str(tmp_path / "out"))
    assert result.exit_code == 2 and "not a finished sweep" in result.output
    result = invoke("report", str(tmp_path))
    assert result.exit_code == 2 and "neither" in result.output


@pytest.mark.slow
def test_every_section_runs_on_a_tiny_model(tmp_path):
    manifest = run_paper([tiny_loaded()], tmp_path, TINY, Inputs(prompts(), "x"), progress=False)
    outcomes = manifest["models"][0]["experiments"]
    assert {k for k, v in outcomes.items() if v["status"] == "failed"} <= {"passkey", "ruler"}  # digits are <unk> here
    build_report([tmp_path], tmp_path)
    findings = pd.read_csv(tmp_path / "findings.csv")
    assert set(findings["section"]) == {s.key for s in SECTIONS}


@pytest.mark.bundled
@pytest.mark.slow
def test_table1_on_gemma_matches_its_own_scan(tmp_path):
    from helpers import bundled_gemma

    loaded = bundled_gemma()
    run_paper([loaded], tmp_path, sized(QUICK, scan_prompts=6), progress=False, only=("scan_add", "scan_strip"))
    _, findings = build_report([tmp_path], tmp_path)
    table1 = next(f for f in findings if f.section == "table1")
    scan = ss.scan(loaded, one_per_domain(ss.data.probe_set(), 6), bos="add", progress=False)
    assert table1.value == pytest.approx(scan.sink_rate(0.3))
    assert table1.low <= table1.value <= table1.high


@pytest.mark.slow
def test_paper_command_end_to_end_on_a_model_directory(model_dir, prompt_file, tmp_path):
    out = tmp_path / "report"
    result = invoke("paper", "--model", str(model_dir), "--quick", "--prompts", str(prompt_file), "--out", str(out),
                    "--quiet", "--findings-md", str(tmp_path / "findings.md"))
    assert result.exit_code == 0, result.output
    assert "time per section" in result.output and "report.html" in result.output
    manifest = json.loads((out / "paper.json").read_text())
    assert manifest["prompts"] == prompt_file.name and manifest["lab"]["status"] == "skipped"
    measured = {k for k, v in manifest["models"][0]["experiments"].items() if v["status"] == "measured"}
    assert {"scan_add", "scan_strip", "smoothing", "noop", "rank_collapse", "massive"} <= measured
    assert (tmp_path / "findings.md").read_text() == (out / "findings.md").read_text()

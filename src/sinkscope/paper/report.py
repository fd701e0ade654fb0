"""Build the report from saved runs: report.html (self-contained), report.md, findings.md, findings.csv.

Inputs are `sinkscope paper` output directories (``paper.json`` + one run directory per experiment) or
plain `sinkscope scan` run directories (they join the scale table). Several directories put several models
side by side. Everything shown comes from the saved tables and summaries; verdicts are recomputed by
`verdicts` from them.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..errors import InputError
from ..experiments.base import Result
from ..rundir import atomic_write_bytes, write_table
from ..version import __version__
from . import interactive
from .plan import SECTIONS, Section
from .runner import MANIFEST
from .verdicts import (
    DOSES,
    JUDGES,
    SINK_EPS,
    STRICT_EPS,
    Context,
    Finding,
    dose_condition,
    holm,
    judge_lab,
    judge_scale,
    per_prompt_sink_rate,
    per_window_loss,
    residual_per_prompt,
    spread_per_prompt,
)
from .verdicts import bootstrap_interval as _interval

FINDINGS_MD, FINDINGS_CSV = "findings.md", "findings.csv"


@dataclass
class ModelResults:
    """One model's saved results: its manifest entry (``meta``) and the results by experiment key."""

    meta: dict[str, Any]
    context: Context
    base: Path
    directories: dict[str, Path] = field(default_factory=dict)


@dataclass
class Runs:
    models: list[ModelResults]
    manifests: list[dict[str, Any]]
    lab: pd.DataFrame | None
    lab_reason: str
    sources: list[Path]


def _load_paper_dir(directory: Path, manifest: dict[str, Any]) -> list[ModelResults]:
    models = []
    for meta in manifest["models"]:
        base = directory / meta["directory"]
        results, errors, directories = {}, {}, {}
        for key, outcome in meta["experiments"].items():
            if outcome["status"] == "failed":
                errors[key] = outcome.get("error") or "failed"
                continue
            try:
                results[key] = Result.load(base / key)
                directories[key] = base / key
            except InputError as error:
                errors[key] = str(error)
        context = Context(meta["name"], results, errors, bool(meta.get("adds_bos", True)), meta=meta)
        models.append(ModelResults(meta, context, base, directories))
    return models


def _load_scan_dir(directory: Path) -> ModelResults:
    result = Result.load(directory)
    if result.experiment != "scan":
        raise InputError(f"{directory} holds a {result.experiment} run; `report` reads paper directories or scans")
    info = result.provenance.get("model", {})
    name = str(result.summary.get("model") or info.get("name") or directory.name)
    meta = {"name": name, "directory": directory.name, "n_layers": int(info.get("n_layers", 0)),
            "n_heads": int(info.get("n_heads", 0)), "adds_bos": True, "experiments": {}}
    return ModelResults(meta, Context(name, {"scan_add": result}, {}), directory, {"scan_add": directory})


def _lab_summary(directory: Path, manifest: dict[str, Any]) -> tuple[pd.DataFrame | None, str]:
    state = manifest.get("lab", {})
    if state.get("status") not in ("given", "measured"):
        return None, state.get("reason", "no lab run given")
    lab = Path(state["directory"])
    lab = lab if lab.is_absolute() else directory / lab
    summary = lab / "summary.csv"
    if not summary.is_file():
        return None, f"{lab} holds no finished sweep (no summary.csv)"
    return pd.read_csv(summary), ""


def load_runs(directories: list[Path]) -> Runs:
    """Every model of the given directories (paper outputs or scans), and the first lab sweep found."""
    if not directories:
        raise InputError("give at least one run directory")
    models: list[ModelResults] = []
    manifests: list[dict[str, Any]] = []
    lab, reason = None, "no lab run given (--lab RUN_DIR)"
    for directory in directories:
        manifest_path = directory / MANIFEST
        if manifest_path.is_file():
            manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
            manifests.append(manifest)
            models += _load_paper_dir(directory, manifest)
            if lab is None:
                lab, why = _lab_summary(directory, manifest)
                reason = why or reason
        elif (directory / "summary.json").is_file():
            models.append(_load_scan_dir(directory))
        else:
            raise InputError(f"{directory} is neither a `sinkscope paper` output (no {MANIFEST}) nor a scan run")
    return Runs(models, manifests, lab, reason, list(directories))


# -- findings ----------------------------------------------------------------------------------------------
def findings_for(section: Section, runs: Runs) -> list[Finding]:
    if section.key == "scale":
        return judge_scale([m.context for m in runs.models], [m.meta for m in runs.models])
    if section.key == "fig5":
        return judge_lab(runs.lab, runs.lab_reason)
    findings = []
    for model in runs.models:
        if model.meta.get("experiments") or section.key == "table1":  # scans alone judge only Table 1
            findings += JUDGES[section.key](model.context)
    return findings


# -- tables ------------------------------------------------------------------------------------------------
def _fmt(value: Any) -> str:
    if isinstance(value, (float, np.floating)):
        return "n/a" if not math.isfinite(float(value)) else f"{float(value):.4g}"
    return str(value)


def _with_interval(values: np.ndarray) -> str:
    mean, low, high = _interval(values)
    return f"{mean:.3f} [{low:.3f}, {high:.3f}]"


def scale_table(runs: Runs) -> pd.DataFrame:
    """Table 1 style: one row per model, sink rates at both thresholds with 95% intervals over prompts."""
    rows = []
    for model in runs.models:
        scan = model.context.results.get("scan_add")
        if scan is None:
            continue
        meta = model.meta
        rows.append({
            "model": model.context.model, "layers": meta["n_layers"], "heads": meta["n_heads"],
            "total heads": meta["n_layers"] * meta["n_heads"], "prompts": int(scan.tables["alpha"]["prompt"].nunique()),
            f"sink rate ε={SINK_EPS}": _with_interval(per_prompt_sink_rate(scan, SINK_EPS).to_numpy()),
            f"sink rate ε={STRICT_EPS}": _with_interval(per_prompt_sink_rate(scan, STRICT_EPS).to_numpy()),
            "mean α": float(scan.tables["alpha"]["alpha"].mean()),
        })
    return pd.DataFrame(rows)


def _per_layer(model: ModelResults) -> list[tuple[str, pd.DataFrame]]:
    scan = model.context.results.get("scan_add")
    return [] if scan is None else [(f"{model.context.model}: sink rate per layer (with ⟨bos⟩)",
                                     scan.tables["per_layer"])]


def _bos_table(model: ModelResults) -> list[tuple[str, pd.DataFrame]]:
    results = model.context.results
    rows = []
    for condition, label in (("add", "⟨bos⟩ + text"), ("strip", "text")):
        row: dict[str, Any] = {"model": model.context.model, "input": label}
        scan = results.get(f"scan_{condition}")
        if scan is not None:
            row.update({f"sink rate ε={e}": scan.summary["sink_rate"][str(e)] for e in (SINK_EPS, STRICT_EPS)})
        if "ablate" in results:
            loss = results["ablate"].summary["loss"][condition]
            row.update({"loss (nats)": loss["mean_loss"], "ppl": loss["ppl"]})
        if "passkey" in results:
            row["passkey accuracy"] = results["passkey"].summary["accuracy"].get(condition)
        if "ruler" in results:
            row["RULER-style score"] = results["ruler"].summary["accuracy"].get(condition, {}).get("mean")
        rows.append(row)
    return [(f"{model.context.model}: with vs without ⟨bos⟩", pd.DataFrame(rows))]


def _perturb_table(model: ModelResults) -> list[tuple[str, pd.DataFrame]]:
    result = model.context.results.get("perturb")
    if result is None:
        return []
    rows = [{"bos": bos, **{k: stats[k] for k in ("S_total", "S_final", "S_total_rel", "max_delta_before_swap")}}
            for bos, stats in result.summary["conditions"].items()]
    return [(f"{model.context.model}: spread of “{result.summary['swap']['old']}” → “{result.summary['swap']['new']}”",
             pd.DataFrame(rows))]


def _lab_table(runs: Runs) -> list[tuple[str, pd.DataFrame]]:
    if runs.lab is None or runs.lab.empty:
        return []
    lab = runs.lab[np.isclose(runs.lab["eps"].astype(float), SINK_EPS)]
    table = (lab.groupby(["group", "label", "inference"], sort=False)
             .agg(runs=("run", "nunique"), sink_rate=("sink_rate", "mean"), validation_loss=("validation_loss", "mean"))
             .reset_index())
    return [(f"lab sweep: final sink rate (ε = {SINK_EPS}), mean over seeds", table)]


def tables_for(section: Section, runs: Runs) -> list[tuple[str, pd.DataFrame]]:
    if section.key == "scale":
        table = scale_table(runs)
        return [("sink rate per model (95% interval over prompts)", table)] if len(table) else []
    if section.key == "fig5":
        return _lab_table(runs)
    builders = {"table1": _per_layer, "table2": _bos_table, "table3": _bos_table, "fig2": _perturb_table}
    build = builders.get(section.key)
    if build is None:
        return []
    return [t for model in runs.models if model.meta.get("experiments") or section.key == "table1"
            for t in build(model)]


# -- figures -----------------------------------------------------------------------------------------------
def figures_for(section: Section, runs: Runs) -> list[dict[str, str]]:
    """The PNG figures the experiments saved, inline (base64)."""
    import base64

    paths: list[tuple[str, Path]] = []
    for model in runs.models:
        for key in section.uses:
            directory = model.directories.get(key)
            if directory is not None:
                paths += [(f"{model.context.model} · {key} · {p.stem}", p) for p in sorted(directory.glob("*.png"))]
    if section.key == "fig5" and runs.manifests:
        lab = runs.manifests[0].get("lab", {})
        if lab.get("directory"):
            directory = Path(lab["directory"])
            directory = directory if directory.is_absolute() else runs.sources[0] / directory
            paths += [(f"lab · {p.stem}", p) for p in sorted(directory.glob("*.png"))]
    drawn = [{"caption": caption, "data": base64.b64encode(path.read_bytes()).decode("ascii")}
             for caption, path in paths]
    if section.key == "dose":
        drawn += dose_figures(runs)
    return drawn


def dose_curves(model: ModelResults) -> dict[str, pd.DataFrame]:
    """Per measure, one row per dose condition: the measured sink mass (mean α on position 0) and the
    measure's mean (entropy over the text keys from `smoothing`, loss from `dose_loss`), each against the sink
    mass measured on its own units."""
    results, curves = model.context.results, {}
    doses = [dose_condition(d) for d in DOSES]
    smoothing = results.get("smoothing")
    if smoothing is not None and "whereabouts" in smoothing.tables and "entropy_text" in smoothing.tables["smoothing"]:
        mass = smoothing.tables["whereabouts"].groupby("condition")["alpha_first"].mean()
        entropy = smoothing.tables["smoothing"].groupby("bos")["entropy_text"].mean()
        shared = [c for c in doses if c in mass.index and c in entropy.index]
        if len(shared) >= 2:
            curves["entropy over the text keys (nats)"] = pd.DataFrame(
                {"condition": shared, "sink_mass": mass[shared].to_numpy(), "value": entropy[shared].to_numpy()})
    if smoothing is not None and "whereabouts" in smoothing.tables:  # the same prompts, the same conditions
        mass = smoothing.tables["whereabouts"].groupby("condition")["alpha_first"].mean()
        for label, key, per_prompt in (("spread S of a one-token swap", "spread", spread_per_prompt),
                                       ("relative residual of the text rows", "rank_collapse", residual_per_prompt)):
            if key in results:
                means = per_prompt(results[key]).mean()
                shared = [c for c in doses if c in mass.index and c in means.index]
                if len(shared) >= 2:
                    curves[label] = pd.DataFrame({"condition": shared, "sink_mass": mass[shared].to_numpy(),
                                                  "value": means[shared].to_numpy()})
    ablate = results.get("dose_loss", results.get("ablate"))  # the loss windows under the dose
    if ablate is not None and "whereabouts" in ablate.tables:
        mass = ablate.tables["whereabouts"].groupby("condition")["alpha_first"].mean()  # on those windows
        losses = per_window_loss(ablate).mean()
        shared = [c for c in doses if c in mass.index and c in losses.index]
        if len(shared) >= 2:
            curves["loss (nats)"] = pd.DataFrame(
                {"condition": shared, "sink_mass": mass[shared].to_numpy(), "value": losses[shared].to_numpy()})
    return curves


def dose_figures(runs: Runs) -> list[dict[str, str]]:
    """Each dose-response measure against the measured sink mass, one line per model (drawn from the saved
    tables when the report is built)."""
    import base64
    import io

    from ..report.figures import pyplot

    per_model = [(m.context.model, dose_curves(m)) for m in runs.models]
    measures = sorted({name for _, curves in per_model for name in curves})
    if not measures:
        return []
    plt = pyplot()
    fig, axes = plt.subplots(1, len(measures), figsize=(5 * len(measures), 3.6), squeeze=False)
    for ax, measure in zip(axes[0], measures, strict=True):
        for name, curves in per_model:
            if measure in curves:
                curve = curves[measure]
                ax.plot(curve["sink_mass"], curve["value"], marker="o", label=name)
        ax.set_xlabel("sink mass (mean α on position 0)")
        ax.set_ylabel(measure)
        ax.set_title(f"{measure} vs the dose add+scale:λ", fontsize=9)
        ax.legend(fontsize=8)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    return [{"caption": "the dose-response: each measure against the measured sink mass (λ = 1 at the right)",
             "data": base64.b64encode(buffer.getvalue()).decode("ascii")}]


def interactive_for(section: Section, runs: Runs) -> list[interactive.Heatmap]:
    maps: list[interactive.Heatmap] = []
    for index, model in enumerate(runs.models):
        results, name = model.context.results, model.context.model
        if section.key == "table1" and "scan_add" in results:
            alpha = np.asarray(results["scan_add"].summary["alpha_mean"], dtype=float)
            maps.append(interactive.heatmap(f"{name}: mean attention on the first token α", alpha, x_label="head",
                                            y_label="layer", value_label="α", div_id=f"alpha-{index}"))
        if section.key == "fig3" and "smoothing" in results:
            frame = results["smoothing"].tables["smoothing"]
            entropy = {b: g.pivot_table("entropy", "layer", "head").to_numpy() for b, g in frame.groupby("bos")}
            if {"add", "strip"} <= set(entropy):
                maps.append(interactive.heatmap(f"{name}: Δ entropy, without − with ⟨bos⟩",
                                                entropy["strip"] - entropy["add"], x_label="head", y_label="layer",
                                                value_label="Δ entropy", div_id=f"entropy-{index}"))
        if section.key == "fig2" and "perturb" in results:
            maps += _perturb_maps(results["perturb"], name, index)
    return maps


def _perturb_maps(result: Result, name: str, index: int) -> list[interactive.Heatmap]:
    frame = result.tables["delta"]
    labels = result.summary.get("token_labels")
    maps = []
    for bos, group in frame.groupby("bos", sort=False):
        values = group.pivot(index="depth", columns="position", values="delta").to_numpy()
        maps.append(interactive.heatmap(f"{name}: ‖h − h'‖₂, bos={bos}", values, x_label="token", y_label="depth",
                                        value_label="Δ", div_id=f"perturb-{index}-{bos}", x_text=labels))
    return maps


# -- assembling and writing --------------------------------------------------------------------------------
def _table_payload(caption: str, frame: pd.DataFrame) -> dict[str, Any]:
    return {"caption": caption, "columns": [str(c) for c in frame.columns],
            "rows": [[_fmt(v) for v in row] for row in frame.itertuples(index=False)]}


def _timing(runs: Runs) -> list[dict[str, Any]]:
    if not runs.manifests:
        return []
    seconds = runs.manifests[0].get("section_seconds", {})
    titles = {s.key: s.title for s in SECTIONS} | {"load": "model loading"}
    return [{"section": titles.get(k, k), "seconds": f"{v:.1f}"} for k, v in seconds.items()]


def report_data(runs: Runs) -> dict[str, Any]:
    judged = {section.key: findings_for(section, runs) for section in SECTIONS}
    corrected = iter(holm([f for section in SECTIONS for f in judged[section.key]]))
    judged = {section.key: [next(corrected) for _ in judged[section.key]] for section in SECTIONS}
    sections = []
    for section in SECTIONS:
        sections.append({
            "key": section.key, "title": section.title, "claim": section.claim, "source": section.source,
            "findings": judged[section.key],
            "tables": [_table_payload(c, t) for c, t in tables_for(section, runs)],
            "figures": figures_for(section, runs),
            "interactive": interactive_for(section, runs),
        })
    manifest = runs.manifests[0] if runs.manifests else {}
    return {
        "sections": sections, "findings": [f for s in sections for f in s["findings"]],
        "models": [m.context.model for m in runs.models], "sources": [str(p) for p in runs.sources],
        "plan": manifest.get("plan", {}).get("name", "scan runs"), "prompts": manifest.get("prompts", ""),
        "prompt_examples": _prompt_examples(runs), "timing": _timing(runs), "version": __version__,
        "failures": [(m.context.model, k, e) for m in runs.models for k, e in m.context.errors.items()],
    }


def _prompt_examples(runs: Runs) -> list[dict[str, str]]:
    """The first prompts of the scan, as the models saw them (shown escaped in the report)."""
    for model in runs.models:
        scan = model.context.results.get("scan_add")
        if scan is not None and model.directories.get("scan_add") is not None:
            first = scan.tables["alpha"].drop_duplicates("prompt").head(8)
            return [{"id": str(r.prompt_id), "domain": str(r.domain)} for r in first.itertuples()]
    return []


def _markdown_text(value: Any) -> Any:
    """Markdown output: ``&``, ``<`` and ``>`` as entities, so user text (a prompt holding ``<script>``) is
    shown as text by every Markdown renderer."""
    if isinstance(value, str):
        return value.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return value


def _environment(markdown: bool = False) -> Any:
    """The templates' environment: HTML with autoescape on; Markdown with its own escaping of every value."""
    from jinja2 import Environment, PackageLoader, StrictUndefined

    options: dict[str, Any] = {"finalize": _markdown_text} if markdown else {}
    environment = Environment(loader=PackageLoader("sinkscope.paper", "templates"), autoescape=not markdown,
                              undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True, **options)
    environment.filters["cell"] = lambda text: str(text).replace("|", "\\|").replace("\n", " ")
    environment.filters["pvalue"] = _pvalue
    return environment


def _pvalue(value: float | None) -> str:
    return "—" if value is None or not math.isfinite(float(value)) else f"{float(value):.2g}"


def findings_frame(findings: list[Finding]) -> pd.DataFrame:
    return pd.DataFrame([f.to_dict() for f in findings])


def build_report(directories: list[Path], out: Path, *, findings_md: Path | None = None,
                 prompt_texts: list[tuple[str, str]] | None = None) -> tuple[dict[str, Path], list[Finding]]:
    """Write report.html, report.md, findings.md and findings.csv into ``out`` (and the findings table also
    to ``findings_md``, e.g. the docs). ``prompt_texts``: (id, text) of the prompts, listed in the report.
    Returns the files written and the findings."""
    runs = load_runs(directories)
    data = report_data(runs)
    data["prompt_texts"] = [{"id": i, "text": t} for i, t in (prompt_texts or [])[:20]]
    environment = _environment()
    out.mkdir(parents=True, exist_ok=True)
    page = environment.get_template("report.html.j2").render(**data, plotly_js=interactive.plotly_js())
    written = {"html": out / "report.html", "md": out / "report.md", "findings": out / FINDINGS_MD,
               "csv": out / FINDINGS_CSV}
    atomic_write_bytes(written["html"], page.encode("utf-8"))
    markdown = _environment(markdown=True)
    atomic_write_bytes(written["md"], markdown.get_template("report.md.j2").render(**data).encode("utf-8"))
    findings = markdown.get_template("findings.md.j2").render(**data).encode("utf-8")
    atomic_write_bytes(written["findings"], findings)
    if findings_md is not None:
        atomic_write_bytes(findings_md, findings)
        written["findings_md"] = findings_md
    write_table(written["csv"], findings_frame(data["findings"]))
    return written, data["findings"]

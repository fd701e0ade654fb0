"""Run the plan: one model load per model, every experiment on the shared protocol in its own directory.

Layout of ``--out DIR``::

    paper.json                      what was run: plan size, models, inputs, per-experiment status and times
    <model>/<experiment>/           one run directory per experiment (tables, summary.json, figures)
    lab-sweep/                      the lab sweep, when the plan ran one
    report.html, report.md, findings.md, findings.csv

Caching: an experiment directory whose ``run.json`` fingerprint (settings, model and its file hash,
inputs, versions) equals the one this plan would compute is reused when finished and resumed when not;
a directory with a different fingerprint is measured again from scratch. So re-running ``paper`` with the
same ``--out`` recomputes only what changed.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import SinkscopeError
from ..experiments.base import Experiment, Result, progress_bar, run
from ..models.loader import LoadedModel, load
from ..models.tokens import encode
from ..rundir import child, safe_name, write_json
from .plan import SECTIONS, Inputs, PlanSize, experiments

MANIFEST = "paper.json"
LAB_DIR = "lab-sweep"


@dataclass
class Outcome:
    """How one experiment of the plan went."""

    status: str  # measured | reused | resumed | failed
    seconds: float
    error: str | None = None
    measured_seconds: float | None = None  # what measuring it took when it was measured (its provenance)

    def to_dict(self) -> dict[str, Any]:
        measured = self.seconds if self.measured_seconds is None else self.measured_seconds
        return {"status": self.status, "seconds": round(self.seconds, 3), "error": self.error,
                "measured_seconds": round(measured, 3)}


@dataclass
class ModelRun:
    name: str
    directory: str
    adds_bos: bool
    n_layers: int
    n_heads: int
    architecture: str = ""
    tokenizer: str = ""  # class, vocabulary size and <bos>: models of one family share it
    outcomes: dict[str, Outcome] = field(default_factory=dict)
    load_seconds: float = 0.0


def run_cached(experiment: Experiment, loaded: LoadedModel, directory: Path, bar: Any, command: str | None
               ) -> tuple[Result, str]:
    """Run ``experiment`` in ``directory``: a finished run with the same fingerprint is reused, an unfinished one
    resumed, one measured with other settings (another model file, other versions) replaced."""
    result = run(experiment, loaded, out=directory, resume=True, reuse=True, replace_stale=True, progress=bar,
                 command=command)
    return result, result.run_status


def adds_bos(loaded: LoadedModel) -> bool:
    """Whether the model's tokenizer puts `<bos>` first by default (the model was trained with it fixed)."""
    tokenizer = loaded.tokenizer
    if tokenizer is None or getattr(tokenizer, "bos_token_id", None) is None:
        return False
    ids = encode(tokenizer, "The first token.", "auto", None)
    return bool(ids) and ids[0] == tokenizer.bos_token_id


def tokenizer_label(loaded: LoadedModel) -> str:
    """What identifies a tokenizer across models of one family: its class, vocabulary size and <bos>."""
    tokenizer = loaded.tokenizer
    if tokenizer is None:
        return ""
    return f"{type(tokenizer).__name__}/{len(tokenizer)}/{getattr(tokenizer, 'bos_token', None)}"


def _experiment_order() -> list[tuple[str, str]]:
    """(section key, experiment key) in plan order, each experiment under the first section that uses it."""
    seen: set[str] = set()
    order = []
    for section in SECTIONS:
        for key in section.uses:
            if key not in seen:
                seen.add(key)
                order.append((section.key, key))
    return order


def _run_model(source: Any, out: Path, size: PlanSize, inputs: Inputs, bar: Any, plan_task: Any,
               command: str | None, only: Sequence[str] | None) -> ModelRun:
    started = time.time()
    bar.update(plan_task, description=f"loading {source if isinstance(source, str) else 'model'}")
    loaded = load(source)
    info = loaded.info
    model_run = ModelRun(info.name, safe_name(info.name.replace("/", "--")), adds_bos(loaded), info.n_layers,
                         info.n_heads, str(info.architecture), tokenizer_label(loaded),
                         load_seconds=time.time() - started)
    planned = experiments(size, inputs, info.n_layers)
    for _, key in _experiment_order():
        if only is not None and key not in only:
            bar.advance(plan_task)
            continue
        bar.update(plan_task, description=f"{info.name}: {key}")
        tick = time.time()
        directory = child(out, model_run.directory, key)
        try:
            result, status = run_cached(planned[key], loaded, directory, bar, command)
            measured = result.summary.get("provenance", {}).get("seconds") if status == "reused" else None
            model_run.outcomes[key] = Outcome(status, time.time() - tick, measured_seconds=measured)
        except SinkscopeError as error:  # this section cannot be measured on this model: say so, go on
            model_run.outcomes[key] = Outcome("failed", time.time() - tick, str(error))
        bar.advance(plan_task)
    return model_run


def _run_lab(out: Path, size: PlanSize, lab: Path | None, bar: Any, plan_task: Any) -> dict[str, Any]:
    """The lab section's source: a finished sweep given with --lab, a preset sweep run now, or nothing."""
    if lab is not None:
        return {"status": "given", "directory": str(lab), "seconds": 0.0}
    if size.lab_preset is None:
        return {"status": "skipped", "reason": "no lab run given (--lab RUN_DIR)", "seconds": 0.0}
    from ..lab import load_sweep_config
    from ..lab.sweep import run_sweep

    bar.update(plan_task, description=f"lab: sweep {size.lab_preset}")
    tick = time.time()
    try:
        run_sweep(load_sweep_config(size.lab_preset), child(out, LAB_DIR), resume=True, jobs=2, threads=1,
                  progress=False)
    except SinkscopeError as error:
        return {"status": "failed", "reason": str(error), "seconds": time.time() - tick}
    return {"status": "measured", "directory": LAB_DIR, "seconds": time.time() - tick}


def section_seconds(manifest: dict[str, Any]) -> dict[str, float]:
    """Seconds per section over all models (an experiment counts for the first section that uses it): what
    measuring took, also for an experiment reused from the cache (its own recorded time)."""
    owner = {key: section for section, key in _experiment_order()}
    seconds: dict[str, float] = {s.key: 0.0 for s in SECTIONS}
    seconds["load"] = 0.0
    for model in manifest["models"]:
        seconds["load"] += model["load_seconds"]
        for key, outcome in model["experiments"].items():
            seconds[owner[key]] += outcome.get("measured_seconds", outcome["seconds"])
    seconds["fig5"] += manifest["lab"].get("seconds", 0.0)
    return seconds


def run_paper(models: Sequence[Any], out: str | Path, size: PlanSize, inputs: Inputs | None = None, *,
              lab: Path | None = None, progress: bool = True, command: str | None = None,
              only: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the whole plan for each model (a name, a path or a loaded model), then the lab; write the
    manifest ``paper.json`` and return it. The report is built from the directory by `build_report`.
    ``only``: run just these experiment keys (the other sections are reported as not measured)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    inputs = inputs or Inputs()
    started = time.time()
    n_experiments = len(_experiment_order())
    runs: list[ModelRun] = []
    with progress_bar("paper", progress) as bar:
        plan_task = bar.add_task("plan", total=n_experiments * len(models) + 1)
        for source in models:
            runs.append(_run_model(source, out, size, inputs, bar, plan_task, command, only))
        lab_state = _run_lab(out, size, lab, bar, plan_task)
        bar.advance(plan_task)
    manifest = {
        "plan": size.to_dict(), "prompts": inputs.source, "n_prompts_given": len(inputs.prompts),
        "command": command,
        "models": [{"name": r.name, "directory": r.directory, "adds_bos": r.adds_bos, "n_layers": r.n_layers,
                    "n_heads": r.n_heads, "architecture": r.architecture, "tokenizer": r.tokenizer,
                    "load_seconds": round(r.load_seconds, 3),
                    "experiments": {k: o.to_dict() for k, o in r.outcomes.items()}} for r in runs],
        "lab": lab_state, "seconds": round(time.time() - started, 3),
    }
    manifest["section_seconds"] = {k: round(v, 3) for k, v in section_seconds(manifest).items()}
    write_json(out / MANIFEST, manifest)
    return manifest

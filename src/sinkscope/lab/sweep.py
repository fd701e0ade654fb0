"""Sweeps: a grid of training runs, run side by side, then one table and one figure for all of them.

Each run is an ordinary `train` run in ``<out>/<run name>/`` (so it resumes on its own). ``jobs`` runs that
many at once in worker processes, each with ``threads`` torch threads: small models use cores better as
parallel runs than as threads of one run.
"""

from __future__ import annotations

import json
import os
import time
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import pandas as pd

from ..faults import stall_at
from ..rundir import write_json, write_table
from .config import LabConfigError, SweepConfig, SweepRun, TrainConfig
from .train import CHECKPOINT, LabRunError, eval_table, read_rows, sink_table, train


@dataclass
class SweepResult:
    out: Path
    summary: pd.DataFrame  # one row per run x inference input x eps: final sink rate and losses
    sinks: pd.DataFrame  # every run's sink rows, with run and group columns
    figure: Path | None
    seconds: float


def _run_one(config: dict[str, Any], out: str, resume: bool, threads: int) -> str:
    import torch

    torch.set_num_threads(threads)
    # a run the sweep never reached has nothing to resume
    train(config, out, resume=resume and (Path(out) / "config.json").is_file(), progress=False)
    return out


def _work(config: TrainConfig) -> int:
    """A run's training cost, roughly: tokens x layers x width² (for ordering runs, not for reporting)."""
    return config.steps * config.tokens_per_step * config.model.layers * config.model.hidden_size ** 2


def _finished(out: Path) -> bool:
    state = out / CHECKPOINT / "trainer_state.json"
    return state.is_file() and bool(json.loads(state.read_text()).get("finished"))


def _last_step(out: Path) -> int:
    rows = read_rows(out / "log.jsonl")
    return int(rows[-1]["step"]) if rows else 0


def collect(sweep: SweepConfig, out: Path) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, dict[str, Any]]]:
    """(summary, all sink rows, figure groups) from whatever the run directories hold now."""
    frames, summary, groups = [], [], {}
    for run in sweep.runs():
        directory = out / run.directory
        sinks, evals = sink_table(directory), eval_table(directory)
        if sinks.empty:
            continue
        # runs that differ only in their seed share a label: tables and figures average over seeds
        label = ", ".join(f"{k.split('.')[-1]}={v}" for k, v in run.overrides.items() if k != "seed") or "base"
        previous = groups.setdefault(run.group, {}).get(label)
        if previous is not None:
            sinks_all, evals_all = pd.concat([previous[0], sinks]), pd.concat([previous[1], evals])
        else:
            sinks_all, evals_all = sinks, evals
        groups[run.group][label] = (sinks_all, evals_all)
        frames.append(sinks.assign(run=run.name, group=run.group, label=label,
                                   **{k: str(v) for k, v in run.overrides.items()}))
        last_step = sinks.step.max()
        final = sinks[sinks.step == last_step]
        last_eval = evals[evals.step == evals.step.max()].iloc[0].to_dict() if len(evals) else {}
        for (inference, eps), part in final.groupby(["inference", "eps"], sort=False):
            summary.append({
                "group": run.group, "run": run.name, "label": label, **{k: v for k, v in run.overrides.items()},
                "inference": inference, "eps": eps, "step": int(last_step), "tokens": int(part.tokens.iloc[0]),
                "sink_rate": float(part.sink_rate.mean()), "mean_alpha": float(part.mean_alpha.mean()),
                "validation_loss": last_eval.get("validation"),
                "probe_loss": last_eval.get(f"probe[{inference}]"),
                "finished": _finished(directory),
            })
    all_sinks = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    return pd.DataFrame(summary), all_sinks, groups


def final_by_layer(sinks: pd.DataFrame, step: int | None = None) -> pd.DataFrame:
    """Each run's last evaluation (or the one at `step`), per layer: group, label, inference, eps, layer,
    layers (the model's depth), step, sink_rate, mean_alpha (means over the seeds that share a label), runs."""
    if sinks.empty:
        return pd.DataFrame()
    final = sinks[sinks.step == (sinks.groupby("run").step.transform("max") if step is None else step)]
    final = final.assign(layers=final.groupby("run").layer.transform("max") + 1)
    return (final.groupby(["group", "label", "inference", "eps", "layer"], sort=False)
            .agg(layers=("layers", "first"), step=("step", "max"), sink_rate=("sink_rate", "mean"),
                 mean_alpha=("mean_alpha", "mean"), runs=("run", "nunique"))
            .reset_index())


def write_sweep_outputs(sweep: SweepConfig, out: Path) -> tuple[pd.DataFrame, pd.DataFrame, Path | None]:
    from ..report.figures import plot_final_sink_rate, plot_sink_rate_over_training
    from ..report.figures.lab import plot_final_sink_rate_by_layer

    summary, sinks, groups = collect(sweep, out)
    figure = None
    if not summary.empty:
        write_table(out / "summary.csv", summary)
        write_table(out / "sinks.parquet", sinks.astype({c: str for c in sinks.columns if sinks[c].dtype == object}))
        by_layer = final_by_layer(sinks)
        write_table(out / "final_by_layer.csv", by_layer)
        figure = plot_sink_rate_over_training(groups, out / "sink_rate_over_training.png")
        plot_final_sink_rate(summary, out / "final_sink_rate.png")
        plot_final_sink_rate_by_layer(by_layer, out / "final_sink_rate_by_layer.png")
    return summary, sinks, figure


def _markdown_table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


def _summary_rows(summary: pd.DataFrame, eps_values: list[float]) -> list[list[str]]:
    rows = []
    for (group, label, inference), part in summary.groupby(["group", "label", "inference"], sort=False):
        rows.append([group, label, inference, str(part.run.nunique()), f"{int(part.tokens.max()):,}",
                     "yes" if part.finished.all() else "no",
                     *[f"{part[part.eps == e].sink_rate.mean():.3f}" for e in eps_values],
                     f"{part[part.eps == eps_values[0]].mean_alpha.mean():.3f}",
                     f"{part.validation_loss.mean():.3f}", f"{part.probe_loss.mean():.3f}"])
    return rows


def _layer_rows(by_layer: pd.DataFrame, width: int) -> list[list[str]]:
    rows = []
    for (group, label, inference), part in by_layer.groupby(["group", "label", "inference"], sort=False):
        cells = dict(zip(part.layer.astype(int), part.sink_rate, strict=True))
        rows.append([group, label, inference, f"{part.sink_rate.mean():.3f}",
                     *[f"{cells[k]:.3f}" if k in cells else "" for k in range(width)]])
    return rows


def sweep_markdown(name: str, summary: pd.DataFrame, sinks: pd.DataFrame) -> str:
    """The sweep's numbers as markdown, for the docs (``sinkscope sweep --markdown``): per run at its last
    evaluation, then per layer at the first eps, at the last evaluation every run has reached (the end of
    training once all have finished), so runs are compared after equal numbers of tokens."""
    eps_values = sorted(summary.eps.unique())
    lines = [f"Sweep `{name}`: each run at its last evaluation (means over seeds).", ""]
    lines += _markdown_table(["group", "run", "input", "seeds", "tokens", "finished",
                              *[f"sink rate ε={e:g}" for e in eps_values], "mean α", "val loss", "probe loss"],
                             _summary_rows(summary, eps_values))
    common = int(sinks.groupby("run").step.max().min())
    tokens = int(sinks[sinks.step == common].tokens.iloc[0])
    by_layer = final_by_layer(sinks, common)
    chosen = by_layer[by_layer.eps == eps_values[0]]
    width = int(chosen.layer.max()) + 1
    lines += ["", f"Sink rate (ε = {eps_values[0]:g}) per layer (attention block; 0 = first) and its mean over "
              f"layers (= over all heads), every run after {tokens:,} tokens (step {common}):", ""]
    lines += _markdown_table(["group", "run", "input", "all layers", *[f"layer {k}" for k in range(width)]],
                             _layer_rows(chosen, width))
    return "\n".join(lines) + "\n"


def select_runs(sweep: SweepConfig, only: list[str] | None) -> list[SweepRun]:
    """The sweep's runs, or those named (by run or group) in ``only``."""
    runs = sweep.runs()
    if not only:
        return runs
    unknown = sorted(set(only) - {r.name for r in runs} - {r.group for r in runs})
    if unknown:
        raise LabConfigError(f"no run or group {unknown} in sweep {sweep.name} "
                             f"(runs: {', '.join(r.name for r in runs)})")
    return [r for r in runs if r.name in only or r.group in only]


def open_sweep_dir(sweep: SweepConfig, out: Path, resume: bool) -> None:
    if out.exists() and not out.is_dir():
        raise LabRunError(f"--out {out} is a file, not a sweep directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise LabRunError(f"cannot create the sweep directory {out}: {error.strerror or error}; "
                          "pick another --out") from None
    write_json(out / "sweep.json", {"name": sweep.name, "description": sweep.description, "base": sweep.base,
                                    "grids": sweep.grids})


def runs_to_train(sweep: SweepConfig, runs: list[SweepRun], out: Path, resume: bool) -> list[SweepRun]:
    """Each distinct run once (a cell shared by two groups is trained once), finished ones skipped on
    ``resume``; the longest first, so that the last run to finish is a short one."""
    canonical = {run.name: run for run in sweep.runs()}
    todo: list[SweepRun] = []
    for directory_name in dict.fromkeys(run.directory for run in runs):
        run = canonical[directory_name]
        directory = out / run.name
        if resume and _finished(directory):
            continue
        if (directory / "config.json").is_file() and not resume:
            raise LabRunError(f"{directory} already holds a run: pass --resume to continue the sweep")
        todo.append(run)
    return sorted(todo, key=lambda run: _work(run.config), reverse=True)  # stable: grid order among equals


def train_runs(sweep: SweepConfig, todo: list[SweepRun], out: Path, resume: bool, jobs: int, threads: int,
               progress: bool) -> None:
    """Train `todo` in `jobs` worker processes, rewriting the combined outputs as each run finishes."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()]
    finished = 0
    with Progress(*columns, disable=not progress) as bar, \
            ProcessPoolExecutor(max_workers=max(jobs, 1), mp_context=get_context("spawn")) as pool:
        tasks = {run.name: bar.add_task(run.name, total=run.config.steps, completed=_last_step(out / run.name))
                 for run in todo}
        pending: dict[Future, SweepRun] = {
            pool.submit(_run_one, run.config.as_dict(), str(out / run.name), resume, threads): run for run in todo}
        while pending:
            done, _ = wait(list(pending), timeout=1.0, return_when=FIRST_COMPLETED)
            for run in pending.values():
                bar.update(tasks[run.name], completed=_last_step(out / run.name))
            for future in done:
                run = pending.pop(future)
                future.result()  # a failed run stops the sweep with its own error
                bar.update(tasks[run.name], completed=run.config.steps)
                write_sweep_outputs(sweep, out)
                finished += 1
                stall_at(f"run {finished}")


def run_sweep(sweep: SweepConfig, out: str | Path, *, resume: bool = False, jobs: int = 1, threads: int | None = None,
              progress: bool = True, only: list[str] | None = None) -> SweepResult:
    """Run every run of the sweep (skipping finished ones on ``resume``), then write the combined outputs:
    ``summary.csv`` (final sink rate per run), ``sinks.parquet`` (all rows), ``sink_rate_over_training.png``
    and ``final_sink_rate.png``."""
    out = Path(out)
    runs = select_runs(sweep, only)
    open_sweep_dir(sweep, out, resume)
    todo = runs_to_train(sweep, runs, out, resume)
    started = time.time()
    train_runs(sweep, todo, out, resume, jobs, threads or max(1, (os.cpu_count() or 1) // max(jobs, 1)), progress)
    summary, sinks, figure = write_sweep_outputs(sweep, out)
    return SweepResult(out, summary, sinks, figure, time.time() - started)


def sweep_tables(sweep: SweepConfig, out: str | Path) -> SweepResult:
    """The combined outputs from what the run directories hold now, training nothing (also while the
    sweep still runs: a run's last evaluation so far; ``summary.csv`` says which runs have finished)."""
    out = Path(out)
    if not (out / "sweep.json").is_file():
        raise LabRunError(f"{out} holds no sweep (no sweep.json); run the sweep first")
    summary, sinks, figure = write_sweep_outputs(sweep, out)
    return SweepResult(out, summary, sinks, figure, 0.0)

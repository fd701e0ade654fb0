"""`sinkscope ablate`, `knockout`, `generate`, `downstream`: what the sink is for (loss and text with and
without it). Each command's options are its experiment's declared settings (`cli.settings.with_settings`),
plus those below."""

from __future__ import annotations

from typing import Annotated

import typer

from ..experiments.ablate import DEFAULT_CONDITIONS, Ablate
from ..experiments.downstream import Downstream
from ..experiments.generate import Generate
from ..experiments.knockout import Knockout
from . import CONSEQUENCES, app, options, run_command, run_each_condition, user_errors
from .settings import Settings, with_settings


@app.command(rich_help_panel=CONSEQUENCES)
@user_errors
@with_settings(Ablate)
def ablate(model: options.Model = "gemma3-270m", text: options.Text = None, bos: options.Bos = None,
           out: options.Out = None, resume: options.Resume = False, quiet: options.Quiet = False,
           settings: Settings = None) -> None:
    """Loss/perplexity on the same text tokens with <bos> added, stripped or replaced, by position."""
    experiment = Ablate(text=text, bos=tuple(bos or DEFAULT_CONDITIONS), **(settings or {}))  # a bad --text fails here
    run_command(experiment, model, out=out, resume=resume, quiet=quiet)


@app.command(rich_help_panel=CONSEQUENCES)
@user_errors
@with_settings(Knockout)
def knockout(model: options.Model = "gemma3-270m", text: options.Text = None, bos: options.Bos = None,
             top: Annotated[int, typer.Option(help="layers and heads shown in the table")] = 8,
             out: options.Out = None, resume: options.Resume = False, quiet: options.Quiet = False,
             settings: Settings = None) -> None:
    """Δloss when attention to position 0 is removed (renormalised) in all heads, per layer, per head."""
    run_each_condition(lambda condition: Knockout(text=text, bos=condition, **(settings or {})),
                       bos, "add", model, out=out, resume=resume, quiet=quiet, show={"top": top})


@app.command(rich_help_panel=CONSEQUENCES)
@user_errors
@with_settings(Generate)
def generate(model: options.Model = "gemma3-270m", bos: options.Bos = None, out: options.Out = None,
             resume: options.Resume = False, quiet: options.Quiet = False, settings: Settings = None) -> None:
    """The same prompt continued greedily with and without the sink, side by side."""
    experiment = Generate(bos=tuple(bos or ["add", "strip"]), **(settings or {}))
    run_command(experiment, model, out=out, resume=resume, quiet=quiet)


@app.command("downstream", rich_help_panel=CONSEQUENCES)
@user_errors
@with_settings(Downstream)
def downstream_command(
    task: Annotated[list[str], typer.Option(help="lm-eval task name; repeatable (e.g. arc_easy, piqa)")],
    model: options.Model = "gemma3-270m", bos: options.Bos = None,
    out: options.Out = None, resume: options.Resume = False, quiet: options.Quiet = False, settings: Settings = None,
) -> None:
    """Optional: lm-eval tasks with the tokenizer's <bos> on and off (Table 3). Needs lm-eval and task data."""
    experiment = Downstream(tasks=tuple(task), bos=tuple(bos or ["add", "strip"]),
                            **(settings or {}))  # without lm-eval this fails before the model is loaded
    run_command(experiment, model, out=out, resume=resume, quiet=quiet)

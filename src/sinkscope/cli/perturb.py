"""`sinkscope perturb` and `oversquash`: how far information spreads, with vs without `<bos>` (Barbero et al.
2025: Fig. 2 and Thm 3.2), where a command parses inputs of its own (a word swap; a text or prompt file).
`spread` is built from its experiment's declaration (`cli.commands`). Each command's options are its
experiment's declared settings (`cli.settings.with_settings`), plus those below."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..experiments.oversquash import Oversquash
from ..experiments.perturb import SHAKESPEARE, Perturb, parse_swap
from . import EXPLAIN, app, options, run_command, user_errors
from .commands import experiment_options
from .settings import RunOptions, Settings, with_run_options

DEFAULT_BOS = ["add", "strip"]
TextOption = Annotated[str | None, typer.Option(help="the text (default: the paper's App. C.1 Shakespeare paragraph)")]


@app.command(rich_help_panel=EXPLAIN)
@user_errors
@with_run_options
def perturb(
    model: options.Model = "gemma3-270m", text: TextOption = None,
    swap: Annotated[str, typer.Option(help="old=new: replace the first whole word old (same token count)")]
    = "greatest=best",
    bos: options.Bos = None,
    max_tokens: Annotated[int | None, typer.Option(help="truncate to this many tokens, prefix included")] = None,
    run: RunOptions = RunOptions(),
) -> None:
    """Perturbation spread ||h(x) - h(x')|| per depth and token after a one-word swap (Fig. 2)."""
    experiment = Perturb(text=text or SHAKESPEARE, swap=parse_swap(swap), bos=tuple(bos or DEFAULT_BOS),
                         max_tokens=max_tokens)
    run_command(experiment, model, run)


@app.command(rich_help_panel=EXPLAIN)
@experiment_options(Oversquash)
def oversquash(
    model: options.Model = "gemma3-270m", text: TextOption = None,
    bos: options.Bos = None, max_tokens: options.MaxTokens = 64,
    prompts: Annotated[Path | None, typer.Option(help=".txt/.jsonl/.csv texts, each its own unit (instead of "
                                                      "--text)")] = None,
    run: RunOptions = RunOptions(), settings: Settings = None,
) -> None:
    """Jacobian sensitivity ||dh_j^(L)/dh_i^(0)|| of one token to every earlier one, and the path-sum bound."""
    experiment = Oversquash(text=text or SHAKESPEARE, bos=tuple(bos or DEFAULT_BOS), max_tokens=max_tokens,
                            texts=tuple(p.text for p in options.prompts_from(prompts)) if prompts else (),
                            **(settings or {}))
    run_command(experiment, model, run)

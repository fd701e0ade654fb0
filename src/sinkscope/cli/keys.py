"""`sinkscope keys`: the attention every key receives, and the tokens that act as sinks besides position 0."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..experiments.keys import KeyAttentionExperiment
from . import MEASURE, app, options, run_each_condition
from .commands import experiment_options
from .settings import RunOptions, Settings


@app.command(rich_help_panel=MEASURE)
@experiment_options(KeyAttentionExperiment)
def keys(
    model: options.Model = "gemma3-270m", text: options.Text = None,
    prompts: Annotated[Path | None, typer.Option(
        help=".txt/.jsonl/.csv prompts instead of windows of --text")] = None,
    limit: options.Limit = None, bos: options.Bos = None,
    batch_size: options.BatchSize = 1, path: options.KernelPath = "auto", precision: options.Precision = "float32",
    top: Annotated[int, typer.Option(help="tokens shown in the table")] = 10,
    run: RunOptions = RunOptions(), settings: Settings = None,
) -> None:
    """Attention received by every key (Gu et al.'s alpha_k per layer x head x position), in linear memory."""
    chosen = options.prompts_from(prompts, limit) if prompts is not None else []
    run_each_condition(
        lambda condition: KeyAttentionExperiment(
            text=text, prompts=chosen, bos=condition, batch_size=batch_size, path=path, precision=precision,
            **(settings or {})),
        bos, "add", model, run, show={"top": top})

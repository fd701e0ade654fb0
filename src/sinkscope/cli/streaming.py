"""`sinkscope stream`: streaming KV caches at long context, one condition at a time, on a text file it reads
itself (`passkey` is built from its experiment's declaration by `cli.commands`). Its options are the
experiment's declared settings (`cli.settings.with_settings`), plus those below."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..experiments.stream import Stream
from . import CONSEQUENCES, app, options, run_each_condition
from .commands import experiment_options
from .settings import RunOptions, Settings


@app.command(rich_help_panel=CONSEQUENCES)
@experiment_options(Stream)
def stream(
    model: options.Model = "gemma3-270m",
    text: Annotated[Path | None, typer.Option(help="UTF-8 .txt file to stream, or shakespeare:hamlet,macbeth "
                                                   "(default: Hamlet, offline)")] = None,
    bos: options.Bos = None,
    run: RunOptions = RunOptions(), settings: Settings = None,
) -> None:
    """Streaming KV caches (StreamingLLM): perplexity and memory of full / window-only / k sinks + window."""
    from ..data.texts import load_text

    given = None if text is None else load_text(text)
    run_each_condition(
        lambda condition: Stream(text=None if given is None else given.text,
                                 source=None if given is None else given.source, bos=condition, **(settings or {})),
        bos, "add", model, run)

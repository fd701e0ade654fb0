"""`sinkscope passkey`, `stream`: what the sink does at long context (retrieval, streaming KV caches)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from . import CONSEQUENCES, app, options, run_command, run_each_condition, user_errors


@app.command(rich_help_panel=CONSEQUENCES)
@user_errors
def passkey(
    model: options.Model = "gemma3-270m",
    length: Annotated[list[int] | None, typer.Option(help="prompt length in text tokens; repeat (default 512..4096)")]
    = None,
    depth: Annotated[list[float] | None, typer.Option(help="depth of the key in [0, 1]; repeat")] = None,
    trials: Annotated[int, typer.Option(help="keys per length x depth cell")] = 3,
    bos: options.Bos = None, seed: int = 0,
    max_new_tokens: Annotated[int, typer.Option(help="greedy tokens decoded for the answer")] = 8,
    out: options.Out = None, resume: options.Resume = False, quiet: options.Quiet = False,
) -> None:
    """Passkey retrieval: a 5-digit key hidden in filler text, greedy answer, with vs without <bos>."""
    from ..experiments.passkey import Passkey

    experiment = Passkey(lengths=tuple(length or [512, 1024, 2048, 4096]),
                         depths=tuple(depth or [0.1, 0.3, 0.5, 0.7, 0.9]), trials=trials,
                         bos=tuple(bos or ["add", "strip"]), seed=seed, max_new_tokens=max_new_tokens)
    run_command(experiment, model, out=out, resume=resume, quiet=quiet)


@app.command(rich_help_panel=CONSEQUENCES)
@user_errors
def stream(
    model: options.Model = "gemma3-270m",
    text: Annotated[Path | None, typer.Option(help="UTF-8 .txt file to stream (default: Hamlet, offline)")] = None,
    window: Annotated[int, typer.Option(help="recent tokens each streaming cache keeps")] = 256,
    sinks: Annotated[list[int] | None, typer.Option(help="sink tokens kept (0 = window only); repeat")] = None,
    full: Annotated[bool, typer.Option(help="also run the full (unbounded) cache")] = True,
    length: Annotated[int, typer.Option(help="tokens to stream, <bos> included")] = 1024,
    segments: Annotated[int, typer.Option(help="consecutive pieces of the text of --length tokens each, streamed "
                                               "together from empty caches (independent units)")] = 1,
    bos: options.Bos = None,
    out: options.Out = None, resume: options.Resume = False, quiet: options.Quiet = False,
) -> None:
    """Streaming KV caches (StreamingLLM): perplexity and memory of full / window-only / k sinks + window."""
    from ..data.texts import read_text_file
    from ..experiments.stream import Stream

    given = None if text is None else read_text_file(text)
    run_each_condition(
        lambda condition: Stream(text=None if given is None else given.text,
                                 source=None if given is None else given.source, window=window,
                                 sinks=(0, 1, 4) if sinks is None else tuple(sinks), full=full, length=length,
                                 segments=segments, bos=condition),
        bos, "add", model, out=out, resume=resume, quiet=quiet)

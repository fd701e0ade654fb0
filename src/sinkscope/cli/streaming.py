"""`sinkscope passkey`, `stream`: what the sink does at long context (retrieval, streaming KV caches)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from . import CONSEQUENCES, BosOption, ModelOption, app, console, load_model, user_errors

OutOption = Annotated[Path | None, typer.Option(help="run directory for tables, summary.json and figures")]
QuietOption = Annotated[bool, typer.Option(help="no progress bar")]


def _command() -> str:
    return " ".join(["sinkscope"] + sys.argv[1:])


@app.command(rich_help_panel=CONSEQUENCES)
@user_errors
def passkey(
    model: ModelOption = "gemma3-270m",
    length: Annotated[list[int] | None, typer.Option(help="prompt length in text tokens; repeat (default 512..4096)")]
    = None,
    depth: Annotated[list[float] | None, typer.Option(help="depth of the key in [0, 1]; repeat")] = None,
    trials: Annotated[int, typer.Option(help="keys per length x depth cell")] = 3,
    bos: BosOption = None, seed: int = 0,
    max_new_tokens: Annotated[int, typer.Option(help="greedy tokens decoded for the answer")] = 8,
    out: OutOption = None, resume: Annotated[bool, typer.Option(help="continue an interrupted run in --out")] = False,
    quiet: QuietOption = False,
) -> None:
    """Passkey retrieval: a 5-digit key hidden in filler text, greedy answer, with vs without <bos>."""
    from ..errors import InputError
    from ..experiments.passkey import passkey as run

    if resume and out is None:
        raise InputError("--resume needs --out (the run directory to continue)")
    loaded = load_model(model)
    result = run(loaded, lengths=length or [512, 1024, 2048, 4096], depths=depth or [0.1, 0.3, 0.5, 0.7, 0.9],
                 trials=trials, bos=bos or ["add", "strip"], seed=seed, max_new_tokens=max_new_tokens, out=out,
                 resume=resume, progress=not quiet, command=_command())
    s = result.summary
    lengths = [str(n) for n in s["lengths"]]
    table = Table("bos", "accuracy", *[f"{n} tok" for n in lengths],
                  title=f"passkey retrieval ({len(s['depths'])} depths x {s['trials']} trials per length)")
    for mode in s["bos"]:
        table.add_row(mode, f"{s['accuracy'][mode]:.2f}", *[f"{s['accuracy_by_length'][mode][n]:.2f}" for n in lengths])
    console.print(table)
    if out is not None:
        console.print(f"written to {out}/", highlight=False)


@app.command(rich_help_panel=CONSEQUENCES)
@user_errors
def stream(
    model: ModelOption = "gemma3-270m",
    text: Annotated[Path | None, typer.Option(help="UTF-8 .txt file to stream (default: Hamlet, offline)")] = None,
    window: Annotated[int, typer.Option(help="recent tokens each streaming cache keeps")] = 256,
    sinks: Annotated[list[int] | None, typer.Option(help="sink tokens kept (0 = window only); repeat")] = None,
    full: Annotated[bool, typer.Option(help="also run the full (unbounded) cache")] = True,
    length: Annotated[int, typer.Option(help="tokens to stream, <bos> included")] = 1024,
    bos: Annotated[str, typer.Option(help="auto | add | strip | replace:<token>")] = "add",
    out: OutOption = None, quiet: QuietOption = False,
) -> None:
    """Streaming KV caches (StreamingLLM): perplexity and memory of full / window-only / k sinks + window."""
    from ..experiments.stream import stream as run

    text_value = source = None
    if text is not None:
        from ..data.texts import read_text_file

        long_text = read_text_file(text)
        text_value, source = long_text.text, long_text.source
    loaded = load_model(model)
    result = run(loaded, text_value, window=window, sinks=[0, 1, 4] if sinks is None else sinks, full=full,
                 length=length, bos=bos, source=source, progress=not quiet, command=_command())
    s = result.summary
    table = Table("cache", f"ppl (positions >= {s['eval_start']})", "peak cache (MiB)", "cache at end (MiB)",
                  "peak RSS (MiB)", title=f"{s['length']} tokens streamed, window {s['window']} ({s['text']})")
    for label in s["caches"]:
        table.add_row(label, f"{s['ppl'][label]:.2f}", f"{s['peak_cache_bytes'][label] / 2**20:.1f}",
                      f"{s['cache_bytes_at_end'][label] / 2**20:.1f}", f"{s['peak_rss_bytes'][label] / 2**20:.0f}")
    console.print(table)
    if out is not None:
        console.print(f"written to {result.save(out)}/", highlight=False)

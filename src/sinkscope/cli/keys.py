"""`sinkscope keys`: the attention every key receives, and the tokens that act as sinks besides position 0."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from . import MEASURE, app, options, run_each_condition, user_errors


@app.command(rich_help_panel=MEASURE)
@user_errors
def keys(
    model: options.Model = "gemma3-270m", text: options.Text = None,
    prompts: Annotated[Path | None, typer.Option(
        help=".txt/.jsonl/.csv prompts instead of windows of --text")] = None,
    limit: options.Limit = None, bos: options.Bos = None,
    max_tokens: Annotated[int, typer.Option(help="tokens per sequence, <bos> included")] = 4096,
    windows: Annotated[int, typer.Option(min=1, help="windows of --text (ignored with --prompts)")] = 1,
    eps: Annotated[float, typer.Option(help="a key is a sink in a head when its alpha_k exceeds this")] = 0.3,
    min_queries: Annotated[int, typer.Option(
        min=1, help="token/position aggregates use keys seen by at least this many queries")] = 32,
    chunk_size: Annotated[int, typer.Option(min=1, help="queries per block (memory: block x tokens)")] = 512,
    batch_size: options.BatchSize = 1, path: options.KernelPath = "auto", precision: options.Precision = "float32",
    top: Annotated[int, typer.Option(help="tokens shown in the table")] = 10,
    device: options.Device = "cpu", dtype: options.Dtype = "float32", out: options.Out = None,
    resume: options.Resume = False, quiet: options.Quiet = False,
) -> None:
    """Attention received by every key (Gu et al.'s alpha_k per layer x head x position), in linear memory."""
    from ..experiments.keys import KeyAttentionExperiment

    chosen = options.prompts_from(prompts, limit) if prompts is not None else []
    run_each_condition(
        lambda condition: KeyAttentionExperiment(
            text=text, prompts=chosen, max_tokens=max_tokens, windows=windows, bos=condition, eps=eps,
            min_queries=min_queries, batch_size=batch_size, chunk_size=chunk_size, path=path, precision=precision),
        bos, "add", model, out=out, resume=resume, quiet=quiet, device=device, dtype=dtype, show={"top": top})

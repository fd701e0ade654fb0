"""`sinkscope ruler`: RULER-style long-context tasks, with vs without `<bos>`."""

from __future__ import annotations

from typing import Annotated

import typer

from ..errors import InputError
from . import CONSEQUENCES, app, options, run_command, user_errors


@app.command(rich_help_panel=CONSEQUENCES)
@user_errors
def ruler(
    model: options.Model = "gemma3-270m",
    task: Annotated[list[str] | None, typer.Option(help="niah_single, niah_multikey, vt, cwe, ...; repeat "
                                                        "(default: all)")] = None,
    length: Annotated[list[int] | None, typer.Option(help="prompt length in text tokens; repeat "
                                                          "(default 512..4096)")] = None,
    depth: Annotated[list[float] | None, typer.Option(help="depth of the target needle in [0, 1]; repeat "
                                                           "(default 0.1 0.5 0.9)")] = None,
    trials: Annotated[int, typer.Option(help="prompts (keys, values) per task x length x depth")] = 3,
    bos: options.Bos = None, seed: int = 0,
    values: Annotated[str, typer.Option(help="needle values: numbers | words | uuids")] = "numbers",
    max_new_tokens: Annotated[int | None, typer.Option(help="greedy tokens per answer (default: each task's)")]
    = None,
    text: options.Text = None, out: options.Out = None, resume: options.Resume = False, quiet: options.Quiet = False,
    device: options.Device = "cpu", dtype: options.Dtype = "float32",
    trust_remote_code: options.TrustRemoteCode = False,
) -> None:
    """RULER-style retrieval (needles, variable tracking, common words), greedy answers, with vs without <bos>."""
    from ..experiments.ruler import DEFAULT_DEPTHS, DEFAULT_LENGTHS, Ruler

    if resume and out is None:
        raise InputError("--resume needs --out (the run directory to continue)")
    experiment = Ruler(**({"tasks": tuple(task)} if task else {}), lengths=tuple(length or DEFAULT_LENGTHS),
                       depths=tuple(depth or DEFAULT_DEPTHS), trials=trials, bos=tuple(bos or ("add", "strip")),
                       seed=seed, values=values, max_new_tokens=max_new_tokens,
                       text=None if text is None else str(text))
    run_command(experiment, model, out=out, resume=resume, quiet=quiet, device=device, dtype=dtype,
                trust_remote_code=trust_remote_code)

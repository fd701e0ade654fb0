"""`sinkscope rank-collapse`, `repr-collapse`, `massive`: residual-stream measurements with and without `<bos>`."""

from __future__ import annotations

from typing import Annotated

import typer

from . import EXPLAIN, app, options, run_command, user_errors

DEFAULT_BOS = ["add", "strip"]


@app.command("rank-collapse", rich_help_panel=EXPLAIN)
@user_errors
def rank_collapse(
    model: options.Model = "gemma3-270m", bos: options.Bos = None, prompts: options.Prompts = None,
    limit: options.Limit = None, max_tokens: options.MaxTokens = 64, batch_size: options.BatchSize = 8,
    out: options.Out = None, resume: options.Resume = False, quiet: options.Quiet = False,
    device: options.Device = "cpu", dtype: options.Dtype = "float32",
    trust_remote_code: options.TrustRemoteCode = False,
) -> None:
    """Rank collapse of the residual stream per depth (Frobenius and composite residual, sigma_1 share, eff. rank)."""
    from ..experiments.rank_collapse import RankCollapse

    experiment = RankCollapse(prompts=options.prompts_from(prompts, limit), bos=tuple(bos or DEFAULT_BOS),
                              max_tokens=max_tokens, batch_size=batch_size)
    run_command(experiment, model, out=out, resume=resume, quiet=quiet, device=device, dtype=dtype,
                trust_remote_code=trust_remote_code)


@app.command("repr-collapse", rich_help_panel=EXPLAIN)
@user_errors
def repr_collapse(
    model: options.Model = "gemma3-270m", bos: options.Bos = None,
    length: Annotated[list[int] | None, typer.Option(help="text lengths n; repeatable (default 8 .. 512)")] = None,
    family: Annotated[list[str] | None, typer.Option(help="repeated | natural; repeatable (default both)")] = None,
    repeat_token: Annotated[str, typer.Option(help="the one token the 'repeated' family repeats")] = " a",
    out: options.Out = None, resume: options.Resume = False, quiet: options.Quiet = False,
    device: options.Device = "cpu", dtype: options.Dtype = "float32",
    trust_remote_code: options.TrustRemoteCode = False,
) -> None:
    """Representational collapse: last-token distance between a sequence and the same with its last token repeated."""
    from ..experiments.repr_collapse import FAMILIES, REPR_LENGTHS, ReprCollapse

    experiment = ReprCollapse(lengths=tuple(length or REPR_LENGTHS), families=tuple(family or FAMILIES),
                              bos=tuple(bos or DEFAULT_BOS), repeat_token=repeat_token)
    run_command(experiment, model, out=out, resume=resume, quiet=quiet, device=device, dtype=dtype,
                trust_remote_code=trust_remote_code)


@app.command("massive", rich_help_panel=EXPLAIN)
@user_errors
def massive(
    model: options.Model = "gemma3-270m", bos: options.Bos = None, prompts: options.Prompts = None,
    limit: options.Limit = None, max_tokens: options.MaxTokens = 64,
    top_k: Annotated[int, typer.Option(min=1, help="top coordinates kept per prompt and depth")] = 4,
    batch_size: options.BatchSize = 8, out: options.Out = None, resume: options.Resume = False,
    quiet: options.Quiet = False, device: options.Device = "cpu", dtype: options.Dtype = "float32",
    trust_remote_code: options.TrustRemoteCode = False,
) -> None:
    """Massive activations (Sun et al.): max |h| / median |h| per depth and where the largest entries sit."""
    from ..experiments.massive import MassiveActivations

    experiment = MassiveActivations(prompts=options.prompts_from(prompts, limit), bos=tuple(bos or DEFAULT_BOS),
                                    max_tokens=max_tokens, top_k=top_k, batch_size=batch_size)
    run_command(experiment, model, out=out, resume=resume, quiet=quiet, device=device, dtype=dtype,
                trust_remote_code=trust_remote_code)

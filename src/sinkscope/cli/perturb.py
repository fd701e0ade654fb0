"""`sinkscope perturb` and `oversquash`: how far information spreads, with vs without `<bos>`
(Barbero et al. 2025: Fig. 2 and Thm 3.2)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from . import EXPLAIN, app, options, run_command, user_errors

DEFAULT_BOS = ["add", "strip"]
TextOption = Annotated[str | None, typer.Option(help="the text (default: the paper's App. C.1 Shakespeare paragraph)")]


@app.command(rich_help_panel=EXPLAIN)
@user_errors
def perturb(
    model: options.Model = "gemma3-270m", text: TextOption = None,
    swap: Annotated[str, typer.Option(help="old=new: replace the first whole word old (same token count)")]
    = "greatest=best",
    bos: options.Bos = None,
    max_tokens: Annotated[int | None, typer.Option(help="truncate to this many tokens, prefix included")] = None,
    out: options.Out = None, resume: options.Resume = False, quiet: options.Quiet = False,
    device: options.Device = "cpu", dtype: options.Dtype = "float32",
    trust_remote_code: options.TrustRemoteCode = False,
) -> None:
    """Perturbation spread ||h(x) - h(x')|| per depth and token after a one-word swap (Fig. 2)."""
    from ..experiments.perturb import SHAKESPEARE, Perturb, parse_swap

    experiment = Perturb(text=text or SHAKESPEARE, swap=parse_swap(swap), bos=tuple(bos or DEFAULT_BOS),
                         max_tokens=max_tokens)
    run_command(experiment, model, out=out, resume=resume, quiet=quiet, device=device, dtype=dtype,
                trust_remote_code=trust_remote_code)


@app.command(rich_help_panel=EXPLAIN)
@user_errors
def spread(
    model: options.Model = "gemma3-270m", prompts: options.Prompts = None, limit: options.Limit = None,
    bos: options.Bos = None, max_tokens: options.MaxTokens = 64,
    position: Annotated[float, typer.Option(help="where the swapped token sits, as a fraction of the text")] = 0.25,
    out: options.Out = None, resume: options.Resume = False, quiet: options.Quiet = False,
    device: options.Device = "cpu", dtype: options.Dtype = "float32",
    trust_remote_code: options.TrustRemoteCode = False,
) -> None:
    """Perturbation spread of a one-token swap in every prompt (Fig. 2 with prompts as independent units)."""
    from ..experiments.spread import Spread

    experiment = Spread(prompts=options.prompts_from(prompts, limit), bos=tuple(bos or DEFAULT_BOS),
                        max_tokens=max_tokens, position=position)
    run_command(experiment, model, out=out, resume=resume, quiet=quiet, device=device, dtype=dtype,
                trust_remote_code=trust_remote_code)


@app.command(rich_help_panel=EXPLAIN)
@user_errors
def oversquash(
    model: options.Model = "gemma3-270m", text: TextOption = None,
    probes: Annotated[int, typer.Option(help="random probes k (cost: 1 forward + k backward passes)")] = 16,
    target: Annotated[int, typer.Option(help="target text token j (-1: the last)")] = -1,
    bos: options.Bos = None, max_tokens: options.MaxTokens = 64,
    exact: Annotated[bool, typer.Option(help="also the exact Jacobian (d backward passes; small models)")] = False,
    path_sum: Annotated[bool, typer.Option(help="attention path-sum bound B (needs the full weights)")] = True,
    seed: Annotated[int, typer.Option(help="seed of the random probes")] = 0,
    prompts: Annotated[Path | None, typer.Option(help=".txt/.jsonl/.csv texts, each its own unit (instead of "
                                                      "--text)")] = None,
    normed: Annotated[bool, typer.Option(help="also the sensitivity after the final norm (k more backward "
                                              "passes)")] = False,
    out: options.Out = None, resume: options.Resume = False, quiet: options.Quiet = False,
    device: options.Device = "cpu", dtype: options.Dtype = "float32",
    trust_remote_code: options.TrustRemoteCode = False,
) -> None:
    """Jacobian sensitivity ||dh_j^(L)/dh_i^(0)|| of one token to every earlier one, and the path-sum bound."""
    from ..experiments.oversquash import SHAKESPEARE, Oversquash

    experiment = Oversquash(text=text or SHAKESPEARE, target=target, probes=probes, bos=tuple(bos or DEFAULT_BOS),
                            exact=exact, path_sum=path_sum, max_tokens=max_tokens, seed=seed, normed=normed,
                            texts=tuple(p.text for p in options.prompts_from(prompts)) if prompts else ())
    run_command(experiment, model, out=out, resume=resume, quiet=quiet, device=device, dtype=dtype,
                trust_remote_code=trust_remote_code)

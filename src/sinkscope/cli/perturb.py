"""`sinkscope perturb` and `oversquash`: how far information spreads, with vs without `<bos>`
(Barbero et al. 2025: Fig. 2 and Thm 3.2)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from . import EXPLAIN, BosOption, ModelOption, app, console, load_model, user_errors

OutOption = Annotated[Path | None, typer.Option(help="run directory for tables, summary.json and figures")]
TextOption = Annotated[str | None, typer.Option(help="the text (default: the paper's App. C.1 Shakespeare paragraph)")]


def _command() -> str:
    return " ".join(["sinkscope"] + sys.argv[1:])


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"


@app.command(rich_help_panel=EXPLAIN)
@user_errors
def perturb(
    model: ModelOption = "gemma3-270m",
    text: TextOption = None,
    swap: Annotated[str, typer.Option(help="old=new: replace the first whole word old (same token count)")]
    = "greatest=best",
    bos: BosOption = None,
    max_tokens: Annotated[int | None, typer.Option(help="truncate to this many tokens, prefix included")] = None,
    out: OutOption = None,
    quiet: Annotated[bool, typer.Option(help="no progress bar")] = False,
) -> None:
    """Perturbation spread ||h(x) - h(x')|| per layer and token after a one-word swap (Fig. 2)."""
    from ..experiments.perturb import SHAKESPEARE, parse_swap
    from ..experiments.perturb import perturb as run_perturb

    old, new = parse_swap(swap)  # malformed --swap fails before the model loads
    loaded = load_model(model)
    result = run_perturb(loaded, text or SHAKESPEARE, swap=(old, new), bos=bos or ["add", "strip"],
                         max_tokens=max_tokens, progress=not quiet, command=_command())
    summary = result.summary
    table = Table("bos", "position 0", "S_total", "S_final", "S_total (rel)", "S_final (rel)",
                  title=f"perturbation spread after '{old}' -> '{new}' (text token {summary['perturbed_position']})")
    for mode, stats in summary["conditions"].items():
        table.add_row(mode, stats["first_token"], *(_number(stats[k]) for k in ("S_total", "S_final", "S_total_rel",
                                                                                   "S_final_rel")))
    console.print(table)
    if "R_total" in summary:
        console.print(f"R = S(strip)/S(add): total {summary['R_total']:.3f}, final {summary['R_final']:.3f} "
                      f"(relative: {summary['R_total_rel']:.3f}, {summary['R_final_rel']:.3f}); "
                      "R > 1: the change spreads further without <bos>", highlight=False)
    if out is not None:
        console.print(f"results written to {result.save(out)}/", highlight=False)


@app.command(rich_help_panel=EXPLAIN)
@user_errors
def oversquash(
    model: ModelOption = "gemma3-270m",
    text: TextOption = None,
    probes: Annotated[int, typer.Option(help="random probes k (cost: 1 forward + k backward passes)")] = 16,
    target: Annotated[int, typer.Option(help="target text token j (-1: the last)")] = -1,
    bos: BosOption = None,
    max_tokens: Annotated[int, typer.Option(help="tokens, prefix included (paper: 64)")] = 64,
    exact: Annotated[bool, typer.Option(help="also the exact Jacobian (d backward passes; small models)")] = False,
    path_sum: Annotated[bool, typer.Option(help="attention path-sum bound B (needs the full weights)")] = True,
    seed: Annotated[int, typer.Option(help="seed of the random probes")] = 0,
    out: OutOption = None,
    quiet: Annotated[bool, typer.Option(help="no progress bar")] = False,
) -> None:
    """Jacobian sensitivity ||dh_j^(L)/dh_i^(0)|| of one token to every earlier one, and the path-sum bound."""
    from ..experiments.oversquash import oversquash as run_oversquash
    from ..experiments.perturb import SHAKESPEARE

    loaded = load_model(model)
    result = run_oversquash(loaded, text or SHAKESPEARE, target=target, probes=probes, bos=bos or ["add", "strip"],
                            exact=exact, path_sum=path_sum, max_tokens=max_tokens, seed=seed, progress=not quiet,
                            command=_command())
    summary = result.summary
    title = f"sensitivity of '{summary['target_token']}' to earlier tokens ({summary['method']})"
    table = Table("bos", "position 0", "s self", "s mean (text 1..j-1)", "s at position 0", "log10 slope / token",
                  "B (c=1/H) mean", "passes f+b", title=title)
    for mode, stats in summary["conditions"].items():
        passes = summary["passes"][mode]
        table.add_row(mode, stats["first_token"], _number(stats["s_self"]), _number(stats["s_mean"]),
                      _number(stats["s_prefix"] if stats["s_prefix"] is not None else stats["s_first_text"]),
                      _number(stats["decay_slope"]), _number(stats["B_mean_mean"]),
                      f"{passes['forward']}+{passes['backward']}")
    console.print(table)
    if "R_s_mean" in summary:
        console.print(f"R = s_mean(strip)/s_mean(add) = {summary['R_s_mean']:.3f}; path-sum R = "
                      f"{summary['R_B_mean']:.3f}; s larger without <bos> for "
                      f"{summary['frac_sources_s_larger_without_bos']:.0%} of sources", highlight=False)
    if out is not None:
        console.print(f"results written to {result.save(out)}/", highlight=False)

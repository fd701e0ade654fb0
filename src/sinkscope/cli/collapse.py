"""`sinkscope rank-collapse`, `repr-collapse`, `massive`: residual-stream measurements with and without `<bos>`."""

from __future__ import annotations

from ..experiments.massive import MassiveActivations
from ..experiments.rank_collapse import RankCollapse
from ..experiments.repr_collapse import ReprCollapse
from . import EXPLAIN, app, options, run_command, user_errors
from .settings import RunOptions, Settings, with_run_options, with_settings

DEFAULT_BOS = ["add", "strip"]


@app.command("rank-collapse", rich_help_panel=EXPLAIN)
@user_errors
@with_run_options
def rank_collapse(
    model: options.Model = "gemma3-270m", bos: options.Bos = None, prompts: options.Prompts = None,
    limit: options.Limit = None, max_tokens: options.MaxTokens = 64, batch_size: options.BatchSize = 8,
    run: RunOptions = RunOptions(),
) -> None:
    """Rank collapse of the residual stream per depth (Frobenius and composite residual, sigma_1 share, eff. rank)."""
    experiment = RankCollapse(prompts=options.prompts_from(prompts, limit), bos=tuple(bos or DEFAULT_BOS),
                              max_tokens=max_tokens, batch_size=batch_size)
    run_command(experiment, model, run)


@app.command("repr-collapse", rich_help_panel=EXPLAIN)
@user_errors
@with_settings(ReprCollapse)
@with_run_options
def repr_collapse(
    model: options.Model = "gemma3-270m", bos: options.Bos = None,
    run: RunOptions = RunOptions(), settings: Settings = None,
) -> None:
    """Representational collapse: last-token distance between a sequence and the same with its last token repeated."""
    experiment = ReprCollapse(bos=tuple(bos or DEFAULT_BOS), **(settings or {}))
    run_command(experiment, model, run)


@app.command("massive", rich_help_panel=EXPLAIN)
@user_errors
@with_settings(MassiveActivations)
@with_run_options
def massive(
    model: options.Model = "gemma3-270m", bos: options.Bos = None, prompts: options.Prompts = None,
    limit: options.Limit = None, max_tokens: options.MaxTokens = 64,
    batch_size: options.BatchSize = 8, run: RunOptions = RunOptions(), settings: Settings = None,
) -> None:
    """Massive activations (Sun et al.): max |h| / median |h| per depth and where the largest entries sit."""
    experiment = MassiveActivations(prompts=options.prompts_from(prompts, limit), bos=tuple(bos or DEFAULT_BOS),
                                    max_tokens=max_tokens, batch_size=batch_size, **(settings or {}))
    run_command(experiment, model, run)

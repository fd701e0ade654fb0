"""`sinkscope smoothing`, `noop`, `conditional-heads`: why heads sink (the paper's Section 3). Each command's
options are its experiment's declared settings (`cli.settings.with_settings`), plus those below."""

from __future__ import annotations

from ..experiments.conditional_heads import TRIGGER_TEXTS, ConditionalHeads
from ..experiments.inputs import prompt_list
from ..experiments.noop import Noop
from ..experiments.smoothing import AttentionSmoothing
from . import EXPLAIN, app, options, run_command, run_each_condition, user_errors
from .settings import RunOptions, Settings, with_run_options, with_settings


@app.command(rich_help_panel=EXPLAIN)
@user_errors
@with_run_options
def smoothing(model: options.Model = "gemma3-270m", prompts: options.Prompts = None, bos: options.Bos = None,
              max_tokens: options.MaxTokens = 64, limit: options.Limit = 40, run: RunOptions = RunOptions()) -> None:
    """Attention entropy and max weight per head, with vs without the sink (Fig. 3)."""
    experiment = AttentionSmoothing(prompts=options.prompts_from(prompts, limit), bos=tuple(bos or ["add", "strip"]),
                                    max_tokens=max_tokens)
    run_command(experiment, model, run)


@app.command(rich_help_panel=EXPLAIN)
@user_errors
@with_settings(Noop)
@with_run_options
def noop(model: options.Model = "gemma3-270m", prompts: options.Prompts = None, bos: options.Bos = None,
         max_tokens: options.MaxTokens = 64, limit: options.Limit = 40,
         run: RunOptions = RunOptions(), settings: Settings = None) -> None:
    """Value norms and output shares: is attending to the sink an approximate no-op? (Fig. 4)"""
    experiment = Noop(prompts=options.prompts_from(prompts, limit), bos=tuple(bos or ["add"]), max_tokens=max_tokens,
                      **(settings or {}))
    run_command(experiment, model, run)


@app.command("conditional-heads", rich_help_panel=EXPLAIN)
@user_errors
@with_settings(ConditionalHeads)
@with_run_options
def conditional_heads(
    model: options.Model = "gemma3-270m", prompts: options.Prompts = None, bos: options.Bos = None,
    run: RunOptions = RunOptions(), settings: Settings = None,
) -> None:
    """Heads that sink by default but attend elsewhere after a trigger token (the 'apostrophe head')."""
    texts = options.prompts_from(prompts) if prompts is not None else prompt_list(TRIGGER_TEXTS)
    run_each_condition(lambda condition: ConditionalHeads(prompts=texts, bos=condition, **(settings or {})),
                       bos, "add", model, run)

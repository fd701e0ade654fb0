"""`sinkscope conditional-heads`: heads that sink by default and attend elsewhere after a trigger (the paper's
Section 3; its other commands, `smoothing` and `noop`, are built from their experiments' declarations by
`cli.commands`). Its options are the experiment's declared settings (`cli.settings.with_settings`), plus those
below: its default prompts are the trigger texts, and it runs one condition at a time."""

from __future__ import annotations

from ..experiments.conditional_heads import TRIGGER_TEXTS, ConditionalHeads
from ..experiments.inputs import prompt_list
from . import EXPLAIN, app, options, run_each_condition
from .commands import experiment_options
from .settings import RunOptions, Settings


@app.command("conditional-heads", rich_help_panel=EXPLAIN)
@experiment_options(ConditionalHeads)
def conditional_heads(
    model: options.Model = "gemma3-270m", prompts: options.Prompts = None, bos: options.Bos = None,
    run: RunOptions = RunOptions(), settings: Settings = None,
) -> None:
    """Heads that sink by default but attend elsewhere after a trigger token (the 'apostrophe head')."""
    texts = options.prompts_from(prompts) if prompts is not None else prompt_list(TRIGGER_TEXTS)
    run_each_condition(lambda condition: ConditionalHeads(prompts=texts, bos=condition, **(settings or {})),
                       bos, "add", model, run)

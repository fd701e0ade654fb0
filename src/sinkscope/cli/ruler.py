"""`sinkscope ruler`: RULER-style long-context tasks, with vs without `<bos>`.

Its options are `experiments.ruler.Ruler`'s declared settings (`cli.settings.with_settings`), plus those below."""

from __future__ import annotations

from ..experiments.ruler import Ruler
from . import CONSEQUENCES, app, options, run_command, user_errors
from .settings import RunOptions, Settings, with_run_options, with_settings


@app.command(rich_help_panel=CONSEQUENCES)
@user_errors
@with_settings(Ruler)
@with_run_options
def ruler(
    model: options.Model = "gemma3-270m", bos: options.Bos = None, text: options.Text = None,
    run: RunOptions = RunOptions(), settings: Settings = None,
) -> None:
    """RULER-style retrieval (needles, variable tracking, common words), greedy answers, with vs without <bos>."""
    experiment = Ruler(bos=tuple(bos or ("add", "strip")), text=None if text is None else str(text),
                       **(settings or {}))
    run_command(experiment, model, run)

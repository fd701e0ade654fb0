"""Commands built from the experiments' own declarations: an experiment class with ``command = Command(...)``
(`experiments.settings.Command`) gets a command here, its options generated from

- the inputs it declares (``--prompts``/``--limit`` or ``--text``), ``--model`` and ``--bos``,
- its declared settings (`cli.settings.with_settings`),
- the run options (`cli.settings.with_run_options`),

so adding such an experiment touches no CLI module. Commands with options of their own beyond these (a grid,
a display option, a parsed swap) keep a module of their own in this package."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import typer

from ..experiments.base import Experiment, import_all
from . import PANEL_TITLES, app, options, run_command, user_errors
from .settings import RunOptions, Settings, with_run_options, with_settings


def experiment_options(cls: type[Experiment]) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """What every experiment command is wrapped in, hand-written or built: one-line errors with exit code 2
    (`user_errors`), the options of the settings ``cls`` declares (`with_settings`) and the run options
    (`with_run_options`)."""

    def wrap(function: Callable[..., None]) -> Callable[..., None]:
        return user_errors(with_settings(cls)(with_run_options(function)))

    return wrap


def experiment_command(cls: type[Experiment], on: typer.Typer = app) -> Any:
    """The command of ``cls`` (its ``command`` declaration), registered on ``on`` (default: `app`)."""
    spec = cls.command
    assert spec is not None

    def command(model: str, bos: list[str] | None = None, prompts: Any = None, limit: int | None = None,
                text: Any = None, run: RunOptions = RunOptions(), settings: Settings = None) -> None:
        inputs: dict[str, Any] = dict(settings or {})
        if spec.inputs == "prompts":
            inputs["prompts"] = options.prompts_from(prompts, limit)
        if spec.inputs == "text" and text is not None:
            inputs["text"] = text
        if bos:
            inputs["bos"] = tuple(bos)
        run_command(cls(**inputs), model, run)

    keyword = inspect.Parameter.KEYWORD_ONLY
    parameters = [inspect.Parameter("model", keyword, default="gemma3-270m", annotation=options.Model)]
    if spec.inputs == "prompts":
        parameters += [inspect.Parameter("prompts", keyword, default=None, annotation=options.Prompts),
                       inspect.Parameter("limit", keyword, default=spec.limit, annotation=options.Limit)]
    if spec.inputs == "text":
        parameters.append(inspect.Parameter("text", keyword, default=None, annotation=options.Text))
    parameters += [inspect.Parameter("bos", keyword, default=None, annotation=options.Bos),
                   inspect.Parameter("run", keyword, default=RunOptions(), annotation=RunOptions),
                   inspect.Parameter("settings", keyword, default=None, annotation=Settings)]
    command.__signature__ = inspect.Signature(parameters, return_annotation=None)  # type: ignore[attr-defined]
    command.__annotations__ = {p.name: p.annotation for p in parameters} | {"return": None}
    command.__name__ = command.__qualname__ = spec.name.replace("-", "_")
    command.__doc__ = spec.help
    built = experiment_options(cls)(command)
    return on.command(spec.name, rich_help_panel=PANEL_TITLES[spec.panel])(built)


def register_experiment_commands() -> list[str]:
    """A command for every experiment that declares one; the names registered."""
    declared = [cls for cls in import_all().values() if "command" in cls.__dict__ and cls.command is not None]
    for cls in declared:
        experiment_command(cls)
    return [cls.command.name for cls in declared if cls.command is not None]

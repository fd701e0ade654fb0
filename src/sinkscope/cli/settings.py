"""Command-line options generated from an experiment's declared settings (`experiments.settings.setting`).

    @app.command("kv")
    @experiment_options(KV)  # `cli.commands`: user_errors + with_settings(KV) + with_run_options
    def kv_command(model: options.Model = "gemma3-270m", ..., run: RunOptions = RunOptions(),
                   settings: Settings = None) -> None:
        ...  # ``settings``: the declared settings given on the command line, by field name

Every declared setting becomes an option (``--name``, or its ``flag``; tuples repeat), defaulting to None
so that the experiment's default (or a preset's value) applies where it is not given; its help text ends
with the dataclass default in brackets.
"""

from __future__ import annotations

import functools
import inspect
import typing
from collections.abc import Callable, Collection
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape

from ..experiments.settings import Declared, declared_settings, given_settings
from . import options

Settings = dict[str, Any] | None  # what a wrapped command receives: {field name: value given}


def _parameter(declared: Declared) -> inspect.Parameter:
    element = declared.element
    kind = list[element] if declared.repeated else element  # type: ignore[valid-type]
    # escaped: --help renders rich markup, where "[numbers]" would read as a style tag and vanish
    text = f"{declared.help}{'; repeat' if declared.repeated else ''} [{declared.shown_default}]"
    flag = declared.flag
    if element is bool and "/" not in flag:  # a switch: --x / --no-x
        flag = f"{flag}/--no-{flag.removeprefix('--')}"
    option = typer.Option(flag, *declared.aliases, help=escape(text))
    return inspect.Parameter(declared.name, inspect.Parameter.KEYWORD_ONLY, default=None,
                             annotation=Annotated[kind | None, option])


def with_settings(cls: type, skip: Collection[str] = ()) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Add an option for each declared setting of ``cls`` (but those named in ``skip`` or already a parameter of
    the command) to a command; it receives them as ``settings``."""

    def wrap(command: Callable[..., Any]) -> Callable[..., Any]:
        own = inspect.signature(command)
        generated = [_parameter(d) for d in declared_settings(cls)
                     if d.name not in skip and d.name not in own.parameters]
        names = [p.name for p in generated]

        @functools.wraps(command)
        def run(**kwargs: Any) -> Any:
            given = {name: kwargs.pop(name, None) for name in names}
            return command(**kwargs, settings=given_settings(cls, given))

        hints = typing.get_type_hints(command, include_extras=True)  # the command module's names, resolved
        kept = [p.replace(annotation=hints.get(p.name, p.annotation)) for p in own.parameters.values()
                if p.name != "settings"]
        _typed(run, own, [*kept, *generated])
        run.settings_of = cls  # type: ignore[attr-defined]  # (what the options were generated from)
        return run

    return wrap


@dataclass(frozen=True)
class RunOptions:
    """The options every experiment command shares: where its results go and how the model is loaded."""

    out: Path | None = None
    resume: bool = False
    quiet: bool = False
    device: str = "cpu"
    dtype: str = "float32"
    trust_remote_code: bool = False


_RUN_OPTIONS = [
    inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default, annotation=annotation)
    for f, annotation in zip(fields(RunOptions), (options.Out, options.Resume, options.Quiet, options.Device,
                                                  options.Dtype, options.TrustRemoteCode), strict=True)
]


def with_run_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """Add `RunOptions`'s options (--out, --resume, --quiet, --device, --dtype, --trust-remote-code) to a
    command; it receives them as ``run``."""
    own = inspect.signature(command)
    names = [p.name for p in _RUN_OPTIONS]

    @functools.wraps(command)
    def wrapped(**kwargs: Any) -> Any:
        chosen = RunOptions(**{name: kwargs.pop(name) for name in names if name in kwargs})
        return command(**kwargs, run=chosen)

    hints = typing.get_type_hints(command, include_extras=True)
    kept = [p.replace(annotation=hints.get(p.name, p.annotation)) for p in own.parameters.values() if p.name != "run"]
    _typed(wrapped, own, [*kept, *_RUN_OPTIONS])
    return wrapped


def _typed(wrapper: Any, own: inspect.Signature, parameters: list[inspect.Parameter]) -> None:
    """Give ``wrapper`` the signature typer reads (these parameters), not the wrapped command's own."""
    wrapper.__signature__ = own.replace(parameters=parameters, return_annotation=None)
    wrapper.__annotations__ = {p.name: p.annotation for p in parameters} | {"return": None}
    del wrapper.__wrapped__

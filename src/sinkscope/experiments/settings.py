"""An experiment's settings, declared once: a dataclass field made with `setting` carries its help text (and
its command-line spelling), so the command's options (`sinkscope.cli.settings.with_settings`) and the checks
of the Python function (`given_settings`) are generated from it instead of being written again.

    @dataclass
    class KV(TextLoss):
        ratios: tuple[float, ...] = setting((0.5, 0.75), "fraction evicted, in (0, 1)", flag="--ratio")

A tuple setting is a repeated option (``--ratio 0.5 --ratio 0.9``); a setting left out keeps the dataclass
default (or a preset's value, where the command has presets).
"""

from __future__ import annotations

import types
import typing
from dataclasses import MISSING, Field, dataclass, field, fields
from typing import Any

from ..errors import InputError

PANELS = ("measure", "explain", "consequences")  # where an experiment's command sits in `sinkscope --help`


@dataclass(frozen=True)
class Command:
    """How an experiment appears on the command line, declared on its class (``command = Command(...)``); the
    CLI builds the command from this and the declared settings (`sinkscope.cli.commands`), so an experiment
    needs no command module of its own.

    ``inputs``: ``prompts`` (``--prompts`` and ``--limit``: a prompt file, default the built-in probe set),
    ``text`` (``--text``: a UTF-8 file, default the experiment's), or none; every command takes ``--model``,
    ``--bos`` (default: the experiment's) and the run options. ``limit``: the default ``--limit``."""

    name: str
    panel: str
    help: str
    inputs: str = ""
    limit: int | None = None

    def __post_init__(self) -> None:
        if self.panel not in PANELS or self.inputs not in ("", "prompts", "text"):
            raise ValueError(f"command {self.name}: panel one of {PANELS}, inputs '', 'prompts' or 'text'")


def setting(default: Any, help: str, *, flag: str | None = None, aliases: tuple[str, ...] = ()) -> Any:
    """A dataclass field with its help text; ``flag``: its option (default ``--`` + the name with dashes),
    ``aliases``: older spellings still accepted."""
    return field(default=default, metadata={"help": help, "flag": flag, "aliases": tuple(aliases)})


@dataclass(frozen=True)
class Declared:
    """One declared setting, as the command line sees it."""

    name: str
    kind: Any  # the field's type, resolved
    default: Any
    help: str
    flag: str
    aliases: tuple[str, ...]

    @property
    def element(self) -> Any:
        """The type of one value: the element type of a tuple setting, the type itself otherwise."""
        kind = _without_none(self.kind)
        return typing.get_args(kind)[0] if typing.get_origin(kind) is tuple else kind

    @property
    def repeated(self) -> bool:
        return typing.get_origin(_without_none(self.kind)) is tuple

    @property
    def shown_default(self) -> str:
        if self.default is None:
            return "none"
        if isinstance(self.default, tuple):
            return ", ".join(map(str, self.default)) or "none"
        return str(self.default)


def _without_none(kind: Any) -> Any:
    """``X | None`` -> ``X``; ``X | Y | None`` -> ``X`` (the first type is what the command line gives, e.g. a
    layer list ``str | list[int]`` as its text ``0-3,7``)."""
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        return [k for k in typing.get_args(kind) if k is not type(None)][0]
    return kind


def declared_settings(cls: type) -> list[Declared]:
    """The settings of an experiment class declared with `setting`, in field order."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in fields(cls):
        if "help" not in f.metadata:
            continue
        out.append(Declared(f.name, hints[f.name], _default(f), f.metadata["help"],
                            f.metadata["flag"] or "--" + f.name.replace("_", "-"), f.metadata["aliases"]))
    return out


def _default(f: Field[Any]) -> Any:
    if f.default is not MISSING:
        return f.default
    return f.default_factory() if f.default_factory is not MISSING else None


def given_settings(cls: type, given: dict[str, Any]) -> dict[str, Any]:
    """The settings given (those not None), lists as tuples; refuses a name that is not a field of ``cls``."""
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(given) - known)
    if unknown:
        raise InputError(f"{getattr(cls, 'name', cls.__name__)} has no setting '{unknown[0]}' "
                         f"(settings: {', '.join(sorted(known))})")
    return {k: tuple(v) if isinstance(v, list) else v for k, v in given.items() if v is not None}

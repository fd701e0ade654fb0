"""An experiment's Python function, generated from its dataclass: ``noop = experiment_function(Noop, "noop")``.

The function takes the model, its inputs (``texts`` for prompts, ``text`` for a text, ``tasks``: as its command
declares them, `settings.Command`, or as given where its command is written by hand), ``bos`` (or
``conditions=``), every field of the class as a keyword with the class's default, and the run options
(``out``, ``resume``, ``progress``, ``command``). Its signature is
generated from the fields, so ``help(noop)`` lists them, a misspelt setting is a TypeError as for any Python
function, and nothing is written twice. A scalar given for a tuple setting is that one value
(``lengths=512``); None for a setting that cannot be None keeps its default.
"""

from __future__ import annotations

import dataclasses
import inspect
import types
import typing
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .base import Experiment, run, takes_conditions
from .inputs import bos_conditions, prompt_list

RUN_PARAMETERS = (("out", None), ("resume", False), ("progress", True), ("command", None))
INPUT_FIELD = {"prompts": "prompts", "text": "text", "tasks": "tasks", "": None}  # the field the inputs fill
INPUT_NAME = {"prompts": "texts", "text": "text", "tasks": "tasks"}  # ... and their name in the function


def experiment_function(cls: type[Experiment], name: str, doc: str | None = None, inputs: str | None = None
                        ) -> Callable[..., Any]:
    """The Python function of ``cls`` (see the module docstring), named ``name``; ``doc``: its docstring;
    ``inputs``: what its first argument holds (default: what its command declares)."""
    if inputs is None:
        inputs = cls.command.inputs if cls.command is not None else ""
    field_of_inputs = INPUT_FIELD[inputs]
    hints = typing.get_type_hints(cls)
    fields = [f for f in dataclasses.fields(cls) if f.init and f.name not in (field_of_inputs, "bos")]
    defaults = {f.name: _default(f) for f in dataclasses.fields(cls)}

    def function(model: Any, given_inputs: Any = None, /, *, bos: Any = defaults.get("bos"),
                 out: str | Path | None = None, resume: bool = False, progress: Any = True,
                 command: str | None = None, **settings: Any) -> Any:
        limit = settings.pop("limit", None) if inputs == "prompts" else None  # else ``limit`` may be a setting
        chosen = {k: _coerced(hints[k], v) for k, v in settings.items() if v is not None or _admits_none(hints[k])}
        if inputs == "prompts":
            chosen["prompts"] = prompt_list(given_inputs, limit)
        elif field_of_inputs is not None and given_inputs is not None:  # None: the class's default
            chosen[field_of_inputs] = _coerced(hints[field_of_inputs], given_inputs)
        if "bos" in defaults:
            chosen["bos"] = bos if isinstance(defaults["bos"], str) else tuple(bos_conditions(bos))
        return run(cls(**chosen), model, out=out, resume=resume, progress=progress, command=command)

    keyword = inspect.Parameter.KEYWORD_ONLY
    parameters = [inspect.Parameter("model", inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    if inputs:
        parameters.append(inspect.Parameter(INPUT_NAME[inputs], inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                            default=None if inputs == "prompts" else defaults[field_of_inputs]))
    if "bos" in defaults:
        parameters.append(inspect.Parameter("bos", keyword, default=defaults["bos"]))
    if inputs == "prompts":
        parameters.append(inspect.Parameter("limit", keyword, default=None))
    parameters += [inspect.Parameter(f.name, keyword, default=defaults[f.name], annotation=hints[f.name])
                   for f in fields]
    parameters += [inspect.Parameter(n, keyword, default=d) for n, d in RUN_PARAMETERS]

    def called(*args: Any, **kwargs: Any) -> Any:
        # bind by the generated signature (an unknown keyword is a TypeError; ``texts=`` / ``text=`` work by name)
        bound = signature.bind(*args, **kwargs)
        values = dict(bound.arguments)
        model = values.pop("model")
        given_inputs = values.pop(INPUT_NAME[inputs], None) if inputs else None
        return function(model, given_inputs, **values)

    signature = inspect.Signature(parameters, return_annotation=cls.result_type)
    called.__signature__ = signature  # type: ignore[attr-defined]
    called.__name__ = called.__qualname__ = name
    called.__module__ = cls.__module__
    called.__doc__ = doc or cls.__doc__
    return takes_conditions(called)


def _default(f: dataclasses.Field[Any]) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else None


def _admits_none(kind: Any) -> bool:
    return typing.get_origin(kind) in (typing.Union, types.UnionType) and type(None) in typing.get_args(kind)


def _coerced(kind: Any, value: Any) -> Any:
    """A tuple setting given as one value, or as a list: a tuple."""
    arms = typing.get_args(kind) if typing.get_origin(kind) in (typing.Union, types.UnionType) else (kind,)
    if not any(typing.get_origin(arm) is tuple for arm in arms):
        return value
    if isinstance(value, (str, bytes, int, float, bool)):
        return (value,)
    return tuple(value) if isinstance(value, Sequence) and not isinstance(value, tuple) else value

"""Terminal tables (rich): what a command prints when it finishes, one registered function per experiment.

Like the figures, tables are drawn from a `Result` by a function registered with ``@table_for_experiment``;
the command modules only call `table_for`.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from typing import Any

TABLES: dict[str, Callable[[Any], list[Any]]] = {}


def _import_all() -> None:
    """Import every module of this package: each registers what it draws (a new one needs no list here)."""
    for module in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{module.name}")


def table_for_experiment(experiment: str) -> Callable[[Callable[[Any], list[Any]]], Callable[[Any], list[Any]]]:
    """Register the function that renders an experiment's result as rich tables: result -> [Table, ...]."""

    def register(render: Callable[[Any], list[Any]]) -> Callable[[Any], list[Any]]:
        TABLES[experiment] = render
        return render

    return register


def table_for(result: Any, **options: Any) -> list[Any]:
    """The rich tables (or other renderables) that summarise a result on the terminal. ``options``: display
    choices of that experiment's renderer (e.g. knockout's ``top``)."""
    _import_all()
    render = TABLES.get(result.experiment)
    return [] if render is None else render(result, **options)


from .measure import layer_table  # noqa: E402

__all__ = ["TABLES", "layer_table", "table_for", "table_for_experiment"]

"""Every figure sinkscope draws (matplotlib, headless), and the one helper that saves them.

Experiments do not plot: each registers, here, a function that turns its `Result` into figures
(``@figure_for("scan")``), and ``Result.figures()`` / ``Result.save()`` look it up. The modules of this
package group the figures by what they show; `save_figure` is the only place a figure is written.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

FIGURES: dict[str, Callable[[Any], dict[str, Any]]] = {}


def _import_all() -> None:
    """Import every module of this package: each registers what it draws (a new one needs no list here)."""
    for module in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{module.name}")


def pyplot() -> Any:
    """matplotlib.pyplot on the headless Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def figure_for(experiment: str) -> Callable[[Callable[[Any], dict[str, Any]]], Callable[[Any], dict[str, Any]]]:
    """Register the function that draws an experiment's figures: result -> {file stem: figure}."""

    def register(draw: Callable[[Any], dict[str, Any]]) -> Callable[[Any], dict[str, Any]]:
        FIGURES[experiment] = draw
        return draw

    return register


def figures_for(result: Any) -> dict[str, Any]:
    """{file stem: figure} for a result (none if its experiment draws none)."""
    _import_all()
    draw = FIGURES.get(result.experiment)
    return {} if draw is None else draw(result)


def save_figure(fig: Any, path: str | Path, dpi: int = 120) -> Path:
    """Write a figure as PNG (creating its directory; atomically) and close it."""
    from ...rundir import atomic_path

    path = Path(path)
    try:
        with atomic_path(path) as temp:
            fig.savefig(temp, dpi=dpi, format=path.suffix.lstrip(".") or "png")
    finally:
        pyplot().close(fig)
    return path


# The figure builders, and path-taking shortcuts for callers that draw one figure straight to a file.
from .common import alpha_heatmaps_figure, heatmaps_figure, sink_rate_by_layer_figure  # noqa: E402
from .lab import final_sink_rate_figure, sink_rate_over_training_figure  # noqa: E402


def plot_alpha_heatmaps(panels: Any, path: str | Path) -> Path:
    return save_figure(alpha_heatmaps_figure(panels), path)


def plot_sink_rate_by_layer(series: Any, eps: float, path: str | Path) -> Path:
    return save_figure(sink_rate_by_layer_figure(series, eps), path)


def plot_sink_rate_over_training(groups: Any, path: str | Path) -> Path:
    return save_figure(sink_rate_over_training_figure(groups), path)


def plot_final_sink_rate(summary: Any, path: str | Path, eps: float = 0.3) -> Path:
    return save_figure(final_sink_rate_figure(summary, eps), path)


__all__ = [
    "FIGURES", "alpha_heatmaps_figure", "figure_for", "figures_for", "final_sink_rate_figure", "heatmaps_figure",
    "plot_alpha_heatmaps", "plot_final_sink_rate", "plot_sink_rate_by_layer",
    "plot_sink_rate_over_training", "pyplot", "save_figure", "sink_rate_by_layer_figure",
    "sink_rate_over_training_figure",
]

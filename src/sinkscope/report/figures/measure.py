"""Figures of the measurements: the scan's layer x head map of first-token attention and, for a scan with
``per_position``, first-token attention against query position per layer type."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from . import figure_for, pyplot
from .common import alpha_heatmaps_figure

MAX_POINTS = 400  # positions per line: longer inputs are averaged over equal bins of positions


@figure_for("scan")
def scan_figures(result: Any) -> dict[str, Any]:
    figures = {"alpha_heatmap": alpha_heatmaps_figure([(result.label, result.alpha_map())])}
    if "positions" in result.tables:
        figures["first_token_by_position"] = position_figure(result.tables["positions"], result.label)
    return figures


def position_curves(positions: pd.DataFrame, max_points: int = MAX_POINTS) -> pd.DataFrame:
    """Mean first-token attention per (layer, position bin) over heads and prompts (visible queries only):
    columns layer, layer_type, position (the bin's first position), attention. Bins are spaced evenly on a
    log scale (every position while there are fewer than ``max_points``), as the figure's axis is."""
    n = int(positions["position"].max()) + 1
    if n < max_points:  # every position its own point (log-spaced integers would merge some near the top)
        edges = np.arange(n + 1)
    else:
        edges = np.unique(np.geomspace(1, n + 1, num=max_points).astype(np.int64)) - 1  # starts at position 0
    starts = edges[np.searchsorted(edges, positions["position"].to_numpy(), side="right") - 1]
    binned = positions.assign(position=starts)
    curves = binned.groupby(["layer", "layer_type", "position"], observed=True)["attention"].mean()
    return curves.reset_index().dropna(subset=["attention"])


def position_figure(positions: pd.DataFrame, title: str) -> Any:
    """One panel per layer type (sliding vs full), one line per layer: where the sink holds as the context
    grows, and where a sliding window drops it."""
    plt = pyplot()
    curves = position_curves(positions)
    kinds = sorted(curves["layer_type"].astype(str).unique())
    fig, axes = plt.subplots(1, len(kinds), figsize=(6.5 * len(kinds), 4.2), squeeze=False, sharey=True)
    n_layers = int(curves["layer"].max()) + 1
    colours = plt.get_cmap("viridis")(np.linspace(0, 0.9, n_layers))
    for ax, kind in zip(axes[0], kinds, strict=True):
        for layer, line in curves[curves["layer_type"].astype(str) == kind].groupby("layer"):
            ax.plot(line["position"] + 1, line["attention"], color=colours[int(layer)], lw=1.2,
                    label=f"layer {layer}")
        ax.set_xscale("log")
        ax.set_xlabel("query position (log)")
        ax.set_title(f"{kind.replace('_', ' ')} layers")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=2, loc="best")
    axes[0][0].set_ylabel("attention on position 0 (mean over heads)")
    fig.suptitle(f"{title}: first-token attention against query position")
    fig.tight_layout()
    return fig

"""Figures of the long-context retrieval experiments: RULER-style task x length accuracy per `<bos>`
condition (and their difference), and length x depth accuracy of the tasks with a target depth."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from . import figure_for, pyplot

plt = pyplot()


def _annotated(ax: Any, grid: pd.DataFrame, vmin: float, vmax: float, cmap: str) -> Any:
    values = grid.to_numpy(dtype=float)
    image = ax.imshow(values, vmin=vmin, vmax=vmax, cmap=cmap, aspect="auto", interpolation="nearest")
    ax.set_xticks(range(grid.shape[1]), [f"{c:g}" if isinstance(c, float) else str(c) for c in grid.columns])
    ax.set_yticks(range(grid.shape[0]), [str(i) for i in grid.index])
    middle = (vmin + vmax) / 2
    for (i, j), value in np.ndenumerate(values):
        if np.isfinite(value):
            dark = value < middle if cmap == "viridis" else abs(value) > 0.5 * vmax
            ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=8, color="white" if dark else "black")
        else:  # a length the task cannot fit with this tokenizer (see summary["skipped"])
            ax.text(j, i, "n/a", ha="center", va="center", fontsize=7, color="grey")
    return image


def accuracy_heatmaps_figure(accuracy: pd.DataFrame, difference: pd.DataFrame | None, title: str) -> Figure:
    """Task x length heatmaps of the mean score, one panel per condition, and one of the first condition
    minus the second (paired by trial) when there are two or more."""
    conditions = list(dict.fromkeys(accuracy["bos"]))
    tasks = list(dict.fromkeys(accuracy["task"]))
    lengths = sorted(accuracy["length"].unique())
    panels = len(conditions) + (1 if difference is not None and len(difference) else 0)
    fig, axes = plt.subplots(1, panels, figsize=(1.6 + 0.9 * len(lengths) * panels + 1.2 * panels,
                                                 1.2 + 0.38 * len(tasks)), squeeze=False, constrained_layout=True)
    image = None
    for ax, bos in zip(axes[0], conditions, strict=False):
        grid = accuracy[accuracy["bos"] == bos].pivot(index="task", columns="length", values="accuracy")
        image = _annotated(ax, grid.reindex(index=tasks, columns=lengths), 0.0, 1.0, "viridis")
        ax.set_title(f"bos={bos}", fontsize=9)
    for ax in axes[0][1:len(conditions)]:
        ax.set_yticklabels([])
    fig.colorbar(image, ax=axes[0][:len(conditions)].tolist(), label="score (RULER string match)")
    if panels > len(conditions):
        ax = axes[0][-1]
        first = difference[difference["other"] == difference["other"].iloc[0]]
        grid = first.pivot(index="task", columns="length", values="difference").reindex(index=tasks, columns=lengths)
        diverging = _annotated(ax, grid, -1.0, 1.0, "RdBu")
        ax.set_yticklabels([])
        ax.set_title(f"{first['first'].iloc[0]} - {first['other'].iloc[0]}", fontsize=9)
        fig.colorbar(diverging, ax=ax, label="score difference")
    # One label for the row: per-panel labels overlap when a panel holds a single length.
    fig.supxlabel("prompt length (text tokens)", fontsize=10)
    fig.suptitle(title, fontsize=10)
    return fig


def depth_heatmaps_figure(frame: pd.DataFrame, title: str) -> Figure:
    """Length x depth mean score of each task that places its target needle at a depth, per condition."""
    placed = frame[frame["depth"].notna()]
    tasks = list(dict.fromkeys(placed["task"]))
    conditions = list(dict.fromkeys(placed["bos"]))
    fig, axes = plt.subplots(len(tasks), len(conditions), figsize=(1.5 + 3.2 * len(conditions), 0.6 + 2.2 * len(tasks)),
                             squeeze=False, constrained_layout=True)
    image = None
    for row, task in enumerate(tasks):
        for col, bos in enumerate(conditions):
            ax = axes[row][col]
            cell = placed[(placed["task"] == task) & (placed["bos"] == bos)]
            grid = cell.pivot_table(index="length", columns="depth", values="score", aggfunc="mean")
            image = _annotated(ax, grid, 0.0, 1.0, "viridis")
            ax.set_title(f"{task}  bos={bos}", fontsize=8)
            ax.set_xlabel("depth of the target needle")
            ax.set_ylabel("length")
    fig.colorbar(image, ax=axes.ravel().tolist(), label="score")
    fig.suptitle(title, fontsize=10)
    return fig


@figure_for("ruler")
def ruler_figures(result: Any) -> dict[str, Any]:
    model = result.summary.get("model") or "model"
    figures = {"ruler_heatmap": accuracy_heatmaps_figure(result.tables["accuracy"], result.tables.get("difference"),
                                                         f"RULER-style tasks: {model}")}
    frame = result.tables["ruler"]
    if frame["depth"].notna().any() and frame.loc[frame["depth"].notna(), "depth"].nunique() > 1:
        figures["ruler_depth"] = depth_heatmaps_figure(frame, f"target depth x length: {model}")
    return figures

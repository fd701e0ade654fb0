"""Figures several experiments share: layer x head heatmaps and per-layer curves."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from matplotlib.figure import Figure

from . import pyplot

plt = pyplot()

def alpha_heatmaps_figure(panels: Sequence[tuple[str, np.ndarray]]) -> Figure:
    """One layer x head heatmap of mean first-token attention per (label, [layers, heads]) panel."""
    n = len(panels)
    layers = max(a.shape[0] for _, a in panels)
    heads = max(a.shape[1] for _, a in panels)
    width = min(3.0 + 0.35 * heads, 8.0) * n
    fig, axes = plt.subplots(1, n, figsize=(width, 1.5 + 0.22 * layers), squeeze=False, constrained_layout=True)
    image = None
    for ax, (label, values) in zip(axes[0], panels, strict=False):
        image = ax.imshow(values, aspect="auto", cmap="magma", vmin=0.0, vmax=1.0, interpolation="nearest")
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("head")
        ax.set_ylabel("layer")
        ax.set_xticks(range(values.shape[1]))
        ax.set_yticks(range(0, values.shape[0], max(1, values.shape[0] // 15)))
    fig.colorbar(image, ax=axes[0].tolist(), label="mean attention on first token (alpha)")
    return fig


def sink_rate_by_layer_figure(series: Sequence[tuple[str, np.ndarray]], eps: float) -> Figure:
    """Per-layer sink rate, one line per condition."""
    fig, ax = plt.subplots(figsize=(7, 3.5), constrained_layout=True)
    for label, values in series:
        ax.plot(np.arange(len(values)), values, marker="o", markersize=3, label=label)
    ax.set_xlabel("layer")
    ax.set_ylabel(f"sink rate (alpha > {eps})")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def heatmaps_figure(panels: Sequence[tuple[str, np.ndarray]], colorbar: str = "shared",
                  cmap: str = "viridis") -> Figure:
    """Layer x head heatmaps side by side; ``colorbar`` "shared" (one scale) or "per panel"."""
    n = len(panels)
    layers = max(a.shape[0] for _, a in panels)
    fig, axes = plt.subplots(1, n, figsize=(3.2 * n, 1.6 + 0.22 * layers), squeeze=False, constrained_layout=True)
    finite = np.concatenate([a[np.isfinite(a)].ravel() for _, a in panels]) if panels else np.zeros(1)
    vmin, vmax = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    for ax, (label, values) in zip(axes[0], panels, strict=False):
        kwargs = {"vmin": vmin, "vmax": vmax} if colorbar == "shared" else {}
        image = ax.imshow(values, aspect="auto", cmap=cmap, interpolation="nearest", **kwargs)
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("head")
        ax.set_ylabel("layer")
        if colorbar != "shared":
            fig.colorbar(image, ax=ax)
    if colorbar == "shared":
        fig.colorbar(image, ax=axes[0].tolist())
    return fig


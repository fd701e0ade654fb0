"""Figures (matplotlib, headless)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def plot_alpha_heatmaps(panels: Sequence[tuple[str, np.ndarray]], path: str | Path) -> Path:
    """One layer x head heatmap of mean first-token attention per (label, [layers, heads]) panel."""
    path = Path(path)
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
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_sink_rate_by_layer(series: Sequence[tuple[str, np.ndarray]], eps: float, path: str | Path) -> Path:
    """Per-layer sink rate, one line per condition."""
    path = Path(path)
    fig, ax = plt.subplots(figsize=(7, 3.5), constrained_layout=True)
    for label, values in series:
        ax.plot(np.arange(len(values)), values, marker="o", markersize=3, label=label)
    ax.set_xlabel("layer")
    ax.set_ylabel(f"sink rate (alpha > {eps})")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path

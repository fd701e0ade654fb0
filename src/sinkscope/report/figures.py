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


def plot_heatmaps(panels: Sequence[tuple[str, np.ndarray]], path: str | Path, colorbar: str = "shared",
                  cmap: str = "viridis") -> Path:
    """Layer x head heatmaps side by side; ``colorbar`` "shared" (one scale) or "per panel"."""
    path = Path(path)
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
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_noop(frame, path: str | Path) -> Path:
    """Left: rank of the first token's value norm among all tokens. Right: per head, mean first-token
    attention vs the first token's value norm relative to the median token."""
    path = Path(path)
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8), constrained_layout=True)
    for bos, group in frame.groupby("bos", sort=False):
        per_head = group.groupby(["layer", "head"])[["alpha", "first_value_ratio", "first_value_rank"]].mean()
        left.hist(group["first_value_rank"], bins=np.arange(1, group["n_tokens"].max() + 2) - 0.5, alpha=0.6,
                  label=f"bos={bos}")
        right.scatter(per_head["alpha"], per_head["first_value_ratio"], s=12, alpha=0.7, label=f"bos={bos}")
    left.set_xlabel("rank of first token's value norm (1 = smallest)")
    left.set_ylabel("(prompt, layer, head) count")
    left.legend(fontsize=8)
    right.axhline(1.0, color="grey", lw=0.8, ls="--")
    right.set_yscale("log")
    right.set_xlabel("mean attention on first token (alpha), per head")
    right.set_ylabel("||v_first|| / median ||v_j||")
    right.legend(fontsize=8)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_sink_rate_over_training(groups: dict[str, dict[str, tuple[object, object]]], path: str | Path) -> Path:
    """Sink rate vs training tokens: one row per group of runs, one column per eps, plus validation loss
    (and, when a run's attention has a sink logit, the share of attention that logit takes).

    ``groups[group][run] = (sinks, evals)``: the lab's tidy tables (sinks: step, tokens, inference, layer, eps,
    sink_rate[, sink_logit_mass]; evals: step, tokens, validation). A run's sink rate is the mean over layers
    (= over heads), and over seeds when several runs share a label.
    Colour = run; line style = inference input (solid ``<bos>`` + text, dashed text alone).
    """
    path = Path(path)
    eps_values = sorted({float(e) for runs in groups.values() for sinks, _ in runs.values() for e in sinks["eps"]})
    with_mass = any("sink_logit_mass" in sinks and sinks["sink_logit_mass"].notna().any()
                    for runs in groups.values() for sinks, _ in runs.values())
    columns = len(eps_values) + 1 + int(with_mass)
    fig, axes = plt.subplots(len(groups), columns, figsize=(4.2 * columns, 3.2 * len(groups)), squeeze=False,
                             constrained_layout=True)
    styles = {"bos+text": "-", "text": "--"}
    colours = plt.get_cmap("viridis")
    loss_column = len(eps_values)
    for row, (group, runs) in enumerate(groups.items()):
        for index, (label, (sinks, evals)) in enumerate(runs.items()):
            colour = colours(index / max(len(runs) - 1, 1) * 0.9)
            for col, eps in enumerate(eps_values):
                chosen = sinks[sinks["eps"] == eps]
                for inference, part in chosen.groupby("inference", sort=False):
                    curve = part.groupby("tokens")["sink_rate"].mean()
                    axes[row][col].plot(curve.index, curve.values, styles.get(inference, ":"), color=colour,
                                        label=f"{label} [{inference}]")
            if evals is not None and len(evals):
                curve = evals.groupby("tokens")["validation"].mean()
                axes[row][loss_column].plot(curve.index, curve.values, color=colour, label=label)
            if with_mass and "sink_logit_mass" in sinks and sinks["sink_logit_mass"].notna().any():
                for inference, part in sinks.groupby("inference", sort=False):
                    curve = part.groupby("tokens")["sink_logit_mass"].mean()
                    axes[row][-1].plot(curve.index, curve.values, styles.get(inference, ":"), color=colour,
                                       label=f"{label} [{inference}]")
        for col, eps in enumerate(eps_values):
            ax = axes[row][col]
            ax.set_title(f"{group}: sink rate, eps = {eps:g}", fontsize=9)
            ax.set_ylim(-0.03, 1.03)
            ax.set_xlabel("training tokens")
            ax.set_ylabel("fraction of heads")
        axes[row][loss_column].set_title(f"{group}: validation loss", fontsize=9)
        axes[row][loss_column].set_xlabel("training tokens")
        if with_mass:
            axes[row][-1].set_title(f"{group}: attention taken by the sink logit", fontsize=9)
            axes[row][-1].set_xlabel("training tokens")
            axes[row][-1].set_ylim(-0.03, 1.03)
        axes[row][0].legend(fontsize=6, loc="upper left")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_final_sink_rate(summary, path: str | Path, eps: float = 0.3) -> Path:
    """Final sink rate per run (mean over seeds), one panel per group, bars per inference input: the sweep's
    answer at a glance (the paper's Fig. 5 bars / Table 2 column). ``summary``: the sweep's summary table."""
    path = Path(path)
    chosen = summary[summary["eps"] == eps]
    groups = list(dict.fromkeys(chosen["group"]))
    fig, axes = plt.subplots(1, len(groups), figsize=(4.5 * len(groups), 3.4), squeeze=False,
                             constrained_layout=True)
    for ax, group in zip(axes[0], groups, strict=True):
        part = chosen[chosen["group"] == group]
        labels = list(dict.fromkeys(part["label"]))
        inputs = list(dict.fromkeys(part["inference"]))
        width = 0.8 / max(len(inputs), 1)
        for index, inference in enumerate(inputs):
            values = [part[(part["label"] == label) & (part["inference"] == inference)]["sink_rate"].mean()
                      for label in labels]
            positions = np.arange(len(labels)) + (index - (len(inputs) - 1) / 2) * width
            ax.bar(positions, values, width, label=inference)
        ax.set_xticks(np.arange(len(labels)))
        keys = {label.split("=")[0] for label in labels}
        if len(keys) == 1 and all(label.count("=") == 1 for label in labels):  # one axis: its values as ticks
            ax.set_xticklabels([label.split("=", 1)[1] for label in labels], fontsize=8)
            ax.set_xlabel(keys.pop())
        else:
            ax.set_xticklabels([label.replace(", ", "\n") for label in labels], fontsize=7)
        ax.set_ylim(0, 1)
        ax.set_ylabel(f"final sink rate (eps = {eps:g})")
        ax.set_title(group, fontsize=9)
        ax.legend(fontsize=7)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path

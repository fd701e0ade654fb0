"""The emergence lab's figures: sink rate over training, final sink rate per run and per layer."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from . import pyplot, save_figure

plt = pyplot()

def sink_rate_over_training_figure(groups: dict[str, dict[str, tuple[object, object]]]) -> Figure:
    """Sink rate vs training tokens: one row per group of runs, one column per eps, plus validation loss
    (and, when a run's attention has a sink logit, the share of attention that logit takes).

    ``groups[group][run] = (sinks, evals)``: the lab's tidy tables (sinks: step, tokens, inference, layer, eps,
    sink_rate[, sink_logit_mass]; evals: step, tokens, validation). A run's sink rate is the mean over layers
    (= over heads), and over seeds when several runs share a label.
    Colour = run; line style = inference input (solid ``<bos>`` + text, dashed text alone).
    """
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
    return fig


def final_sink_rate_figure(summary: Any, eps: float = 0.3) -> Figure:
    """Final sink rate per run (mean over seeds), one panel per group, bars per inference input: the sweep's
    answer at a glance (the paper's Fig. 5 bars / Table 2 column). ``summary``: the sweep's summary table."""
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
            values_shown = [label.split("=", 1)[1] for label in labels]
            long_labels = max(len(v) for v in values_shown) > 6  # words, not numbers: slant them
            ax.set_xticklabels(values_shown, fontsize=8, rotation=30 if long_labels else 0,
                               ha="right" if long_labels else "center")
            ax.set_xlabel(keys.pop())
        else:
            ax.set_xticklabels([label.replace(", ", "\n") for label in labels], fontsize=7)
        ax.set_ylim(0, 1)
        ax.set_ylabel(f"final sink rate (eps = {eps:g})")
        ax.set_title(group, fontsize=9)
        ax.legend(fontsize=7)
    return fig


def final_sink_rate_by_layer_figure(by_layer: Any, eps: float = 0.3) -> Figure:
    """Final sink rate per layer, one line per run (mean over seeds), one panel per group x inference input:
    where in the model the sinks are, and (for a depth sweep) how that changes with the number of layers.
    ``by_layer``: the sweep's ``final_by_layer`` table (group, label, inference, eps, layer, sink_rate)."""
    chosen = by_layer[by_layer["eps"] == eps]
    panels = list(dict.fromkeys(zip(chosen["group"], chosen["inference"], strict=True)))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.4), squeeze=False,
                             constrained_layout=True)
    colours = plt.get_cmap("viridis")
    for ax, (group, inference) in zip(axes[0], panels, strict=True):
        part = chosen[(chosen["group"] == group) & (chosen["inference"] == inference)]
        labels = list(dict.fromkeys(part["label"]))
        for index, label in enumerate(labels):
            line = part[part["label"] == label].sort_values("layer")
            ax.plot(line["layer"], line["sink_rate"], "o-", color=colours(index / max(len(labels) - 1, 1) * 0.9),
                    label=label)
        ax.set_xlabel("layer (attention block)")
        ax.set_ylabel(f"final sink rate (eps = {eps:g})")
        ax.set_ylim(-0.03, 1.03)
        ax.set_title(f"{group} [{inference}]", fontsize=9)
        ax.legend(fontsize=7)
    return fig


def plot_final_sink_rate_by_layer(by_layer: Any, path: str | Path, eps: float = 0.3) -> Path:
    return save_figure(final_sink_rate_by_layer_figure(by_layer, eps), path)

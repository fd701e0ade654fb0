"""Figures of the consequences experiments (registered per experiment with `figure_for`): loss by position
(ablate), Δloss per layer and head (knockout), passkey accuracy maps, streaming caches, downstream scores."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
from matplotlib.colors import TwoSlopeNorm

from . import figure_for, pyplot

plt = pyplot()
ROLLING = 64  # tokens in the rolling mean of the stream figure


@figure_for("ablate")
def ablate_figures(result: Any) -> dict[str, Any]:
    """Left: mean loss per position bucket, one line per condition. Right: the same minus the reference."""
    summary = result.summary
    buckets = result.tables["ablate"]
    per = (buckets.assign(total=buckets["mean_loss"] * buckets["n_tokens"])
           .groupby(["condition", "bucket_index", "bucket"], sort=False)[["total", "n_tokens"]].sum()
           .reset_index())
    per["loss"] = per["total"] / per["n_tokens"]  # token-weighted mean over windows
    reference = summary["reference"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4), constrained_layout=True)
    labels = per.drop_duplicates("bucket_index").sort_values("bucket_index")
    base = per[per["condition"] == reference].set_index("bucket_index")["loss"]
    for condition in summary["conditions"]:
        group = per[per["condition"] == condition].sort_values("bucket_index")
        ppl = summary["loss"][condition]["ppl"]
        left.plot(group["bucket_index"], group["loss"], marker="o", label=f"{condition} (ppl {ppl:.1f})")
        right.plot(group["bucket_index"], group["loss"].to_numpy() - base.loc[group["bucket_index"]].to_numpy(),
                   marker="o", label=condition)
    for ax in (left, right):
        ax.set_xticks(labels["bucket_index"], labels["bucket"])
        ax.set_xlabel("position of the predicted token in the window")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    left.set_ylabel("mean loss (nats/token)")
    right.set_ylabel(f"loss - loss({reference})")
    right.axhline(0, color="grey", lw=0.8)
    fig.suptitle(f"{result.provenance['model']['name']}: loss by position, {summary['n_windows']} windows x "
                 f"{summary['window']} text tokens", fontsize=10)
    return {"loss_by_position": fig}


@figure_for("knockout")
def knockout_figures(result: Any) -> dict[str, Any]:
    """A layer x head heatmap of Δloss (when single heads were knocked out) and a per-layer bar chart."""
    summary = result.summary
    frame = result.tables["knockout"]
    target = frame["target"] if "target" in frame else pd.Series("first", index=frame.index)
    control = frame[(frame["scope"] == "layer") & (target == "random")]
    frame = frame[target == "first"]
    heads = frame[frame["scope"] == "head"]
    layers = frame[frame["scope"] == "layer"]
    panels = 2 if len(heads) else 1
    n_layers = int(summary["n_layers"])
    fig, axes = plt.subplots(1, panels, figsize=(5.5 * panels, 1.8 + 0.2 * n_layers), squeeze=False,
                             constrained_layout=True)
    bars = axes[0][-1]
    height = 0.4 if len(control) else 0.8
    _interval_bars(bars, layers, -height / 2 if len(control) else 0.0, height, "tab:red", "first key (the sink)")
    if len(control):
        _interval_bars(bars, control, height / 2, height, "tab:grey", "one random other key per query")
        bars.legend(fontsize=7, loc="lower right")
    bars.set_yticks(range(0, n_layers, max(1, n_layers // 15)))
    bars.set_ylim(n_layers - 0.5, -0.5)  # layer 0 on top, as in the heatmap
    bars.axvline(0, color="grey", lw=0.8)
    bars.set_xlabel("Δloss, all heads of the layer (nats; 95% interval over windows)")
    bars.set_ylabel("layer")
    title = f"all heads, all layers: Δloss {summary['all_heads']['delta_loss']:+.3f}"
    if summary.get("control"):
        title += f" (random key: {summary['control']['all_heads']['delta_loss']:+.3f})"
    bars.set_title(title, fontsize=9)
    if len(heads):
        grid = np.full((n_layers, int(summary["n_heads"])), np.nan)
        grid[heads["layer"].astype(int), heads["head"].astype(int)] = heads["delta_loss"]
        finite = grid[np.isfinite(grid)]
        bound = max(float(np.abs(finite).max()), 1e-6)
        image = axes[0][0].imshow(grid, aspect="auto", cmap="RdBu_r", interpolation="nearest",
                                  norm=TwoSlopeNorm(0.0, -bound, bound))
        axes[0][0].set_xticks(range(grid.shape[1]))
        axes[0][0].set_yticks(range(0, n_layers, max(1, n_layers // 15)))
        axes[0][0].set_xlabel("head")
        axes[0][0].set_ylabel("layer")
        axes[0][0].set_title("Δloss, one head knocked out", fontsize=9)
        fig.colorbar(image, ax=axes[0][0], label="nats")
    fig.suptitle(f"{result.provenance['model']['name']}: sink knock-out (baseline loss "
                 f"{summary['baseline']['loss']:.3f})", fontsize=10)
    return {"knockout": fig}


def _interval_bars(ax: Any, rows: pd.DataFrame, offset: float, height: float, color: str, label: str) -> None:
    """Horizontal Δloss bars per layer, with their bootstrap intervals where the table has them."""
    y = rows["layer"].astype(int).to_numpy() + offset
    values = rows["delta_loss"].to_numpy(dtype=float)
    error = None
    if "delta_loss_low" in rows:
        error = np.abs(np.stack([values - rows["delta_loss_low"].to_numpy(dtype=float),
                                 rows["delta_loss_high"].to_numpy(dtype=float) - values]))
    ax.barh(y, values, height=height, color=color, xerr=error, error_kw={"lw": 0.7}, label=label)


@figure_for("passkey")
def passkey_figures(result: Any) -> dict[str, Any]:
    """Length x depth exact-match accuracy, one panel per `<bos>` condition."""
    frame = result.tables["passkey"]
    conditions = list(dict.fromkeys(frame["bos"]))
    fig, axes = plt.subplots(1, len(conditions), figsize=(4.2 * len(conditions) + 1, 3.8), squeeze=False,
                             constrained_layout=True)
    image = None
    for ax, bos in zip(axes[0], conditions, strict=True):
        grid = frame[frame["bos"] == bos].pivot_table("correct", "length", "depth", aggfunc="mean")
        image = ax.imshow(grid.to_numpy(dtype=float), vmin=0, vmax=1, cmap="viridis", aspect="auto", origin="lower")
        ax.set_xticks(range(grid.shape[1]), [f"{d:g}" for d in grid.columns])
        ax.set_yticks(range(grid.shape[0]), [str(n) for n in grid.index])
        for (i, j), value in pd.DataFrame(grid.to_numpy()).stack().items():
            ax.text(j, i, f"{value:.2f}", ha="center", va="center", color="white" if value < 0.6 else "black",
                    fontsize=8)
        ax.set_xlabel("depth of the key (fraction of filler)")
        ax.set_title(f"bos={bos}  accuracy {result.summary['accuracy'][bos]:.2f}")
    axes[0][0].set_ylabel("prompt length (text tokens)")
    fig.colorbar(image, ax=axes[0].tolist(), label="exact-match accuracy")
    fig.suptitle(f"passkey retrieval: {result.summary.get('model')}")
    return {"passkey_heatmap": fig}


@figure_for("stream")
def stream_figures(result: Any) -> dict[str, Any]:
    """Rolling next-token loss and cache size against the position in the stream, one line per cache."""
    summary = result.summary
    frame = result.tables["stream"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.2), constrained_layout=True)
    if "segment" in frame:  # several segments: the mean over them at each position
        frame = frame.groupby(["cache", "position"], sort=False, as_index=False)[["nll", "cache_bytes"]].mean()
    for label, group in frame.groupby("cache", sort=False):
        rolling = group["nll"].rolling(ROLLING, min_periods=1).mean()
        left.plot(group["position"], rolling, label=f"{label}  (ppl {summary['ppl'][label]:.2f})", linewidth=1)
        right.plot(group["position"], group["cache_bytes"] / 2**20, label=label, linewidth=1.2)
    for ax in (left, right):
        ax.axvline(summary["eval_start"], color="grey", linestyle=":", linewidth=1)
        ax.set_xlabel("position in the stream (tokens)")
        ax.legend(fontsize=8)
    left.set_ylabel(f"next-token NLL (rolling mean, {ROLLING} tokens)")
    right.set_ylabel("KV cache (MiB)")
    segments = summary.get("segments", 1)
    left.set_title(f"{summary['model']}: window {summary['window']}"
                   + (f", mean of {segments} segments" if segments > 1 else "") + "; dotted line: evaluation starts")
    right.set_title("cache size: flat once a streaming cache is full")
    return {"stream": fig}


@figure_for("downstream")
def downstream_figures(result: Any) -> dict[str, Any]:
    """Grouped bars: each task's metric with `<bos>` on and off."""
    frame = result.tables["downstream"]
    if frame.empty:  # lm-eval reported no numeric metric
        return {}
    pivot = frame.pivot_table("value", ["task", "metric"], "bos")
    fig, ax = plt.subplots(figsize=(max(5, 1.2 * len(pivot)), 3.5), constrained_layout=True)
    pivot.plot.bar(ax=ax, rot=30)
    ax.set_ylabel("score")
    return {"downstream": fig}

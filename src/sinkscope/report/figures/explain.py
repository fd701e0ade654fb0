"""Figures of the experiments that explain the sink (registered per experiment with `figure_for`).

Attention experiments (smoothing, noop, conditional heads) draw layer x head maps (``layer`` = attention
block 0..L-1); residual-stream experiments (rank and representational collapse, massive activations,
perturbation, over-squashing) draw against ``depth`` (0 = embeddings, d = output of layer d-1).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from matplotlib.figure import Figure

from ...metrics import collapse as collapse_metrics
from ...metrics.activations import MASSIVE_FACTORS
from . import figure_for, pyplot
from .common import heatmaps_figure

plt = pyplot()
DEPTH_AXIS = "depth (0 = embeddings)"


def _colours() -> list[str]:
    return plt.rcParams["axes.prop_cycle"].by_key()["color"]


def _integer_ticks(axis: Any) -> None:
    """Whole-number ticks on an axis (depths)."""
    from matplotlib.ticker import MaxNLocator

    axis.set_major_locator(MaxNLocator(integer=True))


# -- attention: smoothing, no-op, conditional heads ---------------------------------------------------
@figure_for("smoothing")
def smoothing_figures(result: Any) -> dict[str, Figure]:
    frame = result.tables["smoothing"]
    panels = []
    for column, title in (("entropy", "entropy"), ("max_weight", "max weight")):
        for bos, group in frame.groupby("bos", sort=False):
            panels.append((f"{title}, bos={bos}", group.pivot_table(column, "layer", "head").to_numpy()))
    return {"smoothing": heatmaps_figure(panels, colorbar="per panel")}


def noop_figure(frame: Any) -> Figure:
    """Left: rank of the first token's value norm among all tokens. Right: per head, mean first-token
    attention vs the first token's value norm relative to the median token."""
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
    return fig


@figure_for("noop")
def noop_figures(result: Any) -> dict[str, Figure]:
    return {"noop": noop_figure(result.tables["noop"])}


@figure_for("conditional_heads")
def conditional_heads_figures(result: Any) -> dict[str, Figure]:
    frame = result.tables["conditional_heads"]
    panels = [(title, frame.pivot_table(column, "layer", "head").to_numpy()) for title, column in (
        ("alpha, other queries", "alpha_other"), ("alpha, after trigger", "alpha_trigger"),
        ("drop (other - trigger)", "drop"))]
    return {"conditional_heads": heatmaps_figure(panels, colorbar="per panel")}


# -- the residual stream: rank and representational collapse, massive activations ------------------------
@figure_for("rank_collapse")
def rank_collapse_figures(result: Any) -> dict[str, Figure]:
    table, summary = result.tables["per_depth"], result.summary
    fig, axes = plt.subplots(2, 2, figsize=(10, 6.5), constrained_layout=True)
    colours = _colours()
    for ax, measure in zip(axes.flat, collapse_metrics.RANK_MEASURES, strict=True):
        for i, bos in enumerate(summary["bos"]):
            for exclude in summary["exclude_sink"]:
                rows = table[(table["measure"] == measure) & (table["bos"] == bos)
                             & (table["exclude_sink"] == exclude)].sort_values("depth")
                label = f"bos={bos}" + (", first token excluded" if exclude else "")
                ax.plot(rows["depth"], rows["mean"], color=colours[i % len(colours)],
                        linestyle="--" if exclude else "-", marker="o", markersize=2.5, label=label)
        if measure == "effective_rank":
            ax.set_yscale("log")  # the embeddings' rank dwarfs every later depth's
        ax.set_title(measure.replace("_", " "), fontsize=10)
        ax.set_xlabel(DEPTH_AXIS)
        _integer_ticks(ax.xaxis)
        ax.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=7)
    fig.suptitle(f"rank collapse of the residual stream: {summary['model']} ({summary['n_prompts']} prompts, mean)",
                 fontsize=11)
    return {"rank_collapse": fig}


@figure_for("repr_collapse")
def repr_collapse_figures(result: Any) -> dict[str, Figure]:
    table, summary = result.tables["repr_collapse"], result.summary
    if "repeat_token" in table:  # more repeated tokens: the curves of the first (as the summary's)
        table = table[(table["family"] != "repeated") | (table["repeat_token"] == summary["repeat_token"])]
    fig, axes = plt.subplots(1, 3, figsize=(13, 4), constrained_layout=True)
    colours = _colours()
    styles = ["-", "--", ":", "-."]
    titles = {"l2": "L2 distance", "linf": "L-inf distance", "cosine": "cosine distance"}
    for ax, distance in zip(axes, collapse_metrics.DISTANCES, strict=True):
        for f, family in enumerate(summary["families"]):
            for b, bos in enumerate(summary["bos"]):
                rows = table[(table["family"] == family) & (table["bos"] == bos)].sort_values("n")
                values = rows[distance].to_numpy(dtype=np.float64)
                values = np.where(values > 0, values, np.nan)  # exact zeros have no place on a log axis
                ax.plot(rows["n"], values, color=colours[b % len(colours)], linestyle=styles[f % len(styles)],
                        marker="o", markersize=3, label=f"{family}, bos={bos}")
        ax.set_xscale("log", base=2)
        ax.set_xticks(summary["lengths"], [str(n) for n in summary["lengths"]])
        ax.minorticks_off()
        ax.set_yscale("log")
        ax.set_xlabel("n (text tokens)")
        ax.set_title(titles[distance], fontsize=10)
        ax.grid(alpha=0.3, which="both")
    axes[0].legend(fontsize=7)
    fig.suptitle(f"representational collapse: {summary['model']} — last token's residual at the last depth, "
                 "sequence vs same sequence with its last token repeated", fontsize=10)
    return {"repr_collapse": fig}


@figure_for("massive")
def massive_figures(result: Any) -> dict[str, Figure]:
    summary = result.summary
    fig, ax = plt.subplots(figsize=(7.5, 4), constrained_layout=True)
    colours = _colours()
    for i, bos in enumerate(summary["bos"]):
        depths = np.arange(len(result.ratio_by_depth(bos)))
        colour = colours[i % len(colours)]
        ax.fill_between(depths, result.ratio_by_depth(bos, "min"), result.ratio_by_depth(bos, "max"), color=colour,
                        alpha=0.15, linewidth=0)
        ax.plot(depths, result.ratio_by_depth(bos), color=colour, marker="o", markersize=3,
                label=f"bos={bos} (median over prompts; band: min-max)")
    for factor in MASSIVE_FACTORS:
        ax.axhline(factor, color="grey", linestyle=":", linewidth=1)
        ax.annotate(f"{factor}x", (0, factor), textcoords="offset points", xytext=(2, 2), fontsize=7, color="grey")
    ax.set_yscale("log")
    ax.set_xlabel(DEPTH_AXIS)
    _integer_ticks(ax.xaxis)
    ax.set_ylabel("max |h| / median |h|")
    ax.set_title(f"massive activations: {summary['model']} ({summary['n_prompts']} prompts)", fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    return {"massive_activations": fig}


# -- information flow: perturbation spread, over-squashing -------------------------------------------------
@figure_for("perturb")
def perturb_figures(result: Any) -> dict[str, Figure]:
    from matplotlib.colors import PowerNorm

    frame, summary = result.tables["delta"], result.summary
    conditions = list(summary["conditions"])
    labels = summary["token_labels"]
    changed = set(summary["changed_positions"])
    n_tokens, n_rows = len(labels), int(frame["depth"].max()) + 1
    width = min(2.0 + 0.12 * n_tokens, 14.0)
    fig, axes = plt.subplots(2, len(conditions), figsize=(width * len(conditions), 2.5 + 0.36 * n_rows),
                             squeeze=False, constrained_layout=True)
    panels = (("delta", "||h(x) - h(x')||"), ("delta_rel", "||h(x) - h(x')|| / ||h(x)||"))
    for row, (column, title) in enumerate(panels):
        cubes = {c: frame[frame["bos"] == c].pivot(index="depth", columns="position", values=column).to_numpy()
                 for c in conditions}
        # One scale for all panels, set by the spread (tokens after the swap): the swapped token's own
        # change would otherwise wash everything out, so its column saturates. sqrt scale: the spread
        # spans orders of magnitude between early and late depths.
        after = [cube[:, summary["perturbed_position"] + 1:] for cube in cubes.values()]
        vmax = max((float(np.nanmax(a)) for a in after if a.size), default=0.0) or 1.0
        norm = PowerNorm(0.5, vmin=0.0, vmax=vmax)
        image = None
        for ax, condition in zip(axes[row], conditions, strict=True):
            image = ax.imshow(cubes[condition], aspect="auto", origin="lower", cmap="magma", norm=norm,
                              interpolation="nearest")
            stats = summary["conditions"][condition]
            suffix = "_rel" if column == "delta_rel" else ""
            ax.set_title(f"bos={condition}  S_total{suffix}={stats['S_total' + suffix]:.3g}  "
                         f"S_final{suffix}={stats['S_final' + suffix]:.3g}", fontsize=9)
            ax.set_ylabel(DEPTH_AXIS)
            _integer_ticks(ax.yaxis)
            ax.set_xticks(range(n_tokens))
            ax.set_xticklabels(labels, rotation=90, fontsize=5)
            for position in changed:
                ax.get_xticklabels()[position].set_color("tab:red")
                ax.axvline(position, color="tab:cyan", linewidth=0.6, alpha=0.7)
        fig.colorbar(image, ax=axes[row].tolist(), label=f"{title} (sqrt scale)", shrink=0.9, extend="max")
    swap = summary["swap"]
    fig.suptitle(f"{summary['model']}: perturbation '{swap['old']}' -> '{swap['new']}' "
                 f"(R_total={summary.get('R_total', float('nan')):.3g}, "
                 f"R_final={summary.get('R_final', float('nan')):.3g})", fontsize=10)
    return {"perturbation": fig}


@figure_for("oversquash")
def oversquash_figures(result: Any) -> dict[str, Figure]:
    frame, summary = result.tables["sensitivity"], result.summary
    if "text" in frame:  # several texts: the first one's curve (the report's verdict pairs all of them)
        frame = frame[frame["text"] == 0]
    columns = [("s", "sensitivity s = ||dh_j^(L) / dh_i^(0)||_F")]
    if frame["B_mean"].notna().any():
        columns += [("B_mean", "path-sum bound B, c_h = 1/H"), ("B_sum", "path-sum bound B, c_h = 1")]
    fig, axes = plt.subplots(1, len(columns), figsize=(5.0 * len(columns), 4.0), squeeze=False,
                             constrained_layout=True)
    colours = _colours()
    for ax, (column, title) in zip(axes[0], columns, strict=True):
        for index, condition in enumerate(summary["conditions"]):
            rows = frame[frame["bos"] == condition]
            text_rows, first = rows[~rows["is_prefix"]], rows[rows["source"] == 0]
            colour = colours[index % len(colours)]
            ax.plot(text_rows["distance"], text_rows[column], "-", marker=".", markersize=3, color=colour,
                    label=f"bos={condition}")
            ax.plot(first["distance"], first[column], "*", markersize=11, color=colour,
                    label=f"bos={condition}: position 0 ({first['token'].iloc[0]})")
        ax.set_yscale("log")
        ax.set_xlabel("distance j - i (tokens)")
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3, which="both")
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"{summary['model']}: sensitivity of token j = '{summary['target_token']}' "
                 f"to earlier tokens ({summary['method']})", fontsize=10)
    return {"oversquash": fig}

"""The `kv` Pareto figure: quality against memory, protected and unprotected caches told apart."""

from __future__ import annotations

from typing import Any

from . import figure_for, pyplot

plt = pyplot()
MARKERS = {"int8": "o", "int4": "s", "int2": "D", "window": "^", "knorm": "v", "snapkv": "P"}
POLICY_MARKS = {"found": "x", "massive": "+"}  # drawn over a cache whose protect budget keeps other tokens


@figure_for("kv")
def kv_figures(result: Any) -> dict[str, Any]:
    """Left: Δloss (95% interval over windows) against the bytes held, relative to the full cache. Right:
    retrieval through the cache (mean score, 95% interval over prompts) against the same. Filled markers keep
    protected tokens (protect > 0), hollow ones do not; a grey line joins the same cache with and without
    protection."""
    table = result.tables["kv"]
    has_retrieval = bool(table["retrieval"].notna().any())
    fig, axes = plt.subplots(1, 2 if has_retrieval else 1, figsize=(15 if has_retrieval else 9, 5),
                             constrained_layout=True, squeeze=False)
    colours = {family: f"C{i % 10}" for i, family in enumerate(dict.fromkeys(table["family"]))}
    panels = [(axes[0][0], "delta_loss", "Δloss vs full cache (nats/token)")]
    if has_retrieval:
        panels.append((axes[0][1], "retrieval", "retrieval through the cache: mean score"))
    for ax, column, label in panels:
        first = table[table["policy"] == "first"] if "policy" in table else table
        for _, group in first.groupby(["family", first["ratio"].fillna(-1)], sort=False):
            group = group.sort_values("protect")
            ax.plot(group["bytes_ratio"], group[column], color="grey", lw=0.6, alpha=0.6, zorder=1)
        for r in table.itertuples():
            colour = "black" if r.family == "full" else colours[r.family]
            marker = "*" if r.family == "full" else MARKERS.get(r.family.split("-")[0].removesuffix("_sinkscope"), "o")
            filled = r.protect > 0
            low, high = (r.delta_low, r.delta_high) if column == "delta_loss" else (r.retrieval_low, r.retrieval_high)
            value = getattr(r, column)
            ax.errorbar(r.bytes_ratio, value, fmt="none", ecolor=colour, alpha=0.5, lw=0.8, zorder=2,
                        yerr=[[value - low], [high - value]])
            ax.scatter(r.bytes_ratio, getattr(r, column), marker=marker, s=60 if r.family != "full" else 160,
                       facecolors=colour if filled or r.family == "full" else "none", edgecolors=colour,
                       linewidths=1.4, zorder=3)
            policy = getattr(r, "policy", "first")
            if policy in POLICY_MARKS:  # the same budget, other tokens kept
                ax.scatter(r.bytes_ratio, getattr(r, column), marker=POLICY_MARKS[policy], s=40, color="black",
                           linewidths=1.0, zorder=4)
        if "recommended" in table:  # the cheapest cache within the tolerances (see KV's summary)
            for r in table[table["recommended"]].itertuples():
                ax.scatter(r.bytes_ratio, getattr(r, column), marker="o", s=320, facecolors="none",
                           edgecolors="red", linewidths=1.6, zorder=4, label="recommended")
        ax.set_xscale("log")
        ax.set_xlabel("bytes held / bytes of the full cache (log)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3, which="both")
        if column == "delta_loss":
            ax.set_yscale("symlog", linthresh=0.01)
            ax.axhline(0, color="grey", lw=0.8)
    handles = [plt.Line2D([], [], marker=MARKERS.get(f.split("-")[0].removesuffix("_sinkscope"), "o"), color=c,
                          linestyle="", label=f)
               for f, c in colours.items() if f != "full"]
    handles += [plt.Line2D([], [], marker="o", color="grey", linestyle="", label="protect > 0 (filled)"),
                plt.Line2D([], [], marker="o", color="grey", markerfacecolor="none", linestyle="",
                           label="protect = 0 (hollow)"),
                plt.Line2D([], [], marker="*", color="black", linestyle="", markersize=10, label="full cache"),
                *[plt.Line2D([], [], marker=m, color="black", linestyle="", label=f"protect: the k {p} tokens")
                  for p, m in POLICY_MARKS.items() if "policy" in table and (table["policy"] == p).any()],
                plt.Line2D([], [], marker="o", color="red", markerfacecolor="none", linestyle="", markersize=12,
                           label="recommended (cheapest within tolerance)")]
    axes[0][-1].legend(handles=handles, fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    summary = result.summary
    fig.suptitle(f"{result.provenance['model']['name']}: KV-cache compression, quality against memory\n"
                 f"({summary['context']}-token prefill; {summary['n_windows']} windows; "
                 f"{summary.get('n_retrieval_prompts', 0)} retrieval prompts: {', '.join(summary.get('tasks', []))}; "
                 "bars: 95% intervals over windows and prompts)", fontsize=10)
    return {"kv_pareto": fig}

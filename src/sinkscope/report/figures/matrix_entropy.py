"""Figure of `matrix_entropy`: entropy of the residual stream per depth, the position-0 norm and the sink
rate of the layer ending at each depth, one line per `<bos>` condition."""

from __future__ import annotations

from typing import Any

from . import figure_for, pyplot

plt = pyplot()


@figure_for("matrix_entropy")
def matrix_entropy_figures(result: Any) -> dict[str, Any]:
    per_depth = result.tables["per_depth"]
    summary = result.summary
    fig, (left, middle, right) = plt.subplots(1, 3, figsize=(14, 4), constrained_layout=True)
    for bos, rows in per_depth.groupby("bos", sort=False):
        rows = rows.sort_values("depth")
        line = left.plot(rows["depth"], rows["entropy"], marker="o", ms=3, label=f"bos={bos}")[0]
        left.fill_between(rows["depth"], rows["entropy_low"], rows["entropy_high"], color=line.get_color(), alpha=0.2)
        left.plot(rows["depth"], rows["entropy_without_first"], ls=":", color=line.get_color(),
                  label=f"bos={bos}, position 0 left out")
        if "entropy_centred" in rows:
            left.plot(rows["depth"], rows["entropy_centred"], ls="--", color=line.get_color(),
                      label=f"bos={bos}, tokens centred")
        style = {"marker": "o", "ms": 3, "color": line.get_color(), "label": f"bos={bos}"}
        middle.plot(rows["depth"], rows["first_norm_ratio"], **style)
        layers = rows.dropna(subset=["sink_rate"])
        right.plot(layers["depth"], layers["sink_rate"], **style)
    left.set_ylabel("matrix entropy (nats; band: 95% over prompts)")
    middle.set_ylabel("||h(position 0)|| / median ||h(other tokens)||")
    middle.set_yscale("log")
    right.set_ylabel(f"sink rate of layer depth-1 (alpha > {summary['eps']})")
    for ax in (left, middle, right):
        ax.set_xlabel("depth (0 = embeddings)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"{summary['model']}: residual-stream matrix entropy, position-0 norm and sink rate by depth "
                 f"({summary['n_prompts']} prompts, <= {summary['max_tokens']} tokens)", fontsize=10)
    return {"matrix_entropy": fig}

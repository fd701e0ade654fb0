"""Figures of `keys`: the attention every position receives, and the tokens that act as sinks besides
position 0."""

from __future__ import annotations

from typing import Any

import numpy as np

from . import figure_for, pyplot

plt = pyplot()
TOP_KEYS = 15


@figure_for("keys")
def keys_figures(result: Any) -> dict[str, Any]:
    """Left: mean alpha_k over layers x heads per position (log scale; position 0 marked). Right: the keys
    after position 0 that receive the most attention, labelled by token and position."""
    summary = result.summary
    positions = result.tables["positions"]
    strongest = result.tables["sink_positions"]
    strongest = strongest[(strongest["position"] > 0) & (strongest["n_queries_min"] >= summary["min_queries"])]
    strongest = strongest.head(TOP_KEYS)
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.2), constrained_layout=True,
                                      gridspec_kw={"width_ratios": [1.6, 1]})
    alpha = positions["alpha_mean"].to_numpy(dtype=float)
    left.scatter(positions["position"], np.clip(alpha, 1e-6, None), s=3, color="tab:blue", alpha=0.6,
                 label="mean over sequences x layers x heads")
    left.scatter([0], [max(alpha[0], 1e-6)], s=40, color="tab:red", label="position 0")
    left.axhline(summary["eps"], color="grey", lw=0.8, ls="--", label=f"eps = {summary['eps']}")
    left.set_yscale("log")
    left.set_xlabel("key position")
    left.set_ylabel("alpha_k (mean attention received)")
    left.legend(fontsize=8, loc="upper right")
    left.set_title(f"{summary['model']}, bos={summary['bos']}: attention received per key", fontsize=9)
    if len(strongest):
        several = summary["n_sequences"] > 1
        labels = [f"{r.token!r} @{r.position}" + (f" (seq {r.sequence})" if several else "") +
                  f", sink in {r.n_sink_heads} heads" for r in strongest.itertuples()]
        right.barh(range(len(strongest)), strongest["alpha_mean"], color="tab:orange")
        right.set_yticks(range(len(strongest)), labels, fontsize=7)
        right.invert_yaxis()
    right.set_xlabel("alpha_k, mean over layers x heads")
    right.set_title(f"strongest keys after position 0 (>= {summary['min_queries']} queries)", fontsize=9)
    return {"keys": fig}

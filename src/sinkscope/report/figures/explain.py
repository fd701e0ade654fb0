"""Figures of the experiments that explain the sink (registered per experiment with `figure_for`)."""

from __future__ import annotations

from typing import Any

import numpy as np
from matplotlib.figure import Figure

from . import pyplot

plt = pyplot()


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


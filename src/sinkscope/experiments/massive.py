"""`massive`: massive activations (Sun et al. 2024) in the residual stream, with and without `<bos>`.

Per prompt, condition and residual depth (0 = embeddings, d = output of layer d-1, the last before the
final norm): max |h| / median |h| over all (token, dim) entries, how many entries exceed 100x and 1000x
the median, and the top-k coordinates (token, dim, value). Massive activations sit on the first token
and on delimiters at fixed dims; comparing `<bos>` conditions shows whether they follow `<bos>` or
position 0.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from ..errors import InputError
from ..metrics import activations as activation_metrics
from .base import Context, Result
from .functions import experiment_function
from .inputs import (
    Encoded,
    token_strings,
)
from .residual import DEPTH_CONVENTION, ResidualPromptExperiment, first_token_counts
from .settings import Command, setting

FACTORS = activation_metrics.MASSIVE_FACTORS


class MassiveActivationsResult(Result):
    """Tables ``massive`` (one row per prompt x bos x depth) and ``top_activations`` (top-k coordinates)."""


    def ratio_by_depth(self, bos: str, how: str = "median") -> np.ndarray:
        """max/median ratio per depth [layers + 1] over prompts (``how``: median, mean, min or max)."""
        rows = self.tables["massive"]
        rows = rows[rows["bos"] == bos]
        if rows.empty:
            raise InputError(f"no rows for bos={bos!r}")
        return rows.groupby("depth")["ratio"].agg(how).sort_index().to_numpy(dtype=np.float64)


@dataclass
class MassiveActivations(ResidualPromptExperiment[MassiveActivationsResult]):
    """Massive-activation statistics of every prompt's residual stream at every depth, per `<bos>` condition."""

    name = "massive"
    command = Command(
        "massive", "explain",
        "Massive activations (Sun et al.): max |h| / median |h| per depth and where the largest entries sit.",
        inputs="prompts")
    whereabouts_rides = True

    top_k: int = setting(4, "top coordinates kept per prompt and depth")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.top_k < 1:
            raise InputError("top_k must be at least 1")

    def rows(self, ctx: Context, residual: np.ndarray, unit: Encoded, row: int) -> dict[str, pd.DataFrame]:
        n_depths = residual.shape[0]
        tokens = token_strings(ctx.tokenizer, unit.ids)
        stats = activation_metrics.activation_stats(residual, FACTORS)
        token_index, dim, value = activation_metrics.top_activations(residual, self.top_k)  # [depths, k]
        k = token_index.shape[1]
        prompt = self.prompts[unit.prompt]
        common = {"prompt": unit.prompt, "prompt_id": prompt.id, "domain": prompt.domain, "bos": unit.bos}
        depths = pd.DataFrame({
            **common, "first_token": tokens[0], "n_tokens": len(unit), "depth": np.arange(n_depths),
            "max_abs": stats["max_abs"], "median_abs": stats["median_abs"], "ratio": stats["ratio"],
            **{f"n_above_{f}x": stats[f"n_above_{f}x"] for f in FACTORS},
            **{f"massive_{f}x": stats[f"n_above_{f}x"] > 0 for f in FACTORS},
            "top_token_index": token_index[:, 0], "top_token": [tokens[t] for t in token_index[:, 0]],
            "top_dim": dim[:, 0], "top_value": value[:, 0],
        })
        with np.errstate(invalid="ignore", divide="ignore"):
            ratio_to_median = np.abs(value) / stats["median_abs"][:, None]
        top = pd.DataFrame({
            **common, "depth": np.repeat(np.arange(n_depths), k), "rank": np.tile(np.arange(k), n_depths),
            "token_index": token_index.reshape(-1), "token": [tokens[t] for t in token_index.reshape(-1)],
            "dim": dim.reshape(-1), "value": value.reshape(-1), "ratio_to_median": ratio_to_median.reshape(-1),
        })
        return {"massive": depths, "top_activations": top}

    def summarise(self, ctx: Context, tables: dict[str, pd.DataFrame]) -> dict[str, Any]:
        loaded = ctx.loaded
        massive = tables["massive"]
        per_condition: dict[str, Any] = {}
        for condition in self.bos:
            rows = massive[massive["bos"] == condition]
            peak = rows.loc[rows["ratio"].idxmax()]
            flagged = rows[rows[f"massive_{FACTORS[0]}x"]]
            per_depth = rows.groupby("depth")["ratio"]
            per_condition[condition] = {
                "max_ratio": float(peak["ratio"]),
                "max_ratio_at": {"prompt_id": str(peak["prompt_id"]), "depth": int(peak["depth"]),
                                 "token_index": int(peak["top_token_index"]), "token": str(peak["top_token"]),
                                 "dim": int(peak["top_dim"]), "value": float(peak["top_value"])},
                "peak_depth_by_median": int(per_depth.median().idxmax()),
                "ratio_by_depth_median": per_depth.median().tolist(),
                "ratio_by_depth_mean": per_depth.mean().tolist(),
                **{f"share_{f}x": float(rows[f"massive_{f}x"].mean()) for f in FACTORS},
                # where the top-1 coordinate sits in the flagged (> 100x median) states
                "flagged_top1_at_position0": float((flagged["top_token_index"] == 0).mean()) if len(flagged) else None,
                "flagged_top1_dims": {str(k): int(v) for k, v in Counter(flagged["top_dim"]).most_common(5)},
                "flagged_top1_tokens": {str(k): int(v) for k, v in Counter(flagged["top_token"]).most_common(5)},
            }
        return {
            "model": loaded.info.name, "bos": list(self.bos), "n_prompts": int(massive["prompt"].nunique()),
            "n_layers": loaded.info.n_layers, "max_tokens": self.max_tokens, "top_k": self.top_k,
            "factors": list(FACTORS), "depth_convention": DEPTH_CONVENTION, "conditions": per_condition,
            "first_tokens": first_token_counts(massive),
        }


massive_activations = experiment_function(
    MassiveActivations, "massive_activations",
    """Massive-activation statistics of every prompt's residual stream at every depth, per `<bos>` condition.

    ``max_tokens`` counts the whole sequence, prefix included (conditions share the text tokens).""")

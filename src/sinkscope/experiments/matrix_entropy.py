"""`matrix_entropy`: the matrix entropy of the residual stream per depth (the "compression valley" of Skean
et al. 2025), next to the norm of the token at position 0 and the sink rate per layer, with vs without
`<bos>`.

Per prompt, `<bos>` condition and depth (0 = embeddings, d = output of layer d - 1, L = before the final
norm): the von Neumann and collision (order-2) entropies of the trace-normalised Gram matrix of the
sequence's token representations (`metrics.matrix_entropy`; in nats, at most log n), the same without
position 0, the same of the tokens centred on their mean (``entropy_centred``: a direction every token
shares no longer counts), the same of the text tokens' rows alone (``entropy_text``: the same rows under
every condition), the norm of position 0's representation and the median norm of the others. One forward pass
also gives each layer's first-token attention, so the sink rate per layer (share of heads whose alpha
exceeds ``eps``) comes from the same tokens. The table ``per_depth`` puts them side by side: the row of
depth d also holds layer d - 1, the block whose output depth d is (no layer at depth 0).

Tables: ``matrix_entropy`` (prompt x bos x depth), ``sink_rate`` (prompt x bos x layer), ``per_depth``
(bos x depth: means over prompts, with 95% bootstrap intervals over prompts for the entropy).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from ..capture import FirstTokenAttention, Probe
from ..errors import InputError
from ..metrics import sink as sink_metrics
from ..metrics.matrix_entropy import matrix_entropy
from ..metrics.stats import bootstrap_interval, paired_difference_interval
from ..models.loader import LoadedModel
from .base import Context, Result
from .functions import experiment_function
from .inputs import Encoded, token_strings
from .residual import DEPTH_CONVENTION, ResidualPromptExperiment, first_token_counts
from .settings import Command, setting


class MatrixEntropyResult(Result):
    """Tables ``matrix_entropy`` (prompt x bos x depth), ``sink_rate`` (prompt x bos x layer), ``per_depth``."""



@dataclass
class MatrixEntropyContext(Context):
    probe: FirstTokenAttention  # the attention on position 0 in the same forward as the residual stream


@dataclass
class MatrixEntropy(ResidualPromptExperiment[MatrixEntropyResult]):
    """Matrix entropy of the residual stream per depth, the position-0 norm and the sink rate per layer."""

    name = "matrix_entropy"
    command = Command(
        "matrix-entropy", "explain",
        "Matrix entropy of the residual stream per depth (compression valley), <bos> norm, sink rate per "
        "layer.", inputs="prompts")
    whereabouts_rides = True

    eps: float = setting(sink_metrics.DEFAULT_EPS, "a head is a sink when its alpha exceeds this")

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 < self.eps < 1.0:
            raise InputError("--eps must lie strictly between 0 and 1")
        if self.max_tokens is not None and self.max_tokens < 2:
            raise InputError("--max-tokens must be at least 2 (an entropy needs tokens)")

    def prepare(self, loaded: LoadedModel) -> MatrixEntropyContext:
        return MatrixEntropyContext(loaded, self.encoded(loaded), FirstTokenAttention())

    def probes(self, ctx: MatrixEntropyContext) -> list[Probe]:
        return [ctx.probe]

    def rows(self, ctx: MatrixEntropyContext, residual: np.ndarray, unit: Encoded, row: int
             ) -> dict[str, pd.DataFrame]:
        record = ctx.probe.per_prompt(row)  # the same forward's attention on position 0
        alpha = sink_metrics.alpha_from_query_weights(record["attention"].numpy(), record["visible"].numpy())
        return {"matrix_entropy": self._depth_rows(ctx, residual, unit),
                "sink_rate": pd.DataFrame({**self._common(unit), "layer": np.array(ctx.probe.layers()),
                                           "sink_rate": (alpha > self.eps).mean(-1), "alpha_mean": alpha.mean(-1)})}

    def _common(self, unit: Encoded) -> dict[str, Any]:
        prompt = self.prompts[unit.prompt]
        return {"prompt": unit.prompt, "prompt_id": prompt.id, "bos": unit.bos}

    def _depth_rows(self, ctx: Context, residual: np.ndarray, unit: Encoded) -> pd.DataFrame:
        norms = np.linalg.norm(residual, axis=-1)  # [depths, n]
        others = np.median(norms[:, 1:], axis=-1) if residual.shape[1] > 1 else np.full(len(norms), np.nan)
        return pd.DataFrame({
            **self._common(unit), "first_token": token_strings(ctx.tokenizer, unit.ids[:1])[0],
            "n_tokens": len(unit), "depth": np.arange(residual.shape[0]),
            "entropy": matrix_entropy(residual), "renyi2": matrix_entropy(residual, order=2.0),
            "entropy_without_first": matrix_entropy(residual[:, 1:]) if residual.shape[1] > 1 else np.nan,
            "entropy_centred": matrix_entropy(residual, centre=True),
            # like for like: the text tokens' rows only, the same rows under every condition
            "entropy_text": matrix_entropy(residual[:, unit.text_start:unit.text_stop]),
            "max_entropy": np.log(min(residual.shape[1], residual.shape[2])),
            "first_norm": norms[:, 0], "median_norm": others, "first_norm_ratio": norms[:, 0] / others,
        })

    def finalise(self, ctx: Any, tables: dict[str, pd.DataFrame]) -> dict[str, pd.DataFrame]:
        return {**tables, "per_depth": per_depth_table(tables["matrix_entropy"], tables["sink_rate"])}

    def summarise(self, ctx: Context, tables: dict[str, pd.DataFrame]) -> dict[str, Any]:
        loaded = ctx.loaded
        entropy, per_depth = tables["matrix_entropy"], tables["per_depth"]
        conditions: dict[str, Any] = {}
        for condition in self.bos:
            rows = per_depth[per_depth["bos"] == condition].sort_values("depth")
            inner = rows[(rows["depth"] > 0) & (rows["depth"] < rows["depth"].max())]  # the valley lies inside
            valley = inner.loc[inner["entropy"].idxmin()] if len(inner) else rows.loc[rows["entropy"].idxmin()]
            conditions[condition] = {
                "entropy_by_depth": rows["entropy"].tolist(),
                "entropy_without_first_by_depth": rows["entropy_without_first"].tolist(),
                "entropy_centred_by_depth": rows["entropy_centred"].tolist(),
                "first_norm_ratio_by_depth": rows["first_norm_ratio"].tolist(),
                "sink_rate_by_layer": rows["sink_rate"].dropna().tolist(),
                "valley_depth": int(valley["depth"]), "valley_entropy": float(valley["entropy"]),
                "valley_entropy_ci": [float(valley["entropy_low"]), float(valley["entropy_high"])],
                "embedding_entropy": float(rows["entropy"].iloc[0]), "final_entropy": float(rows["entropy"].iloc[-1]),
                "sink_rate": float(tables["sink_rate"].loc[tables["sink_rate"]["bos"] == condition,
                                                           "sink_rate"].mean()),
            }
        return {
            "model": loaded.info.name, "bos": list(self.bos), "n_prompts": int(entropy["prompt"].nunique()),
            "n_layers": loaded.info.n_layers, "max_tokens": self.max_tokens, "eps": self.eps,
            "depth_convention": DEPTH_CONVENTION, "conditions": conditions,
            "entropy_difference": self._difference(entropy), "first_tokens": first_token_counts(entropy),
        }

    def _difference(self, entropy: pd.DataFrame) -> dict[str, Any] | None:
        """Entropy under the first condition minus under the second, per depth, paired over prompts."""
        if len(self.bos) < 2:
            return None
        first, second = self.bos[0], self.bos[1]
        wide = entropy.pivot_table("entropy", ["prompt", "depth"], "bos").reset_index()
        by_depth = []
        for _, rows in wide.groupby("depth"):
            mean, low, high = paired_difference_interval(rows[first].to_numpy(), rows[second].to_numpy())
            by_depth.append({"mean": mean, "ci": [low, high]})
        return {"conditions": [first, second], "by_depth": by_depth}


def per_depth_table(entropy: pd.DataFrame, sink_rate: pd.DataFrame) -> pd.DataFrame:
    """bos x depth: mean entropies and norms over prompts (95% bootstrap interval of the entropy over
    prompts), and the layer ending at that depth (depth - 1) with its mean sink rate and alpha."""
    rows = []
    for (bos, depth), group in entropy.groupby(["bos", "depth"], sort=False):
        mean, low, high = bootstrap_interval(group["entropy"].to_numpy())
        rows.append({"bos": bos, "depth": int(depth), "entropy": mean, "entropy_low": low, "entropy_high": high,
                     "renyi2": group["renyi2"].mean(), "entropy_without_first": group["entropy_without_first"].mean(),
                     "entropy_centred": group["entropy_centred"].mean(),
                     "first_norm": group["first_norm"].mean(), "median_norm": group["median_norm"].mean(),
                     "first_norm_ratio": group["first_norm_ratio"].median()})
    table = pd.DataFrame(rows)
    table["layer"] = (table["depth"] - 1).where(table["depth"] > 0).astype("Int64")
    layers = sink_rate.groupby(["bos", "layer"], sort=False)[["sink_rate", "alpha_mean"]].mean().reset_index()
    layers["layer"] = layers["layer"].astype("Int64")
    return table.merge(layers, on=["bos", "layer"], how="left")


matrix_entropy_by_depth = experiment_function(
    MatrixEntropy, "matrix_entropy_by_depth",
    """Matrix entropy of every prompt's residual stream at every depth (von Neumann and order 2, with and without
    position 0), the position-0 norm, and the sink rate of every layer, per `<bos>` condition. ``texts``:
    strings or Prompts (default: the built-in probe set).""")

"""`noop` (the paper's Fig. 4): is attending to the sink an approximate no-op?

Per prompt x `<bos>` condition x layer x head: the norm of the first token's value vector and its rank
among all tokens, the first token's share of the head's output, and the head's output norm when it
sinks vs when it does not. A sink with a small value vector makes the head an approximate no-op.

``alpha`` is scan's alpha (mean attention on position 0 over the queries that can see it, query 0
included). The per-query statistics (output share, sinking or not, output norms) are taken over the
text-token queries after position 0 that can see position 0: on a sliding-window layer, queries whose
window has left position 0 behind cannot sink and are not counted.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch

from ..capture import FirstTokenAttention, Probe, ValueNorms
from ..metrics import sink as sink_metrics
from ..models.loader import LoadedModel
from .base import Context, Result
from .functions import experiment_function
from .inputs import Encoded, PromptExperiment, check_engine_options
from .settings import Command, setting


class NoopResult(Result):
    """Table ``noop``: one row per prompt x bos x layer x head."""



@dataclass
class NoopContext(Context):
    values: ValueNorms
    first: FirstTokenAttention


@dataclass
class Noop(PromptExperiment[NoopResult]):
    """Value norms and output shares of every head, per prompt and `<bos>` condition."""

    name = "noop"
    command = Command(
        "noop", "explain",
        "Value norms and output shares: is attending to the sink an approximate no-op? (Fig. 4)",
        inputs="prompts", limit=40)
    whereabouts_rides = True

    bos: tuple[str, ...] = ("add",)
    eps: float = setting(0.3, "a query sinks when its attention on position 0 exceeds eps, in (0, 1)")
    path: str = "auto"

    def __post_init__(self) -> None:
        super().__post_init__()
        self.eps = sink_metrics.check_eps(self.eps)
        check_engine_options(self.path, "float32")

    def prepare(self, loaded: LoadedModel) -> NoopContext:
        return NoopContext(loaded, self.encoded(loaded), ValueNorms(), FirstTokenAttention())

    def probes(self, ctx: NoopContext) -> list[Probe]:
        return [ctx.values, ctx.first]

    def engine_options(self) -> dict[str, Any]:
        return {"path": self.path}

    def measure(self, ctx: NoopContext, engine: Any, units: Sequence[Encoded]) -> dict[str, pd.DataFrame]:
        (unit,) = units
        engine.forward(torch.tensor([unit.ids]))
        first = ctx.first.per_prompt(0)
        alpha = sink_metrics.alpha_from_query_weights(first["attention"].numpy(), first["visible"].numpy())  # [L, H]
        visible = np.broadcast_to(first["visible"].numpy(), first["attention"].shape)  # [L, H, T]
        text_queries = np.zeros(len(unit.ids), dtype=bool)
        text_queries[max(1, unit.text_start):unit.text_stop] = True  # text queries other than position 0 itself
        rows = []
        stacked = {layer: i for i, layer in enumerate(ctx.first.layers())}  # row of each layer in `alpha`
        for layer, record in ctx.values.records.items():
            norms = record["value_norm"][0].numpy()  # [H, S]
            attention = record["first_attention"][0].numpy()  # [H, T]
            output = record["output_norm"][0].numpy()
            share = record["first_share"][0].numpy()
            for head in range(norms.shape[0]):
                queries = text_queries & visible[stacked[layer], head]
                sinking = attention[head, queries] > self.eps
                out_q = output[head, queries]
                rows.append({
                    "prompt": unit.prompt, "bos": unit.bos, "layer": layer, "head": head,
                    "alpha": float(alpha[stacked[layer], head]),
                    "first_value_norm": float(norms[head, 0]),
                    "median_value_norm": float(np.median(norms[head, 1:])) if norms.shape[1] > 1 else np.nan,
                    "first_value_rank": int((norms[head] < norms[head, 0]).sum()) + 1,
                    "n_tokens": int(norms.shape[1]),
                    "n_queries": int(queries.sum()),
                    "first_share": float(share[head, queries].mean()) if queries.any() else np.nan,
                    "sinking_fraction": float(sinking.mean()) if queries.any() else np.nan,
                    "output_norm_sinking": float(out_q[sinking].mean()) if sinking.any() else np.nan,
                    "output_norm_other": float(out_q[~sinking].mean()) if (~sinking).any() else np.nan,
                })
        return {"noop": pd.DataFrame(rows)}

    def finalise(self, ctx: Any, tables: dict[str, pd.DataFrame]) -> dict[str, pd.DataFrame]:
        frame = tables["noop"]
        frame["first_value_ratio"] = frame["first_value_norm"] / frame["median_value_norm"]
        return {"noop": frame}

    def summarise(self, ctx: Context, tables: dict[str, pd.DataFrame]) -> dict[str, Any]:
        frame = tables["noop"]
        summary: dict[str, Any] = {"bos": list(dict.fromkeys(frame["bos"])), "eps": self.eps,
                                   "n_prompts": int(frame["prompt"].nunique())}
        for bos_mode, group in frame.groupby("bos", sort=False):
            sink_heads = group[group["alpha"] > self.eps]
            summary[bos_mode] = {
                "first_value_smallest_fraction": float((group["first_value_rank"] == 1).mean()),
                "median_first_value_ratio": float(group["first_value_ratio"].median()),
                "sink_heads_median_first_value_ratio": float(sink_heads["first_value_ratio"].median())
                if len(sink_heads) else None,
                "mean_first_share": float(group["first_share"].mean()),
                "output_norm_sinking": float(group["output_norm_sinking"].mean()),
                "output_norm_other": float(group["output_norm_other"].mean()),
            }
        return summary


noop = experiment_function(
    Noop, "noop",
    """Value norms and output shares per (prompt, bos, layer, head): is the sink an approximate no-op?""")

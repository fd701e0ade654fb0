"""`smoothing` (the paper's Fig. 3): per head, the entropy and max weight of the attention of the text
tokens, with vs without the sink. The paper's observation: without `<bos>`, attention maps become smoother.

One row per prompt x condition x layer x head; every column is a mean over the queries of the text span
(a `<bos>` prefix and a suffix such as an appended `<eos>` are not text). Like for like: with `<bos>` every
query sees one key more than without, which alone shifts the entropy (a uniform head over n + 1 keys has
log(n + 1) nats), so next to the raw ``entropy`` the table has ``entropy_norm`` = entropy / log(keys the
query may attend to) and ``entropy_text``, the entropy of the weights over the text keys alone,
renormalised (the same keys in every condition).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pandas as pd
import torch

from ..capture import AttentionEntropy, Probe
from ..models.loader import LoadedModel
from .base import Context, Result
from .functions import experiment_function
from .inputs import Encoded, PromptExperiment, check_engine_options
from .settings import Command

COLUMNS = ("entropy", "max_weight", "entropy_norm", "entropy_text", "n_keys")


class SmoothingResult(Result):
    """Table ``smoothing``: one row per prompt x bos x layer x head (entropy in nats, max weight)."""



@dataclass
class SmoothingContext(Context):
    probe: AttentionEntropy


@dataclass
class AttentionSmoothing(PromptExperiment[SmoothingResult]):
    """Entropy and max weight of every head's attention over the text-token queries, per `<bos>` condition."""

    name = "smoothing"
    command = Command(
        "smoothing", "explain",
        "Attention entropy and max weight per head, with vs without the sink (Fig. 3).", inputs="prompts", limit=40)
    whereabouts_rides = True

    path: str = "auto"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_engine_options(self.path, "float32")

    def prepare(self, loaded: LoadedModel) -> SmoothingContext:
        return SmoothingContext(loaded, self.encoded(loaded),
                                AttentionEntropy(with_max=True, with_counts=True, text_start=0))

    def probes(self, ctx: SmoothingContext) -> list[Probe]:
        return [ctx.probe]

    def engine_options(self) -> dict[str, Any]:
        return {"path": self.path}

    def measure(self, ctx: SmoothingContext, engine: Any, units: Sequence[Encoded]) -> dict[str, pd.DataFrame]:
        (unit,) = units
        ctx.probe.text_start = unit.text_start  # the keys before the text are left out of entropy_text
        engine.forward(torch.tensor([unit.ids]))
        rows = []
        text = slice(unit.text_start, unit.text_stop)
        for layer, record in ctx.probe.records.items():
            entropy = record["entropy"][0, :, text].double()  # [H, text queries]
            n_keys = record["n_keys"][0, :, text].double().expand_as(entropy)
            normalised = torch.where(n_keys > 1, entropy / n_keys.clamp_min(2).log(), torch.nan)
            columns = {"entropy": entropy, "max_weight": record["max_weight"][0, :, text].double(),
                       "entropy_norm": normalised, "entropy_text": record["entropy_text"][0, :, text].double(),
                       "n_keys": n_keys}
            means = {name: values.nanmean(-1).numpy() for name, values in columns.items()}
            for head in range(entropy.shape[0]):
                rows.append((unit.prompt, unit.bos, layer, head, *(float(means[c][head]) for c in COLUMNS)))
        return {"smoothing": pd.DataFrame(rows, columns=["prompt", "bos", "layer", "head", *COLUMNS])}

    def summarise(self, ctx: Context, tables: dict[str, pd.DataFrame]) -> dict[str, Any]:
        frame = tables["smoothing"]
        per_condition = frame.groupby("bos", sort=False)[list(COLUMNS)].mean()
        return {
            "bos": list(per_condition.index),
            "mean_entropy": per_condition["entropy"].to_dict(),
            "mean_max_weight": per_condition["max_weight"].to_dict(),
            # like for like: with <bos> a query sees one key more, which alone lowers no entropy but raises
            # its ceiling; these two do not depend on the key count / on the prefix
            "mean_entropy_norm": per_condition["entropy_norm"].to_dict(),
            "mean_entropy_text": per_condition["entropy_text"].to_dict(),
            "entropy_by_layer": {b: g.groupby("layer")["entropy"].mean().tolist() for b, g in frame.groupby("bos")},
            "n_prompts": int(frame["prompt"].nunique()),
        }


attention_smoothing = experiment_function(
    AttentionSmoothing, "attention_smoothing",
    """Mean attention entropy and max weight per (prompt, bos, layer, head) over the text-token queries.""")

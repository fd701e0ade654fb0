"""`spread`: perturbation spread over many texts (Fig. 2 with independent units), per condition.

`perturb` follows one chosen word swap in one text, as the paper does; its tokens are not independent units.
Here every prompt is one unit: the text token at ``position`` (a fraction of the text span) is swapped for
the text's first token that differs from it (a token of the same text, so nothing out of vocabulary), and
under each condition both sequences run; at every residual depth d,

    S[d] = sum over the text tokens after the swap of ||h_j^(d)(x) - h_j^(d)(x')||_2,

raw (before the final norm, as `perturb`) and after applying the model's final norm to every depth's states
(``S_normed``: the scale the model reads out, so a stream that merely grows is not counted as spreading).
Table ``spread``: prompt x condition x depth. The paper's claim: S(strip) / S(add) > 1.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch

from ..capture import final_norm
from ..errors import InputError
from ..models.loader import LoadedModel
from .base import Context, Result
from .functions import experiment_function
from .inputs import Encoded, PromptExperiment
from .residual import residual_streams
from .settings import Command, setting


class SpreadResult(Result):
    """Table ``spread``: one row per prompt x condition x depth (``S``, ``S_rel``, ``S_normed``)."""



def swap_index(unit: Encoded, position: float) -> int:
    """Where the swap goes: ``position`` of the way into the text span, leaving tokens after it."""
    span = unit.text_stop - unit.text_start
    return unit.text_start + min(max(1, int(span * position)), span - 2)


@dataclass
class SpreadContext(Context):
    norm: Any  # the model's final norm (a module)


@dataclass
class Spread(PromptExperiment[SpreadResult]):
    """Perturbation spread of a one-token swap per prompt, under each condition (see the module docstring)."""

    name = "spread"
    command = Command(
        "spread", "explain",
        "Perturbation spread of a one-token swap in every prompt (Fig. 2 with prompts as independent units).",
        inputs="prompts")

    position: float = setting(0.25, "where the swapped token sits, as a fraction of the text")

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 < self.position < 1.0:
            raise InputError("--position must lie strictly between 0 and 1 (a fraction of the text)")

    def prepare(self, loaded: LoadedModel) -> SpreadContext:
        units = [u for u in self.encoded(loaded) if u.text_stop - u.text_start >= 4]
        if not units:
            raise InputError("spread needs prompts of at least 4 text tokens")
        return SpreadContext(loaded, units, final_norm(loaded.model))

    def measure(self, ctx: SpreadContext, engine: Any, units: Sequence[Encoded]) -> dict[str, pd.DataFrame]:
        (unit,) = units
        j = swap_index(unit, self.position)
        text = unit.ids[unit.text_start:unit.text_stop]
        replacement = next((t for t in text if t != unit.ids[j]), None)
        if replacement is None:
            raise InputError(f"prompt {unit.prompt}: every text token is the same; nothing to swap in")
        swapped = list(unit.ids)
        swapped[j] = replacement
        original, changed = residual_streams(engine, [unit.ids, swapped], [self.label(unit)] * 2)
        after = slice(j + 1, unit.text_stop)
        h, h2 = original[:, after].double(), changed[:, after].double()  # [depths, tokens after, d]
        with torch.inference_mode():
            n, n2 = ctx.norm(original[:, after]).double(), ctx.norm(changed[:, after]).double()
        delta = (h - h2).norm(dim=-1)
        rows = {
            "S": delta.sum(-1), "S_rel": (delta / h.norm(dim=-1).clamp_min(1e-30)).sum(-1),
            "S_normed": (n - n2).norm(dim=-1).sum(-1),
            "before": (original[:, unit.text_start:j].double() - changed[:, unit.text_start:j].double()).abs().amax(
                dim=(-1, -2)) if j > unit.text_start else torch.zeros(h.shape[0], dtype=torch.float64),
        }
        return {"spread": pd.DataFrame({
            "prompt": unit.prompt, "prompt_id": self.prompts[unit.prompt].id, "bos": unit.bos,
            "swap_position": j - unit.text_start, "n_after": unit.text_stop - j - 1,
            "depth": np.arange(h.shape[0]), **{k: v.numpy() for k, v in rows.items()}})}

    def summarise(self, ctx: Context, tables: dict[str, pd.DataFrame]) -> dict[str, Any]:
        loaded = ctx.loaded
        frame = tables["spread"]
        totals = frame.groupby(["bos", "prompt"])[["S", "S_rel", "S_normed"]].sum().groupby("bos").mean()
        summary: dict[str, Any] = {
            "model": loaded.info.name, "bos": list(self.bos), "n_prompts": int(frame["prompt"].nunique()),
            "S_total": totals.to_dict("index"),
            # causality audit: nothing before the swapped token may move
            "max_delta_before_swap": float(frame["before"].max()),
        }
        if {"add", "strip"} <= set(totals.index):
            summary["R_total"] = float(totals.loc["strip", "S"] / totals.loc["add", "S"])
            summary["R_total_normed"] = float(totals.loc["strip", "S_normed"] / totals.loc["add", "S_normed"])
        return summary


spread = experiment_function(
    Spread, "spread",
    """Perturbation spread of a one-token swap in every prompt (default: the built-in probe set), per condition;
    each prompt is one unit (see the module docstring).""")

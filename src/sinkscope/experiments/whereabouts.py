"""Where the sink went: for every prompt experiment, under every condition, the attention on position 0 and
on the first text token, per prompt x layer x head.

`run` adds this table (``whereabouts``) to every experiment whose work units are prompts under a condition
(ids and a text span: scan, keys, smoothing, noop, matrix entropy, massive activations, rank collapse,
conditional heads, perturb, over-squashing), with one extra forward pass per batch under the batch's
condition, and a ``whereabouts`` block to the summary:
per condition, mean α at each place and the sink rate at each (ε = 0.3 and 0.8). Without `<bos>` a model
may move its sink to the first text token instead of losing it (SmolLM2 does); next to every effect, this
says which happened.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch

from ..capture import CaptureEngine, Probe, TextStartAttention
from ..metrics import sink as sink_metrics

WHEREABOUTS_EPS = (0.3, 0.8)
TABLE = "whereabouts"


def measures_prompts(units: Sequence[Any]) -> bool:
    """Whether these work units are prompts under a condition: token ids, a condition and where the text starts
    (`inputs.Encoded`, perturb's and over-squashing's units, ...)."""
    return bool(units) and all(hasattr(u, "text_start") and hasattr(u, "ids") and hasattr(u, "bos")
                               and not str(u.bos).startswith("given") for u in units)  # given ids: no text span


def unit_label(unit: Any) -> str:
    """What identifies a unit apart from its condition and tokens (e.g. ``prompt=3``), for the table."""
    if dataclasses.is_dataclass(unit):
        fields = {f.name: getattr(unit, f.name) for f in dataclasses.fields(unit)}
    else:
        fields = dict(vars(unit))
    kept = {k: v for k, v in fields.items() if isinstance(v, int | float | str) and k not in ("bos", "text_start",
                                                                                              "text_stop")}
    return " ".join(f"{k}={v}" for k, v in kept.items())


def whereabouts_rows(engine: CaptureEngine, units: Sequence[Any]) -> pd.DataFrame:
    """One forward over ``units`` (one condition) with `TextStartAttention`: Gu's α (query 0 of each key
    included) on position 0 and on the first text token, per prompt x layer x head."""
    ids, mask = _right_padded(units)
    probe = TextStartAttention([u.text_start for u in units])
    with engine.probing([probe]):
        engine.forward(ids, mask)
    return _rows(probe, units)


def _right_padded(units: Sequence[Any]) -> tuple[torch.Tensor, torch.Tensor]:
    longest = max(len(u.ids) for u in units)
    ids = torch.zeros(len(units), longest, dtype=torch.long)
    mask = torch.zeros(len(units), longest, dtype=torch.long)
    for row, unit in enumerate(units):
        ids[row, :len(unit.ids)] = torch.tensor(unit.ids, dtype=torch.long)
        mask[row, :len(unit.ids)] = 1
    return ids, mask


def _rows(probe: TextStartAttention, units: Sequence[Any]) -> pd.DataFrame:
    layers = sorted(probe.records)
    frames = []
    for row, unit in enumerate(units):
        n = len(unit.ids)

        def alpha(name: str, row: int = row, n: int = n) -> np.ndarray:
            weights = torch.stack([probe.records[layer][name][row, :, :n] for layer in layers]).numpy()
            visible = torch.stack([probe.records[layer][f"{name}_visible"][row, :, :n] for layer in layers]).numpy()
            return sink_metrics.alpha_from_query_weights(weights, visible, True)  # [L, H]

        first, text = alpha("first"), alpha("text")
        n_layers, n_heads = first.shape
        frames.append(pd.DataFrame({
            "unit": unit.label if isinstance(unit, _Head) else unit_label(unit), "bos": unit.bos,
            "condition": unit.bos,
            "layer": np.repeat(np.array(layers), n_heads), "head": np.tile(np.arange(n_heads), n_layers),
            "text_start": unit.text_start, "alpha_first": first.reshape(-1), "alpha_first_text": text.reshape(-1),
        }))
    return pd.concat(frames, ignore_index=True)


class WhereaboutsRider(Probe):
    """`TextStartAttention` riding on the forward an experiment makes anyway, which saves `whereabouts_rows`'
    own forward. Its records count only when the batch ran exactly one full forward over these units' ids
    (right-padded, as `whereabouts_rows` would run them) with every attention layer seen; otherwise `rows`
    says None and the caller makes the separate forward. Only for experiments whose probes do not edit the
    attention output (the separate forward runs without them)."""

    def __init__(self, units: Sequence[Any]) -> None:
        self.units = list(units)
        self.ids, self.mask = _right_padded(self.units)
        self.inner = TextStartAttention([u.text_start for u in self.units])
        self.forwards = 0
        self.matches = False

    def start(self, batch: Any, engine: CaptureEngine) -> None:
        self.forwards += 1
        ids = batch.input_ids
        self.matches = (ids is not None and tuple(ids.shape) == tuple(self.ids.shape)
                        and torch.equal(batch.attention_mask.long().cpu(), self.mask)
                        and torch.equal((ids.cpu() * self.mask), self.ids))
        if self.matches:
            self.inner.start(batch, engine)

    def on_attention(self, call: Any) -> None:
        if not self.matches:
            return
        if call.query_offset != 0 or call.query.shape[2] != self.ids.shape[1]:  # a decoding step, not a forward
            self.matches = False
            return
        self.inner.on_attention(call)

    def rows(self, n_layers: int) -> pd.DataFrame | None:
        if self.forwards != 1 or not self.matches or len(self.inner.records) != n_layers:
            return None
        return _rows(self.inner, self.units)


HEAD_TOKENS = 64  # text tokens a long prompt's whereabouts are read on (the sink forms at the start)


def whereabouts_of_heads(runner: Any, units: Sequence[Any], labels: Sequence[str] | None = None,
                         head: int = HEAD_TOKENS) -> pd.DataFrame:
    """`whereabouts_rows` on the first ``head`` text tokens of each unit (ids, text_start, bos), for experiments
    whose own forwards do not go through a capture engine (decoding): ``runner`` is the engine they decode
    with (its intervention in force) or the bare model (a plain engine is opened for this forward).
    ``labels``: what identifies each unit in the table (default: its own fields)."""
    names = list(labels) if labels is not None else [unit_label(u) for u in units]
    heads = [_Head(name, u.bos, list(u.ids[:u.text_start + head]), u.text_start) for name, u in zip(names, units,
                                                                                                    strict=True)]
    if isinstance(runner, CaptureEngine):
        return whereabouts_rows(runner, heads)
    with CaptureEngine(runner) as engine:
        return whereabouts_rows(engine, heads)


@dataclasses.dataclass(frozen=True)
class _Head:
    label: str
    bos: str
    ids: list[int]
    text_start: int


def whereabouts_summary(frame: pd.DataFrame) -> dict[str, Any]:
    """Per condition: mean α on position 0 and on the first text token, and the sink rate at each."""
    out: dict[str, Any] = {}
    for condition, rows in frame.groupby("condition", sort=False):
        entry: dict[str, Any] = {"n_units": int(rows["unit"].nunique()),
                                 "text_start": int(rows["text_start"].iloc[0])}
        for place, column in (("first", "alpha_first"), ("first_text", "alpha_first_text")):
            values = rows[column].to_numpy(dtype=np.float64)
            entry[f"alpha_{place}"] = float(np.nanmean(values))
            entry[f"sink_rate_{place}"] = {str(e): float(np.nanmean(values > e)) for e in WHEREABOUTS_EPS}
        out[str(condition)] = entry
    return out

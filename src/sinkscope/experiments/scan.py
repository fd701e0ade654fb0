"""`scan`: how much attention every head puts on the first token, over a set of prompts.

One row per prompt x layer x head. alpha is Gu et al.'s mean attention on position 0 over the queries
that can see it (query 0 included by default); the sink rate at eps is the fraction of rows with
alpha > eps. With ``per_position``, table ``positions`` also holds the attention on position 0 of every
query: one row per prompt x layer x head x query position (NaN where a sliding window no longer holds the
first token), which is what a long context is read by.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import pandas as pd

from ..capture import FirstTokenAttention, Probe
from ..conditions import Position, parse_condition
from ..data import Prompt
from ..errors import InputError
from ..metrics import sink as sink_metrics
from ..metrics.stats import bootstrap_interval
from ..models.loader import LoadedModel
from .base import Context, Experiment, Result
from .functions import experiment_function
from .inputs import (
    Encoded,
    check_engine_options,
    check_token_ids,
    encode_prompts,
    length_batches,
    pad_right,
    require_tokenizer,
    token_strings,
)
from .settings import setting


class ScanResult(Result):
    """Tidy per-(prompt, layer, head) results of a scan (table ``alpha``) and per-layer rates (``per_layer``)."""


    @property
    def frame(self) -> pd.DataFrame:
        return self.tables["alpha"]

    @property
    def meta(self) -> dict[str, Any]:
        settings = self.provenance.get("settings", {})
        return {**self.provenance, "bos": self.summary.get("bos"), "max_tokens": settings.get("max_tokens"),
                "first_k": settings.get("first_k")}

    # -- shapes -----------------------------------------------------------------------------------
    @property
    def n_prompts(self) -> int:
        return int(self.frame["prompt"].nunique())

    @property
    def layers(self) -> list[int]:
        """The measured layers: all of them, except a hybrid model's linear-attention layers (no softmax)."""
        return sorted(int(x) for x in self.frame["layer"].unique())

    @property
    def n_layers(self) -> int:
        """How many layers were measured (the second axis of `alpha`; layer ``layers[i]`` is row i)."""
        return len(self.layers)

    @property
    def n_heads(self) -> int:
        return int(self.frame["head"].max()) + 1

    def _cube(self, column: str) -> np.ndarray:
        ordered = self.frame.sort_values(["prompt", "layer", "head"])
        return ordered[column].to_numpy(dtype=np.float64).reshape(self.n_prompts, self.n_layers, self.n_heads)

    @property
    def alpha(self) -> np.ndarray:
        """[prompts, layers, heads]: mean attention on position 0 (Gu et al.'s alpha_1)."""
        return self._cube("alpha")

    @property
    def first_k_mass(self) -> np.ndarray:
        return self._cube("first_k_mass")

    @property
    def sink_logit_mass(self) -> np.ndarray | None:
        """[prompts, layers, heads] share of attention a learned sink logit takes (gpt-oss); None otherwise."""
        cube = self._cube("sink_logit_mass")
        return None if np.isnan(cube).all() else cube

    @property
    def gate_mean(self) -> np.ndarray | None:
        """[prompts, layers, heads] mean output gate of gated attention (a lab variant, Qwen3-Next); None
        for ungated models."""
        if "gate_mean" not in self.frame:  # runs recorded before the column existed
            return None
        cube = self._cube("gate_mean")
        return None if np.isnan(cube).all() else cube

    @property
    def layer_types(self) -> list[str]:
        per_layer = self.frame.drop_duplicates("layer").sort_values("layer")
        return per_layer["layer_type"].tolist()

    @property
    def first_tokens(self) -> list[dict[str, Any]]:
        rows = self.frame.drop_duplicates("prompt").sort_values("prompt")
        return [
            {"prompt": str(r.prompt_id), "id": int(r.first_token_id), "token": str(r.first_token)}
            for r in rows.itertuples()
        ]

    @property
    def label(self) -> str:
        return f"{self.summary.get('model') or 'model'}  bos={self.summary.get('bos')}"

    # -- metrics ----------------------------------------------------------------------------------
    def sink_rate(self, eps: float = sink_metrics.DEFAULT_EPS) -> float:
        return sink_metrics.sink_rate(self.alpha, eps)

    def sink_rate_by_layer(self, eps: float = sink_metrics.DEFAULT_EPS) -> np.ndarray:
        return sink_metrics.sink_rate_by_layer(self.alpha, eps)

    def alpha_map(self) -> np.ndarray:
        return sink_metrics.alpha_map(self.alpha)


@dataclass
class ScanContext(Context):
    prompts: list[Prompt]  # the prompts the units come from (placeholders for given token ids)
    probe: FirstTokenAttention


@dataclass
class Scan(Experiment[ScanResult]):
    """First-token attention of every head on each prompt under one condition (position 0 + intervention)."""

    name = "scan"
    whereabouts_rides = True
    unit_label = "prompts"

    prompts: list[Prompt] = field(default_factory=list)
    input_ids: list[list[int]] | None = None
    bos: str = "auto"
    max_tokens: int | None = 64
    eps: tuple[float, ...] = (0.3, 0.8)
    batch_size: int = 8
    first_k: int = setting(4, "also report the attention mass on the first k tokens")
    include_self: bool = True
    path: str = "auto"
    chunk_size: int = 1024
    precision: str = "float32"
    per_position: bool = setting(False, "also write the first-token attention of every query position (table "
                                 "positions, a figure)")

    def __post_init__(self) -> None:
        self.eps = tuple(float(e) for e in self.eps)
        if self.input_ids is not None:
            self.input_ids = [[int(t) for t in seq] for seq in self.input_ids]

    def settings(self) -> dict[str, Any]:
        settings = super().settings()
        del settings["prompts"], settings["input_ids"]  # the inputs are fingerprinted by their token ids
        return settings

    def prepare(self, loaded: LoadedModel) -> ScanContext:
        check_engine_options(self.path, self.precision)
        if self.first_k < 1:
            raise InputError("--first-k must be at least 1")
        if self.input_ids is not None:
            given = str(replace(parse_condition(self.bos), position=Position("given")))  # the ids as they are
            units = [Encoded(i, given, [int(t) for t in seq], 0, len(seq)) for i, seq in enumerate(self.input_ids)]
            prompts = [Prompt(f"p{i}", "") for i in range(len(units))]
        else:
            prompts = self.prompts
            require_tokenizer(loaded, "scanning text")
            units = encode_prompts(loaded, self.prompts, [self.bos], self.max_tokens)
        if not units:
            raise InputError("nothing to scan: no prompts")
        check_token_ids(loaded, [u.ids for u in units])
        return ScanContext(loaded, units, prompts, FirstTokenAttention(self.first_k))

    def batches(self, units: Sequence[Encoded]) -> list[list[int]]:
        return length_batches([len(u) for u in units], self.batch_size)

    def probes(self, ctx: ScanContext) -> list[Probe]:
        return [ctx.probe]

    def engine_options(self) -> dict[str, Any]:
        return {"path": self.path, "chunk_size": self.chunk_size, "precision": self.precision}

    def describe(self, units: Sequence[Encoded]) -> str:
        return f"bos={units[0].bos}"

    def measure(self, ctx: ScanContext, engine: Any, units: Sequence[Encoded]) -> dict[str, pd.DataFrame]:
        engine.forward(*pad_right([u.ids for u in units]))
        layer_types = ctx.loaded.info.layer_types
        tables = {"alpha": _rows_for_batch(ctx.probe, units, ctx.prompts, layer_types, ctx.tokenizer,
                                           self.include_self)}
        if self.per_position:
            tables["positions"] = _position_rows(ctx.probe, units, layer_types)
        return tables

    def finalise(self, ctx: Any, tables: dict[str, pd.DataFrame]) -> dict[str, pd.DataFrame]:
        frame = tables["alpha"].sort_values(["prompt", "layer", "head"], ignore_index=True)
        result = ScanResult({"alpha": frame}, {})
        per_layer = pd.DataFrame({"layer": result.layers, "layer_type": result.layer_types})
        for e in self.eps:
            per_layer[f"sink_rate@{e}"] = result.sink_rate_by_layer(e)
        per_layer["alpha_mean"] = result.alpha_map().mean(1)
        finished = {"alpha": frame, "per_layer": per_layer}
        if "positions" in tables:
            finished["positions"] = tables["positions"].sort_values(["prompt", "layer", "head", "position"],
                                                                    ignore_index=True)
        return finished

    def summarise(self, ctx: ScanContext, tables: dict[str, pd.DataFrame]) -> dict[str, Any]:
        result = ScanResult(tables, {})
        alpha, eps = result.alpha, list(self.eps)
        types = np.array(result.layer_types)
        summary: dict[str, Any] = {
            "model": ctx.loaded.info.name,
            "bos": ctx.units[0].bos if self.input_ids is not None else self.bos,
            "n_prompts": result.n_prompts,
            "n_layers": result.n_layers,
            "layers": result.layers,
            "n_heads": result.n_heads,
            "max_tokens": self.max_tokens,
            "eps": eps,
            "sink_rate": {str(e): sink_metrics.sink_rate(alpha, e) for e in eps},
            # 95% bootstrap interval over prompts (each prompt's share of heads above eps is one unit)
            "sink_rate_ci": {str(e): list(bootstrap_interval((alpha > e).mean(axis=(1, 2)))[1:]) for e in eps},
            "sink_rate_by_layer": {str(e): sink_metrics.sink_rate_by_layer(alpha, e).tolist() for e in eps},
            "sink_rate_by_layer_type": {
                str(kind): {str(e): sink_metrics.sink_rate(alpha[:, types == kind], e) for e in eps}
                for kind in sorted(set(types))
            },
            "mean_sink_mass": sink_metrics.mean_sink_mass(alpha),
            "alpha_mean": result.alpha_map().tolist(),
            "first_k": self.first_k,
            "first_k_mass": float(result.first_k_mass.mean()),
            "first_tokens": result.first_tokens,
        }
        gate = result.gate_mean
        if gate is not None:
            summary["gate_mean"] = float(gate.mean())
            summary["gate_mean_map"] = gate.mean(0).tolist()
        learned = result.sink_logit_mass
        if learned is not None:
            summary["learned_sink_mass"] = float(learned.mean())
            summary["learned_sink_mass_map"] = learned.mean(0).tolist()
        return summary


def _position_rows(probe: FirstTokenAttention, units: Sequence[Encoded], layer_types: list[str]) -> pd.DataFrame:
    """Attention on position 0 of every (layer, head, query position); NaN where the query cannot see it."""
    frames = []
    for row, unit in enumerate(units):
        record = probe.per_prompt(row)
        attention = record["attention"].numpy().astype(np.float32)
        visible = np.broadcast_to(record["visible"].numpy(), attention.shape)
        n_layers, n_heads, n = attention.shape
        layers = np.array(probe.layers(), dtype=np.int16)
        frames.append(pd.DataFrame({
            "prompt": np.int32(unit.prompt),
            "layer": np.repeat(layers, n_heads * n),
            "head": np.tile(np.repeat(np.arange(n_heads, dtype=np.int16), n), n_layers),
            "position": np.tile(np.arange(n, dtype=np.int32), n_layers * n_heads),
            "layer_type": pd.Categorical(np.repeat(np.array(layer_types, dtype=object)[layers], n_heads * n)),
            "attention": np.where(visible, attention, np.nan).reshape(-1),
        }))
    return pd.concat(frames, ignore_index=True)


def _rows_for_batch(probe: FirstTokenAttention, units: Sequence[Encoded], prompts: Sequence[Prompt],
                    layer_types: list[str], tokenizer: Any, include_self: bool) -> pd.DataFrame:
    frames = []
    for row, unit in enumerate(units):
        record = probe.per_prompt(row)
        attention, visible = record["attention"].numpy(), record["visible"].numpy()
        n_layers, n_heads, _ = attention.shape
        layers = np.array(probe.layers())
        alpha = sink_metrics.alpha_from_query_weights(attention, visible, include_self)
        first_k = record["first_k"].numpy().mean(-1)
        sink = record["sink_logit"].numpy().mean(-1) if "sink_logit" in record else np.full_like(alpha, np.nan)
        gate = record["gate"].numpy().mean(-1) if "gate" in record else np.full_like(alpha, np.nan)
        first_id = unit.ids[0]
        frames.append(pd.DataFrame({
            "prompt": unit.prompt,
            "prompt_id": prompts[unit.prompt].id,
            "domain": prompts[unit.prompt].domain,
            "layer": np.repeat(layers, n_heads),
            "head": np.tile(np.arange(n_heads), n_layers),
            "layer_type": np.repeat(np.array(layer_types, dtype=object)[layers], n_heads),
            "alpha": alpha.reshape(-1),
            "first_k_mass": first_k.reshape(-1),
            "sink_logit_mass": sink.reshape(-1),
            "gate_mean": gate.reshape(-1),
            "n_visible": np.repeat(np.broadcast_to(visible, attention.shape).sum(-1)[:, 0], n_heads),
            "n_tokens": len(unit.ids),
            "first_token_id": int(first_id),
            "first_token": token_strings(tokenizer, [first_id])[0],
        }))
    return pd.concat(frames, ignore_index=True)


scan = experiment_function(
    Scan, "scan",
    """Measure first-token attention of every head on each prompt.

    ``texts``: strings or `Prompt`s (default: the built-in probe set). ``input_ids``: token ids scanned
    exactly as given (then only an intervention ``bos`` names applies, e.g. ``given+scale:0.5``).
    ``per_position``: also table ``positions``, the attention on position 0 of every query. ``out``: a run
    directory written batch by batch; ``resume`` continues one that was interrupted.
    """, inputs="prompts")

"""Massive activations (Sun et al. 2024) in the residual stream, with and without `<bos>`.

Per prompt, condition and layer (0 = embeddings, l = output of block l, the last before the final norm):
max |h| / median |h| over all (token, dim) entries, how many entries exceed 100x and 1000x the median,
and the top-k coordinates (token, dim, value). Massive activations sit on the first token and on
delimiters at fixed dims; comparing `<bos>` conditions shows whether they follow `<bos>` or position 0.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..capture import CaptureEngine
from ..data import Prompt
from ..errors import InputError
from ..metrics import activations as activation_metrics
from ..models.loader import LoadedModel, load
from .collapse import (
    LAYER_CONVENTION,
    bos_conditions,
    encode_prompts,
    integer_ticks,
    prompt_list,
    pyplot,
    residual_streams,
    save_figure,
    token_strings,
)
from .common import ExperimentResult, progress_bar, provenance

FACTORS = activation_metrics.MASSIVE_FACTORS


class MassiveActivationsResult(ExperimentResult):
    """Tables ``massive`` (one row per prompt x bos x layer) and ``top_activations`` (top-k coordinates)."""

    def ratio_by_layer(self, bos: str, how: str = "median") -> np.ndarray:
        """max/median ratio per layer [layers + 1] over prompts (``how``: median, mean, min or max)."""
        rows = self.tables["massive"]
        rows = rows[rows["bos"] == bos]
        if rows.empty:
            raise InputError(f"no rows for bos={bos!r}")
        return rows.groupby("layer")["ratio"].agg(how).sort_index().to_numpy(dtype=np.float64)

    def plot(self, out: Path) -> list[Path]:
        plt = pyplot()
        fig, ax = plt.subplots(figsize=(7.5, 4), constrained_layout=True)
        colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
        for i, bos in enumerate(self.summary["bos"]):
            layers = np.arange(len(self.ratio_by_layer(bos)))
            color = colors[i % len(colors)]
            ax.fill_between(layers, self.ratio_by_layer(bos, "min"), self.ratio_by_layer(bos, "max"), color=color,
                            alpha=0.15, linewidth=0)
            ax.plot(layers, self.ratio_by_layer(bos), color=color, marker="o", markersize=3,
                    label=f"bos={bos} (median over prompts; band: min-max)")
        for factor in FACTORS:
            ax.axhline(factor, color="grey", linestyle=":", linewidth=1)
            ax.annotate(f"{factor}x", (0, factor), textcoords="offset points", xytext=(2, 2), fontsize=7, color="grey")
        ax.set_yscale("log")
        ax.set_xlabel("layer (0 = embeddings)")
        integer_ticks(ax)
        ax.set_ylabel("max |h| / median |h|")
        ax.set_title(f"massive activations: {self.summary['model']} ({self.summary['n_prompts']} prompts)",
                     fontsize=10)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
        return [save_figure(fig, Path(out) / "massive_activations.png")]


def massive_activations(
    model: LoadedModel | Any,
    texts: Sequence[str | Prompt] | None = None,
    *,
    bos: str | Sequence[str] = ("add", "strip"),
    max_tokens: int | None = 64,
    top_k: int = 4,
    batch_size: int = 8,
    progress: bool = True,
    command: str | None = None,
) -> MassiveActivationsResult:
    """Massive-activation statistics of every prompt's residual stream at every layer, per `<bos>` condition.

    ``max_tokens`` counts the whole sequence, prefix included (conditions share the text tokens).
    """
    if top_k < 1:
        raise InputError("top_k must be at least 1")
    loaded = load(model)
    prompts = prompt_list(texts)
    conditions = bos_conditions(bos)
    sequences = encode_prompts(loaded, prompts, conditions, max_tokens)
    meta = provenance(loaded, command, bos=conditions, max_tokens=max_tokens, top_k=top_k)
    engine = CaptureEngine(loaded)
    layer_frames, top_frames = [], []
    started = time.time()
    with engine, progress_bar("massive", progress) as bar:
        task = bar.add_task("", total=len(prompts) * len(conditions))
        for condition in conditions:
            bar.update(task, description=f"bos={condition}")
            for index, residual in residual_streams(engine, sequences[condition], batch_size):
                layers, top = _rows(residual, sequences[condition][index], prompts[index], index, condition,
                                    top_k, loaded.tokenizer)
                layer_frames.append(layers)
                top_frames.append(top)
                bar.advance(task)
    massive = pd.concat(layer_frames, ignore_index=True)
    top = pd.concat(top_frames, ignore_index=True)
    meta["kernels"] = sorted(engine.kernels_used)
    meta["seconds"] = round(time.time() - started, 3)
    summary = _summary(loaded, massive, top, conditions, max_tokens, top_k)
    return MassiveActivationsResult({"massive": massive, "top_activations": top}, summary, meta)


def _rows(residual: np.ndarray, seq: Sequence[int], prompt: Prompt, index: int, condition: str, top_k: int,
          tokenizer: Any) -> tuple[pd.DataFrame, pd.DataFrame]:
    n_layers = residual.shape[0]
    tokens = token_strings(tokenizer, seq)
    stats = activation_metrics.activation_stats(residual, FACTORS)
    token_index, dim, value = activation_metrics.top_activations(residual, top_k)  # [layers, k]
    k = token_index.shape[1]
    common = {"prompt": index, "prompt_id": prompt.id, "domain": prompt.domain, "bos": condition}
    layers = pd.DataFrame({
        **common, "first_token": tokens[0], "n_tokens": len(seq), "layer": np.arange(n_layers),
        "max_abs": stats["max_abs"], "median_abs": stats["median_abs"], "ratio": stats["ratio"],
        **{f"n_above_{f}x": stats[f"n_above_{f}x"] for f in FACTORS},
        **{f"massive_{f}x": stats[f"n_above_{f}x"] > 0 for f in FACTORS},
        "top_token_index": token_index[:, 0], "top_token": [tokens[t] for t in token_index[:, 0]],
        "top_dim": dim[:, 0], "top_value": value[:, 0],
    })
    with np.errstate(invalid="ignore", divide="ignore"):
        ratio_to_median = np.abs(value) / stats["median_abs"][:, None]
    top = pd.DataFrame({
        **common, "layer": np.repeat(np.arange(n_layers), k), "rank": np.tile(np.arange(k), n_layers),
        "token_index": token_index.reshape(-1), "token": [tokens[t] for t in token_index.reshape(-1)],
        "dim": dim.reshape(-1), "value": value.reshape(-1), "ratio_to_median": ratio_to_median.reshape(-1),
    })
    return layers, top


def _summary(loaded: LoadedModel, massive: pd.DataFrame, top: pd.DataFrame, conditions: list[str],
             max_tokens: int | None, top_k: int) -> dict[str, Any]:
    per_condition: dict[str, Any] = {}
    for condition in conditions:
        rows = massive[massive["bos"] == condition]
        peak = rows.loc[rows["ratio"].idxmax()]
        flagged = rows[rows[f"massive_{FACTORS[0]}x"]]
        per_layer = rows.groupby("layer")["ratio"]
        per_condition[condition] = {
            "max_ratio": float(peak["ratio"]),
            "max_ratio_at": {"prompt_id": str(peak["prompt_id"]), "layer": int(peak["layer"]),
                             "token_index": int(peak["top_token_index"]), "token": str(peak["top_token"]),
                             "dim": int(peak["top_dim"]), "value": float(peak["top_value"])},
            "peak_layer_by_median": int(per_layer.median().idxmax()),
            "ratio_by_layer_median": per_layer.median().tolist(),
            "ratio_by_layer_mean": per_layer.mean().tolist(),
            **{f"share_{f}x": float(rows[f"massive_{f}x"].mean()) for f in FACTORS},
            # where the top-1 coordinate sits in the flagged (> 100x median) states
            "flagged_top1_at_position0": float((flagged["top_token_index"] == 0).mean()) if len(flagged) else None,
            "flagged_top1_dims": {str(k): int(v) for k, v in Counter(flagged["top_dim"]).most_common(5)},
            "flagged_top1_tokens": {str(k): int(v) for k, v in Counter(flagged["top_token"]).most_common(5)},
        }
    firsts = massive.drop_duplicates(["bos", "prompt"])
    return {
        "model": loaded.info.name, "bos": conditions, "n_prompts": int(massive["prompt"].nunique()),
        "n_layers": loaded.info.n_layers, "max_tokens": max_tokens, "top_k": top_k, "factors": list(FACTORS),
        "layer_convention": LAYER_CONVENTION, "conditions": per_condition,
        "first_tokens": {str(b): {str(k): int(v) for k, v in g["first_token"].value_counts().items()}
                         for b, g in firsts.groupby("bos", sort=False)},
    }

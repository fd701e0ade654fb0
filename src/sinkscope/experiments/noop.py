"""Why heads sink (the paper's Section 3): attention smoothing, the no-op mechanism, conditional heads.

- `attention_smoothing` (Fig. 3): per head, entropy and max weight of the attention over the text tokens,
  with vs without the sink. The paper's observation: without `<bos>`, attention maps become smoother.
- `noop` (Fig. 4): per head, the norm of the first token's value vector and its rank among all tokens,
  the first token's share of the head's output, and the head's output norm when it sinks vs when it
  does not. A sink with a small value vector makes the head an approximate no-op.
- `conditional_heads`: heads that sink by default but attend elsewhere after a trigger token (the paper's
  "apostrophe head"), ranked by how much their first-token attention drops after the trigger.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from ..capture import AttentionEntropy, AttentionWeights, CaptureEngine, FirstTokenAttention, ValueNorms
from ..data import probe_set
from ..errors import InputError
from ..models.loader import LoadedModel, load
from .common import ExperimentResult, encode_prompts, progress_bar, provenance

TRIGGER_TEXTS = [
    "I've been well, and I hope that you're doing well too.",
    "She said it's fine, but we don't think they're ready.",
    "The dog's bowl was empty, so it's time we'd fill it.",
    "You'll see that they've left, and we'll follow when it's light.",
    "He isn't sure whether she's coming or if they'd rather stay.",
    "It's the children's garden, and they're proud of what they've grown.",
    "We're late because the bus didn't come and the train wasn't running.",
    "Don't worry: I'm sure it'll work, and you'd know if it couldn't.",
    "The captain's log says they'd sailed north, but it's hard to read.",
    "Let's ask whether you've seen the map that's on Sam's desk.",
    "They'll say it wasn't theirs, though everyone knows it's Alex's.",
    "I'd like to know why the museum's doors aren't open today.",
]


def _texts(texts: Sequence[str] | None, limit: int | None) -> list[str]:
    chosen = [p.text for p in probe_set()] if texts is None else list(texts)
    if limit is not None:
        chosen = chosen[:limit]
    if not chosen:
        raise InputError("no prompts to run")
    return chosen


def _forward(engine: CaptureEngine, ids: list[int]) -> None:
    engine.forward(torch.tensor([ids]))


class SmoothingResult(ExperimentResult):
    def plot(self, out: Path) -> list[Path]:
        from ..report.figures import plot_heatmaps

        frame = self.tables["smoothing"]
        panels = []
        for bos, group in frame.groupby("bos", sort=False):
            panels.append((f"entropy, bos={bos}", group.pivot_table("entropy", "layer", "head").to_numpy()))
        for bos, group in frame.groupby("bos", sort=False):
            panels.append((f"max weight, bos={bos}", group.pivot_table("max_weight", "layer", "head").to_numpy()))
        return [plot_heatmaps(panels, out / "smoothing.png", colorbar="per panel")]


def attention_smoothing(
    model: LoadedModel | Any, texts: Sequence[str] | None = None, *, bos: Sequence[str] = ("add", "strip"),
    max_tokens: int | None = 64, limit: int | None = None, path: str = "auto", progress: bool = True,
    command: str | None = None,
) -> SmoothingResult:
    """Mean attention entropy and max weight per (prompt, bos, layer, head) over the text-token queries."""
    loaded = load(model)
    sequences = encode_prompts(loaded, _texts(texts, limit), bos, max_tokens)
    probe = AttentionEntropy(with_max=True)
    rows = []
    with CaptureEngine(loaded, [probe], path=path) as engine, progress_bar("smoothing", progress) as bar:
        task = bar.add_task("", total=len(sequences))
        for seq in sequences:
            _forward(engine, seq.ids)
            for layer, record in probe.records.items():
                entropy = record["entropy"][0, :, seq.text_start:].mean(-1).numpy()
                maximum = record["max_weight"][0, :, seq.text_start:].mean(-1).numpy()
                for head in range(entropy.shape[0]):
                    rows.append((seq.prompt, seq.bos, layer, head, float(entropy[head]), float(maximum[head])))
            bar.advance(task)
    frame = pd.DataFrame(rows, columns=["prompt", "bos", "layer", "head", "entropy", "max_weight"])
    per_condition = frame.groupby("bos", sort=False)[["entropy", "max_weight"]].mean()
    summary = {
        "bos": list(per_condition.index),
        "mean_entropy": per_condition["entropy"].to_dict(),
        "mean_max_weight": per_condition["max_weight"].to_dict(),
        "entropy_by_layer": {b: g.groupby("layer")["entropy"].mean().tolist() for b, g in frame.groupby("bos")},
        "n_prompts": int(frame["prompt"].nunique()),
    }
    return SmoothingResult({"smoothing": frame}, summary, provenance(loaded, command, experiment="smoothing"))


class NoopResult(ExperimentResult):
    def plot(self, out: Path) -> list[Path]:
        from ..report.figures import plot_noop

        return [plot_noop(self.tables["noop"], out / "noop.png")]


def noop(
    model: LoadedModel | Any, texts: Sequence[str] | None = None, *, bos: Sequence[str] = ("add",),
    max_tokens: int | None = 64, limit: int | None = None, eps: float = 0.3, path: str = "auto",
    progress: bool = True, command: str | None = None,
) -> NoopResult:
    """Value norms and output shares per (prompt, bos, layer, head): is the sink an approximate no-op?"""
    loaded = load(model)
    sequences = encode_prompts(loaded, _texts(texts, limit), bos, max_tokens)
    values, first = ValueNorms(), FirstTokenAttention()
    rows = []
    with CaptureEngine(loaded, [values, first], path=path) as engine, progress_bar("no-op", progress) as bar:
        task = bar.add_task("", total=len(sequences))
        for seq in sequences:
            _forward(engine, seq.ids)
            for layer, record in values.records.items():
                norms = record["value_norm"][0].numpy()  # [H, S]
                attention = record["first_attention"][0].numpy()  # [H, T]
                output = record["output_norm"][0].numpy()
                share = record["first_share"][0].numpy()
                queries = slice(max(1, seq.text_start), None)  # queries other than the first token itself
                for head in range(norms.shape[0]):
                    sinking = attention[head, queries] > eps
                    out_q = output[head, queries]
                    rows.append({
                        "prompt": seq.prompt, "bos": seq.bos, "layer": layer, "head": head,
                        "alpha": float(attention[head].mean()),
                        "first_value_norm": float(norms[head, 0]),
                        "median_value_norm": float(np.median(norms[head, 1:])) if norms.shape[1] > 1 else np.nan,
                        "first_value_rank": int((norms[head] < norms[head, 0]).sum()) + 1,
                        "n_tokens": int(norms.shape[1]),
                        "first_share": float(share[head, queries].mean()),
                        "sinking_fraction": float(sinking.mean()),
                        "output_norm_sinking": float(out_q[sinking].mean()) if sinking.any() else np.nan,
                        "output_norm_other": float(out_q[~sinking].mean()) if (~sinking).any() else np.nan,
                    })
            bar.advance(task)
    frame = pd.DataFrame(rows)
    frame["first_value_ratio"] = frame["first_value_norm"] / frame["median_value_norm"]
    summary: dict[str, Any] = {"bos": list(dict.fromkeys(frame["bos"])), "eps": eps,
                               "n_prompts": int(frame["prompt"].nunique())}
    for bos_mode, group in frame.groupby("bos", sort=False):
        sink_heads = group[group["alpha"] > eps]
        summary[bos_mode] = {
            "first_value_smallest_fraction": float((group["first_value_rank"] == 1).mean()),
            "median_first_value_ratio": float(group["first_value_ratio"].median()),
            "sink_heads_median_first_value_ratio": float(sink_heads["first_value_ratio"].median())
            if len(sink_heads) else None,
            "mean_first_share": float(group["first_share"].mean()),
            "output_norm_sinking": float(group["output_norm_sinking"].mean()),
            "output_norm_other": float(group["output_norm_other"].mean()),
        }
    return NoopResult({"noop": frame}, summary, provenance(loaded, command, experiment="noop"))


class ConditionalResult(ExperimentResult):
    def plot(self, out: Path) -> list[Path]:
        from ..report.figures import plot_heatmaps

        frame = self.tables["conditional_heads"]
        panels = [(title, frame.pivot_table(column, "layer", "head").to_numpy()) for title, column in (
            ("alpha, other queries", "alpha_other"), ("alpha, after trigger", "alpha_trigger"),
            ("drop (other - trigger)", "drop"))]
        return [plot_heatmaps(panels, out / "conditional_heads.png", colorbar="per panel")]


def conditional_heads(
    model: LoadedModel | Any, texts: Sequence[str] | None = None, *, trigger: str = "'", bos: str = "add",
    max_tokens: int | None = 256, progress: bool = True, command: str | None = None,
) -> ConditionalResult:
    """Rank heads by how much their first-token attention drops for queries right after a trigger token.

    A query "follows the trigger" when the token before it contains ``trigger`` (decoded text). Uses the
    eager kernel (these texts are short) to also report how much such queries attend to the trigger token.
    """
    loaded = load(model)
    texts = list(TRIGGER_TEXTS if texts is None else texts)
    sequences = encode_prompts(loaded, texts, [bos], max_tokens)
    tokenizer = loaded.tokenizer
    probe = AttentionWeights()
    on_first, on_trigger_token, at_trigger = [], [], []
    with CaptureEngine(loaded, [probe], path="eager") as engine, progress_bar("conditional", progress) as bar:
        task = bar.add_task("", total=len(sequences))
        for seq in sequences:
            _forward(engine, seq.ids)
            weights = probe.stacked()[:, 0].numpy()  # [L, H, T, T]
            pieces = [tokenizer.decode([t]) for t in seq.ids]
            follows = np.array([i > max(0, seq.text_start) and trigger in pieces[i - 1] for i in range(len(seq.ids))])
            follows[: max(1, seq.text_start)] = False
            on_first.append(weights[..., 0])
            previous = np.zeros(weights.shape[:3])
            previous[..., 1:] = np.stack([weights[..., i, i - 1] for i in range(1, weights.shape[2])], -1)
            on_trigger_token.append(previous)
            at_trigger.append(follows)
            bar.advance(task)
    first = np.concatenate([a[..., max(1, s.text_start):] for a, s in zip(on_first, sequences, strict=True)], -1)
    prev = np.concatenate([a[..., max(1, s.text_start):] for a, s in zip(on_trigger_token, sequences, strict=True)],
                          -1)
    mask = np.concatenate([f[max(1, s.text_start):] for f, s in zip(at_trigger, sequences, strict=True)])
    if not mask.any():
        raise InputError(f"no query follows a token containing {trigger!r} in these texts")
    n_layers, n_heads = first.shape[:2]
    frame = pd.DataFrame({
        "layer": np.repeat(np.arange(n_layers), n_heads),
        "head": np.tile(np.arange(n_heads), n_layers),
        "alpha_other": first[..., ~mask].mean(-1).reshape(-1),
        "alpha_trigger": first[..., mask].mean(-1).reshape(-1),
        "previous_token_attention_trigger": prev[..., mask].mean(-1).reshape(-1),
        "previous_token_attention_other": prev[..., ~mask].mean(-1).reshape(-1),
    })
    frame["drop"] = frame["alpha_other"] - frame["alpha_trigger"]
    frame = frame.sort_values("drop", ascending=False, ignore_index=True)
    frame.insert(0, "rank", np.arange(1, len(frame) + 1))
    top = frame.iloc[0]
    summary = {
        "trigger": trigger, "bos": bos, "n_texts": len(texts), "n_trigger_queries": int(mask.sum()),
        "n_other_queries": int((~mask).sum()),
        "top_head": {"layer": int(top["layer"]), "head": int(top["head"]), "alpha_other": float(top["alpha_other"]),
                     "alpha_trigger": float(top["alpha_trigger"]), "drop": float(top["drop"]),
                     "previous_token_attention_trigger": float(top["previous_token_attention_trigger"])},
    }
    return ConditionalResult({"conditional_heads": frame}, summary,
                             provenance(loaded, command, experiment="conditional_heads"))

"""Rank collapse and representational collapse of the residual stream, with and without `<bos>`.

Both read the residual stream from the one capture engine (``engine.forward(..., residual=True)``):
index 0 is the embeddings, index l the output of block l (blocks counted from 1), the last one taken
before the final norm. Column ``layer`` in the tables uses that indexing.

- `rank_collapse`: the four measures of `sinkscope.metrics.collapse` on every prompt's token matrix at
  every layer, with and without the first token (the sink) (Dong et al. 2021; paper notes §3.5).
- `representational_collapse`: distance between the last token's final residual of a sequence of n
  tokens and of the same sequence with its last token repeated, as a function of n (Barbero et al.
  2024; paper notes §3.6).
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from numpy.typing import NDArray

from ..capture import CaptureEngine
from ..data import Prompt, probe_set
from ..errors import InputError, TokenizationError
from ..metrics import collapse as collapse_metrics
from ..models.loader import LoadedModel, load, text_config
from ..models.tokens import encode, parse_bos
from .common import ExperimentResult, encode_conditions, progress_bar, provenance

TOKENS_PER_BATCH = 8192
LAYER_CONVENTION = "0 = embeddings, l = output of block l; the last is taken before the final norm"
REPR_LENGTHS = (8, 16, 32, 64, 128, 256, 512)
FAMILIES = ("repeated", "natural")


# -- shared by the residual-stream experiments ------------------------------------------------------
def prompt_list(texts: Sequence[str | Prompt] | str | None) -> list[Prompt]:
    """Strings or Prompts as Prompts (default: the built-in probe set); an empty list is an error."""
    if texts is None:
        prompts = probe_set()
    else:
        items = [texts] if isinstance(texts, str) else list(texts)
        prompts = [t if isinstance(t, Prompt) else Prompt(f"p{i}", str(t)) for i, t in enumerate(items)]
    if not prompts:
        raise InputError("nothing to measure: no prompts")
    return prompts


def bos_conditions(bos: str | Sequence[str]) -> list[str]:
    """Normalised `<bos>` conditions, each once (raises TokenizationError for an unknown mode)."""
    conditions = [str(parse_bos(mode)) for mode in ([bos] if isinstance(bos, str) else list(bos))]
    if not conditions:
        raise InputError("give at least one <bos> condition")
    if len(set(conditions)) != len(conditions):
        raise InputError("each --bos condition may be given once")
    return conditions


def encode_prompts(loaded: LoadedModel, prompts: Sequence[Prompt], conditions: Sequence[str],
                   max_tokens: int | None) -> dict[str, list[list[int]]]:
    """Token ids of every prompt under every condition: {condition: [ids per prompt]}."""
    sequences: dict[str, list[list[int]]] = {condition: [] for condition in conditions}
    for i, prompt in enumerate(prompts):
        try:
            encoded = encode_conditions(loaded, prompt.text, conditions, max_tokens)
        except TokenizationError as error:
            raise TokenizationError(f"prompt {i} ({prompt.id}): {error}") from error
        for condition in conditions:
            sequences[condition].append(encoded[condition])
    return sequences


def residual_streams(engine: CaptureEngine, sequences: Sequence[Sequence[int]], batch_size: int = 8
                     ) -> Iterator[tuple[int, NDArray[np.float64]]]:
    """(index, residual stream [layers + 1, T, d] as float64) for each sequence, run in right-padded batches."""
    if batch_size < 1:
        raise InputError("batch_size must be at least 1")
    start = 0
    while start < len(sequences):
        stop, longest = start, 0
        while stop < len(sequences) and stop - start < batch_size:
            longest_next = max(longest, len(sequences[stop]))
            if stop > start and longest_next * (stop - start + 1) > TOKENS_PER_BATCH:
                break
            longest, stop = longest_next, stop + 1
        batch = sequences[start:stop]
        ids = torch.zeros(len(batch), longest, dtype=torch.long)
        mask = torch.zeros(len(batch), longest, dtype=torch.long)
        for row, seq in enumerate(batch):
            ids[row, : len(seq)] = torch.tensor(list(seq))
            mask[row, : len(seq)] = 1
        residual = engine.forward(ids, mask, residual=True).residual
        for row, seq in enumerate(batch):
            yield start + row, residual[:, row, : len(seq)].to(torch.float64).cpu().numpy()
        start = stop


def token_strings(tokenizer: Any, ids: Sequence[int]) -> list[str]:
    """Token strings of ids (the ids themselves, as text, without a tokenizer)."""
    if tokenizer is None:
        return [str(i) for i in ids]
    return [str(t) for t in tokenizer.convert_ids_to_tokens([int(i) for i in ids])]


def _first_token_counts(frame: pd.DataFrame) -> dict[str, dict[str, int]]:
    firsts = frame.drop_duplicates(["bos", "prompt"])
    return {str(b): {str(k): int(v) for k, v in group["first_token"].value_counts().items()}
            for b, group in firsts.groupby("bos", sort=False)}


def save_figure(fig: Any, path: Path) -> Path:
    """Write a figure (creating its directory) and close it."""
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def pyplot() -> Any:
    """matplotlib.pyplot on the headless Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def integer_ticks(ax: Any) -> None:
    """Whole-number ticks on the x axis (layers)."""
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


# -- rank collapse -----------------------------------------------------------------------------------
class RankCollapseResult(ExperimentResult):
    """Tables ``rank_collapse`` (one row per prompt x bos x layer x exclude_sink x measure) and
    ``per_layer`` (means over prompts)."""

    def per_layer(self, measure: str, bos: str, exclude_sink: bool = False) -> NDArray[np.float64]:
        """Mean of `measure` over prompts at every layer [layers + 1] for one condition."""
        table = self.tables["per_layer"]
        rows = table[(table["measure"] == measure) & (table["bos"] == bos) & (table["exclude_sink"] == exclude_sink)]
        if rows.empty:
            raise InputError(f"no per-layer values for measure={measure!r}, bos={bos!r}, exclude_sink={exclude_sink}")
        return rows.sort_values("layer")["mean"].to_numpy(dtype=np.float64)

    def plot(self, out: Path) -> list[Path]:
        plt = pyplot()
        table = self.tables["per_layer"]
        fig, axes = plt.subplots(2, 2, figsize=(10, 6.5), constrained_layout=True)
        colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
        for ax, measure in zip(axes.flat, collapse_metrics.RANK_MEASURES, strict=True):
            for i, bos in enumerate(self.summary["bos"]):
                for exclude in self.summary["exclude_sink"]:
                    rows = table[(table["measure"] == measure) & (table["bos"] == bos)
                                 & (table["exclude_sink"] == exclude)].sort_values("layer")
                    label = f"bos={bos}" + (", first token excluded" if exclude else "")
                    ax.plot(rows["layer"], rows["mean"], color=colors[i % len(colors)],
                            linestyle="--" if exclude else "-", marker="o", markersize=2.5, label=label)
            if measure == "effective_rank":
                ax.set_yscale("log")  # the embeddings' rank dwarfs every later layer's
            ax.set_title(measure.replace("_", " "), fontsize=10)
            ax.set_xlabel("layer (0 = embeddings)")
            integer_ticks(ax)
            ax.grid(alpha=0.3)
        axes.flat[0].legend(fontsize=7)
        fig.suptitle(f"rank collapse of the residual stream: {self.summary['model']} "
                     f"({self.summary['n_prompts']} prompts, mean)", fontsize=11)
        return [save_figure(fig, Path(out) / "rank_collapse.png")]


def rank_collapse(
    model: LoadedModel | Any,
    texts: Sequence[str | Prompt] | None = None,
    *,
    bos: str | Sequence[str] = ("add", "strip"),
    max_tokens: int | None = 64,
    exclude_sink: bool | Sequence[bool] = (False, True),
    batch_size: int = 8,
    progress: bool = True,
    command: str | None = None,
) -> RankCollapseResult:
    """Rank-collapse measures of each prompt's residual stream at every layer, per `<bos>` condition.

    ``exclude_sink``: measure with the first token (``False``), without it (``True``), or both.
    ``max_tokens`` counts the whole sequence, prefix included (conditions share the text tokens).
    """
    loaded = load(model)
    prompts = prompt_list(texts)
    conditions = bos_conditions(bos)
    exclusions = [exclude_sink] if isinstance(exclude_sink, bool) else list(dict.fromkeys(map(bool, exclude_sink)))
    if not exclusions:
        raise InputError("exclude_sink must hold True, False or both")
    sequences = encode_prompts(loaded, prompts, conditions, max_tokens)
    meta = provenance(loaded, command, bos=conditions, max_tokens=max_tokens, exclude_sink=exclusions)
    engine = CaptureEngine(loaded)
    frames = []
    started = time.time()
    with engine, progress_bar("rank-collapse", progress) as bar:
        task = bar.add_task("", total=len(prompts) * len(conditions))
        for condition in conditions:
            bar.update(task, description=f"bos={condition}")
            for index, residual in residual_streams(engine, sequences[condition], batch_size):
                seq = sequences[condition][index]
                n_layers = residual.shape[0]
                for exclude in exclusions:
                    if exclude and len(seq) < 2:
                        values = {m: np.full(n_layers, np.nan) for m in collapse_metrics.RANK_MEASURES}
                    else:
                        values = collapse_metrics.rank_collapse_measures(residual, exclude)
                    frames.append(pd.DataFrame({
                        "prompt": index, "prompt_id": prompts[index].id, "domain": prompts[index].domain,
                        "bos": condition, "first_token": token_strings(loaded.tokenizer, seq[:1])[0],
                        "n_tokens": len(seq), "exclude_sink": exclude,
                        "layer": np.tile(np.arange(n_layers), len(values)),
                        "measure": np.repeat(list(values), n_layers),
                        "value": np.concatenate([values[m] for m in values]),
                    }))
                bar.advance(task)
    frame = pd.concat(frames, ignore_index=True).sort_values(
        ["bos", "prompt", "exclude_sink", "measure", "layer"], key=_condition_order(conditions), ignore_index=True)
    per_layer = (frame.groupby(["bos", "exclude_sink", "measure", "layer"], sort=False)["value"]
                 .agg(["mean", "std", "count"]).reset_index())
    meta["kernels"] = sorted(engine.kernels_used)
    meta["seconds"] = round(time.time() - started, 3)
    summary = _rank_summary(loaded, frame, per_layer, conditions, exclusions, max_tokens)
    return RankCollapseResult({"rank_collapse": frame, "per_layer": per_layer}, summary, meta)


def _condition_order(conditions: Sequence[str]) -> Any:
    order = {c: i for i, c in enumerate(conditions)}

    def key(column: pd.Series) -> pd.Series:
        return column.map(order) if column.name == "bos" else column

    return key


def _rank_summary(loaded: LoadedModel, frame: pd.DataFrame, per_layer: pd.DataFrame, conditions: list[str],
                  exclusions: list[bool], max_tokens: int | None) -> dict[str, Any]:
    def key(exclude: bool) -> str:
        return "first_token_excluded" if exclude else "all_tokens"

    by_layer: dict[str, Any] = {}
    final: dict[str, Any] = {}
    for condition in conditions:
        by_layer[condition], final[condition] = {}, {}
        for exclude in exclusions:
            rows = per_layer[(per_layer["bos"] == condition) & (per_layer["exclude_sink"] == exclude)]
            curves = {m: rows[rows["measure"] == m].sort_values("layer")["mean"].tolist()
                      for m in collapse_metrics.RANK_MEASURES}
            by_layer[condition][key(exclude)] = curves
            final[condition][key(exclude)] = {m: values[-1] for m, values in curves.items()}
    return {
        "model": loaded.info.name, "bos": conditions, "n_prompts": int(frame["prompt"].nunique()),
        "n_layers": loaded.info.n_layers, "max_tokens": max_tokens, "exclude_sink": exclusions,
        "measures": list(collapse_metrics.RANK_MEASURES), "layer_convention": LAYER_CONVENTION,
        "final_layer_mean": final, "per_layer_mean": by_layer, "first_tokens": _first_token_counts(frame),
    }


# -- representational collapse -----------------------------------------------------------------------
class ReprCollapseResult(ExperimentResult):
    """Table ``repr_collapse``: one row per family x bos x length n."""

    def plot(self, out: Path) -> list[Path]:
        plt = pyplot()
        table = self.tables["repr_collapse"]
        fig, axes = plt.subplots(1, 3, figsize=(13, 4), constrained_layout=True)
        colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
        styles = ["-", "--", ":", "-."]
        titles = {"l2": "L2 distance", "linf": "L-inf distance", "cosine": "cosine distance"}
        for ax, distance in zip(axes, collapse_metrics.DISTANCES, strict=True):
            for f, family in enumerate(self.summary["families"]):
                for b, bos in enumerate(self.summary["bos"]):
                    rows = table[(table["family"] == family) & (table["bos"] == bos)].sort_values("n")
                    values = rows[distance].to_numpy(dtype=np.float64)
                    values = np.where(values > 0, values, np.nan)  # exact zeros have no place on a log axis
                    ax.plot(rows["n"], values, color=colors[b % len(colors)], linestyle=styles[f % len(styles)],
                            marker="o", markersize=3, label=f"{family}, bos={bos}")
            ax.set_xscale("log", base=2)
            ax.set_xticks(self.summary["lengths"], [str(n) for n in self.summary["lengths"]])
            ax.minorticks_off()
            ax.set_yscale("log")
            ax.set_xlabel("n (text tokens)")
            ax.set_title(titles[distance], fontsize=10)
            ax.grid(alpha=0.3, which="both")
        axes[0].legend(fontsize=7)
        fig.suptitle(f"representational collapse: {self.summary['model']} — last token's final residual, "
                     "sequence vs same sequence with its last token repeated", fontsize=10)
        return [save_figure(fig, Path(out) / "repr_collapse.png")]


def _bos_prefix(tokenizer: Any, text: str, condition: str) -> list[int]:
    """The ids a condition puts before the text tokens (checked: the text tokens themselves are unchanged)."""
    full = encode(tokenizer, text, condition, None)
    body = encode(tokenizer, text, "strip", None)
    if len(full) < len(body) or full[len(full) - len(body):] != body:
        raise InputError(f"--bos {condition}: this tokenizer changes the text tokens (not only a prefix); "
                         "use add, strip or replace:<token>")
    return full[: len(full) - len(body)]


def _family_tokens(tokenizer: Any, family: str, longest: int, repeat_token: str, text: str | None
                   ) -> tuple[str, list[int]]:
    """(the text the tokens come from, the first `longest` text tokens) of one family."""
    if family == "repeated":
        ids = encode(tokenizer, repeat_token, "strip", None)
        if len(ids) != 1:
            raise InputError(f"repeat token {repeat_token!r} is {len(ids)} tokens for this tokenizer; it must be one")
        return repeat_token, ids * longest
    source = text if text is not None else "\n\n".join(p.text for p in probe_set())
    ids = encode(tokenizer, source, "strip", None)
    if len(ids) < longest:
        raise InputError(f"the natural text has {len(ids)} tokens; the longest length asked for is {longest}")
    return source, ids[:longest]


def representational_collapse(
    model: LoadedModel | Any,
    *,
    lengths: int | Sequence[int] = REPR_LENGTHS,
    families: str | Sequence[str] = FAMILIES,
    bos: str | Sequence[str] = ("add", "strip"),
    repeat_token: str = " a",
    text: str | None = None,
    progress: bool = True,
    command: str | None = None,
) -> ReprCollapseResult:
    """Last-token representational collapse as a function of the number of text tokens n.

    For each family, `<bos>` condition and n: the sequence ``prefix + t[:n]`` and the same with
    ``t[n-1]`` appended; the distances (L2, L-inf, cosine) between their last tokens' residual streams at
    the final layer, before the final norm. ``repeated``: t is ``repeat_token`` (one token) n times;
    ``natural``: the first n tokens of ``text`` (default: the probe set's texts joined). n counts text
    tokens only, so every condition holds the same text; each sequence runs alone (no padding).
    """
    loaded = load(model)
    tokenizer = loaded.tokenizer
    if tokenizer is None:
        raise InputError("this model has no tokenizer; load it with tokenizer=...")
    conditions = bos_conditions(bos)
    sizes = sorted({int(n) for n in ([lengths] if isinstance(lengths, int) else lengths)})
    if not sizes or sizes[0] < 1:
        raise InputError("lengths must be positive integers (at least one)")
    families = [families] if isinstance(families, str) else list(families)
    unknown = [f for f in families if f not in FAMILIES]
    if unknown or not families:
        raise InputError(f"unknown families {unknown or '(none given)'} (use {', '.join(FAMILIES)})")
    families = list(dict.fromkeys(families))
    sources = {f: _family_tokens(tokenizer, f, sizes[-1], repeat_token, text) for f in families}
    prefixes = {(f, c): _bos_prefix(tokenizer, sources[f][0], c) for f in families for c in conditions}
    limit = getattr(text_config(loaded.model), "max_position_embeddings", None)
    needed = max(len(p) for p in prefixes.values()) + sizes[-1] + 1
    if limit is not None and needed > int(limit):
        raise InputError(f"the longest sequence ({needed} tokens) exceeds the model's {limit} positions")

    meta = provenance(loaded, command, bos=conditions, lengths=sizes, families=families, repeat_token=repeat_token)
    engine = CaptureEngine(loaded)
    rows = []
    started = time.time()
    with engine, progress_bar("repr-collapse", progress) as bar:
        task = bar.add_task("", total=len(families) * len(conditions) * len(sizes))
        for family in families:
            text_ids = sources[family][1]
            for condition in conditions:
                prefix = prefixes[family, condition]
                for n in sizes:
                    bar.update(task, description=f"{family} bos={condition} n={n}")
                    base = prefix + text_ids[:n]
                    last = {}
                    for name, seq in (("base", base), ("repeated_last", base + [text_ids[n - 1]])):
                        residual = engine.forward(torch.tensor([seq]), residual=True).residual
                        last[name] = residual[-1, 0, -1].to(torch.float64).cpu().numpy()
                    distances = collapse_metrics.vector_distances(last["base"], last["repeated_last"])
                    norm = float(np.linalg.norm(last["base"]))
                    first, final = token_strings(tokenizer, [base[0], base[-1]])
                    rows.append({
                        "family": family, "bos": condition, "n": n, "n_tokens": len(base), "first_token": first,
                        "last_token": final, **{k: float(v) for k, v in distances.items()},
                        "relative_l2": float(distances["l2"]) / norm if norm > 0 else float("nan"),
                        "residual_norm": norm,
                    })
                    bar.advance(task)
    frame = pd.DataFrame(rows)
    meta["kernels"] = sorted(engine.kernels_used)
    meta["seconds"] = round(time.time() - started, 3)
    return ReprCollapseResult({"repr_collapse": frame}, _repr_summary(loaded, frame, families, conditions, sizes,
                                                                      repeat_token), meta)


def loglog_slope(n: Sequence[float], values: Sequence[float]) -> float:
    """Least-squares slope of log(values) against log(n) over the positive values (NaN if fewer than 2)."""
    x, y = np.asarray(n, dtype=np.float64), np.asarray(values, dtype=np.float64)
    keep = (x > 0) & (y > 0) & np.isfinite(y)
    if keep.sum() < 2:
        return float("nan")
    return float(np.polyfit(np.log(x[keep]), np.log(y[keep]), 1)[0])


def _repr_summary(loaded: LoadedModel, frame: pd.DataFrame, families: list[str], conditions: list[str],
                  sizes: list[int], repeat_token: str) -> dict[str, Any]:
    curves: dict[str, Any] = {}
    largest: dict[str, Any] = {}
    for family in families:
        curves[family], largest[family] = {}, {}
        for condition in conditions:
            rows = frame[(frame["family"] == family) & (frame["bos"] == condition)].sort_values("n")
            curve = {c: rows[c].tolist() for c in ("n", *collapse_metrics.DISTANCES, "relative_l2")}
            curve["l2_loglog_slope"] = loglog_slope(curve["n"], curve["l2"])
            curves[family][condition] = curve
            last = rows.iloc[-1]
            largest[family][condition] = {"n": int(last["n"]), "first_token": str(last["first_token"]),
                                          **{c: float(last[c]) for c in (*collapse_metrics.DISTANCES, "relative_l2")}}
    return {
        "model": loaded.info.name, "bos": conditions, "families": families, "lengths": sizes,
        "repeat_token": repeat_token, "distances": list(collapse_metrics.DISTANCES),
        "what": "last token's final-layer residual (before the final norm): sequence vs same + last token repeated",
        "at_largest_n": largest, "curves": curves,
    }

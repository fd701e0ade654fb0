"""`keys`: the attention every key receives (Gu et al.'s alpha_k for every position k, not only the first),
and which tokens act as sinks besides position 0 (delimiters, "\\n", ".").

Definition. For layer l, head h and a key at position k of a sequence,

    alpha_k = (1 / |Q_k|) * sum_{i in Q_k} A_ik,

where A_ik is the attention weight query i puts on key k (as the model computes it: its own mask, sliding
window, soft-cap, learned sink share left out of A) and Q_k is the set of real queries that may attend to k
(i >= k, inside the window on sliding layers; query k itself included, as in Gu et al.). alpha_0 is scan's
alpha. It is computed by `capture.KeyAttention` from the kernel's log-normaliser over query blocks, so
memory stays O(block x n) at any length.

A key is a sink in (layer, head) at eps when alpha_k > eps. Late keys are seen by few queries (the last by
one: itself), so the token and position aggregates use only keys that at least ``min_queries`` queries can
see. Inputs: windows of a long text (default Hamlet) of ``max_tokens`` tokens, prefix included, or prompts.

Tables: ``keys`` (sequence x layer x head x position: alpha, n_queries), ``positions`` (per position over
sequences, layers, heads), ``sink_positions`` (per key of each sequence over layers x heads, strongest
first), ``sink_tokens`` (per token string, positions > 0).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..capture import KeyAttention, Probe
from ..conditions import parse_condition
from ..data import Prompt
from ..data.texts import LongText
from ..errors import InputError
from ..metrics.sink import DEFAULT_EPS
from ..metrics.stats import bootstrap_interval
from ..models.loader import LoadedModel
from .base import Context, Experiment, Result, run, takes_conditions
from .inputs import (
    Encoded,
    check_context,
    check_engine_options,
    encode_prompts,
    first_token_label,
    length_batches,
    long_text,
    pad_right,
    prefix_ids,
    prompt_list,
    require_tokenizer,
    text_windows,
    token_label,
)
from .settings import given_settings, setting

MIN_QUERIES = 32
CONTEXT_ROWS, CONTEXT_BEFORE, CONTEXT_AFTER = 50, 6, 3  # the strongest keys get the text around them


@dataclass
class KeysContext(Context):
    first_token: str  # what position 0 holds, readable
    probe: KeyAttention


class KeysResult(Result):
    """Tables ``keys`` (per key), ``positions`` and ``sink_tokens`` (aggregates)."""



@dataclass
class KeyAttentionExperiment(Experiment[KeysResult]):
    """alpha_k of every key of every sequence, per layer and head, and the tokens that act as sinks."""

    name = "keys"
    whereabouts_rides = True
    unit_label = "sequences"

    text: LongText | str | Path | None = None  # used when no prompts are given
    prompts: list[Prompt] = field(default_factory=list)
    max_tokens: int = setting(4096, "tokens per sequence, <bos> included")
    windows: int = setting(1, "windows of --text (ignored with --prompts)")
    bos: str = "add"
    eps: float = setting(DEFAULT_EPS, "a key is a sink in a head when its alpha_k exceeds this")
    min_queries: int = setting(MIN_QUERIES, "token/position aggregates use keys seen by at least this many queries")
    batch_size: int = 1
    chunk_size: int = setting(512, "queries per block (memory: block x tokens)")
    path: str = "auto"
    precision: str = "float32"

    def __post_init__(self) -> None:
        check_engine_options(self.path, self.precision)
        if self.max_tokens < 2:
            raise InputError("--max-tokens must be at least 2")
        if self.windows < 1:
            raise InputError("--windows must be at least 1")
        if not 0.0 < self.eps < 1.0:
            raise InputError("--eps must lie strictly between 0 and 1")
        if self.min_queries < 1:
            raise InputError("--min-queries must be at least 1")
        if self.chunk_size < 1 or self.batch_size < 1:
            raise InputError("--chunk-size and --batch-size must be at least 1")
        self.bos = str(parse_condition(self.bos))
        if not self.prompts:
            self.text = long_text(self.text)

    def settings(self) -> dict[str, Any]:
        settings = super().settings()
        del settings["prompts"]  # the inputs are fingerprinted by their token ids
        settings["text"] = None if self.prompts else self.source
        return settings

    @property
    def source(self) -> str:
        return "prompts" if self.prompts else str(getattr(self.text, "source", "text"))

    def prepare(self, loaded: LoadedModel) -> KeysContext:
        tokenizer = require_tokenizer(loaded, "keys")
        prefix = prefix_ids(tokenizer, self.bos)
        if self.prompts:
            units = encode_prompts(loaded, self.prompts, [self.bos], self.max_tokens)
        else:
            assert isinstance(self.text, LongText)
            if self.max_tokens <= len(prefix) + 1:
                raise InputError(f"--max-tokens {self.max_tokens} leaves no text after the {len(prefix)}-token prefix")
            pieces = text_windows(tokenizer, self.text.text, self.max_tokens - len(prefix), None, self.windows)
            units = [Encoded(i, self.bos, prefix + ids, len(prefix), len(prefix) + len(ids))
                     for i, (_, ids) in enumerate(pieces)]
        check_context(loaded, [len(u) for u in units], self.max_tokens, "sequence")
        return KeysContext(loaded, units, first_token_label(tokenizer, prefix), KeyAttention(self.chunk_size))

    def batches(self, units: Sequence[Encoded]) -> list[list[int]]:
        return length_batches([len(u) for u in units], self.batch_size)

    def probes(self, ctx: KeysContext) -> list[Probe]:
        return [ctx.probe]

    def engine_options(self) -> dict[str, Any]:
        return {"path": self.path, "chunk_size": self.chunk_size, "precision": self.precision}

    def describe(self, units: Sequence[Encoded]) -> str:
        return f"{len(units[0])} tokens"

    def measure(self, ctx: KeysContext, engine: Any, units: Sequence[Encoded]) -> dict[str, pd.DataFrame]:
        engine.forward(*pad_right([u.ids for u in units]))
        layer_types = ctx.loaded.info.layer_types
        frames = []
        for row, unit in enumerate(units):
            record = ctx.probe.alpha(row)
            alpha, queries = record["alpha"].double().numpy(), record["queries"].numpy()
            n_layers, n_heads, n = alpha.shape
            labels = [token_label(ctx.tokenizer, t) for t in unit.ids]
            frames.append(pd.DataFrame({
                "sequence": unit.prompt,
                "layer": np.repeat(np.arange(n_layers), n_heads * n),
                "head": np.tile(np.repeat(np.arange(n_heads), n), n_layers),
                "layer_type": np.repeat(np.array(layer_types[:n_layers], dtype=object), n_heads * n),
                "position": np.tile(np.arange(n), n_layers * n_heads),
                "token_id": np.tile(np.asarray(unit.ids), n_layers * n_heads),
                "token": np.tile(np.array(labels, dtype=object), n_layers * n_heads),
                "alpha": alpha.reshape(-1),
                "n_queries": queries.reshape(-1),
            }))
        return {"keys": pd.concat(frames, ignore_index=True)}

    def finalise(self, ctx: KeysContext, tables: dict[str, pd.DataFrame]) -> dict[str, pd.DataFrame]:
        keys = tables["keys"]
        return {"keys": keys, "positions": position_table(keys, self.eps),
                "sink_positions": with_context(sink_position_table(keys, self.eps), keys, ctx.tokenizer),
                "sink_tokens": sink_token_table(keys, self.eps, self.min_queries)}

    def summarise(self, ctx: KeysContext, tables: dict[str, pd.DataFrame]) -> dict[str, Any]:
        keys, tokens, units = tables["keys"], tables["sink_tokens"], ctx.units
        first = keys[keys["position"] == 0]
        later = keys[(keys["position"] > 0) & (keys["n_queries"] >= self.min_queries)]
        sinks = later[later["alpha"] > self.eps]
        # the interval resamples keys (sequence, position), each with its share of heads above eps
        per_key = later.assign(sink=later["alpha"] > self.eps).groupby(["sequence", "position"])["sink"].mean()
        rate, low, high = bootstrap_interval(per_key.to_numpy())
        positions = tables["sink_positions"]
        positions = positions[(positions["position"] > 0) & (positions["n_queries_min"] >= self.min_queries)]
        return {
            "model": ctx.loaded.info.name, "bos": self.bos, "first_token": ctx.first_token, "text": self.source,
            "n_sequences": len(units), "n_tokens": [len(u) for u in units], "eps": self.eps,
            "min_queries": self.min_queries, "n_layers": int(keys["layer"].max()) + 1,
            "n_heads": int(keys["head"].max()) + 1,
            "position0": {"alpha_mean": float(first["alpha"].mean()),
                          "sink_rate": float((first["alpha"] > self.eps).mean())},
            "other_keys": {"n_keys": int(len(later)), "alpha_mean": float(later["alpha"].mean()),
                           "sink_rate": rate, "sink_rate_ci": [low, high],
                           "n_sink_entries": int(len(sinks)),
                           "n_sink_positions": int(len(sinks.drop_duplicates(["sequence", "position"])))},
            "top_sink_tokens": [
                {"token": str(r.token), "n_keys": int(r.n_keys), "n_sink_keys": int(r.n_sink_keys),
                 "alpha_mean": float(r.alpha_mean),
                 "sink_rate": float(r.sink_rate), "alpha_max": float(r.alpha_max)}
                for r in tokens.head(10).itertuples()],
            "top_sink_positions": [
                {"sequence": int(r.sequence), "position": int(r.position), "token": str(r.token),
                 "alpha_mean": float(r.alpha_mean), "n_sink_heads": int(r.n_sink_heads), "context": str(r.context)}
                for r in positions.head(10).itertuples()],
        }


def position_table(keys: pd.DataFrame, eps: float) -> pd.DataFrame:
    """Per position: mean alpha over sequences x layers x heads, the share of them above eps, the queries."""
    grouped = keys.assign(sink=keys["alpha"] > eps).groupby("position")
    return pd.DataFrame({"alpha_mean": grouped["alpha"].mean(), "sink_rate": grouped["sink"].mean(),
                         "n_queries_mean": grouped["n_queries"].mean()}).reset_index()


def sink_position_table(keys: pd.DataFrame, eps: float) -> pd.DataFrame:
    """Per key (sequence, position, token): mean alpha over layers x heads, in how many (layer, head) it is a
    sink (alpha > eps), and the fewest queries that see it in any layer. Strongest (mean alpha) first."""
    grouped = keys.assign(sink=keys["alpha"] > eps).groupby(["sequence", "position", "token"])
    table = pd.DataFrame({"alpha_mean": grouped["alpha"].mean(), "n_sink_heads": grouped["sink"].sum(),
                          "n_queries_min": grouped["n_queries"].min()}).reset_index()
    return table.sort_values("alpha_mean", ascending=False, ignore_index=True)


def with_context(table: pd.DataFrame, keys: pd.DataFrame, tokenizer: Any, rows: int = CONTEXT_ROWS) -> pd.DataFrame:
    """``table`` (a row per sequence and position) with a ``context`` column for its first ``rows`` rows: the
    text of the tokens around the key (``CONTEXT_BEFORE`` before it, ``CONTEXT_AFTER`` after, the key in
    brackets), to read what a secondary sink is."""
    ids = keys[(keys["layer"] == 0) & (keys["head"] == 0)].set_index(["sequence", "position"])["token_id"]
    contexts = []
    for r in table.head(rows).itertuples():
        sequence = ids.loc[r.sequence]

        def text(lo: int, hi: int, sequence: pd.Series = sequence) -> str:
            return str(tokenizer.decode([int(sequence[p]) for p in range(lo, hi) if p in sequence.index]))

        contexts.append((text(r.position - CONTEXT_BEFORE, r.position) + "[" + text(r.position, r.position + 1)
                         + "]" + text(r.position + 1, r.position + 1 + CONTEXT_AFTER)).replace("\n", "\\n"))
    return table.assign(context=contexts + [""] * (len(table) - len(contexts)))


def sink_token_table(keys: pd.DataFrame, eps: float, min_queries: int) -> pd.DataFrame:
    """Per token string, over its keys at positions > 0 seen by at least ``min_queries`` queries: how many
    keys (occurrences) it has, mean and max alpha over them x layers x heads, the share above eps (its sink
    rate), how many of its keys are a sink in at least one head, and the (layer, head) where its mean alpha is
    highest. Sorted by sink rate, then mean alpha."""
    eligible = keys[(keys["position"] > 0) & (keys["n_queries"] >= min_queries)]
    columns = ["token", "n_keys", "n_sink_keys", "alpha_mean", "alpha_max", "sink_rate", "top_layer", "top_head",
               "top_alpha"]
    if eligible.empty:
        return pd.DataFrame(columns=columns)
    eligible = eligible.assign(sink=eligible["alpha"] > eps)
    grouped = eligible.groupby("token")
    table = pd.DataFrame({
        "n_keys": eligible.drop_duplicates(["sequence", "position"]).groupby("token").size(),
        "n_sink_keys": eligible[eligible["sink"]].drop_duplicates(["sequence", "position"]).groupby("token").size(),
        "alpha_mean": grouped["alpha"].mean(), "alpha_max": grouped["alpha"].max(),
        "sink_rate": grouped["sink"].mean(),
    })
    per_head = eligible.groupby(["token", "layer", "head"])["alpha"].mean().reset_index()
    best = per_head.loc[per_head.groupby("token")["alpha"].idxmax()].set_index("token")
    table["top_layer"], table["top_head"], table["top_alpha"] = best["layer"], best["head"], best["alpha"]
    table["n_sink_keys"] = table["n_sink_keys"].fillna(0).astype(int)
    table = table.reset_index().sort_values(["sink_rate", "alpha_mean"], ascending=False, ignore_index=True)
    return table[columns]


@takes_conditions
def keys(model: LoadedModel | Any, text: str | Path | LongText | None = None, *,
         prompts: Sequence[str | Prompt] | None = None, bos: str = "add", out: str | Path | None = None,
         resume: bool = False, progress: bool | Any = True, command: str | None = None,
         **settings: Any) -> KeysResult:
    """Gu et al.'s alpha_k for every key of ``windows`` windows of ``max_tokens`` tokens of a long text
    (default Hamlet; a string, a LongText or a UTF-8 file), or of ``prompts``; per layer and head, in
    O(chunk_size x n) memory; and which tokens besides position 0 act as sinks (alpha_k > eps). ``settings``:
    any field of `KeyAttentionExperiment` (``max_tokens``, ``windows``, ``eps``, ``min_queries``,
    ``batch_size``, ``chunk_size``, ``path``, ``precision``)."""
    experiment = KeyAttentionExperiment(
        text=None if prompts is not None else text, prompts=[] if prompts is None else prompt_list(prompts),
        bos=bos, **given_settings(KeyAttentionExperiment, settings))
    return run(experiment, model, out=out, resume=resume, progress=progress, command=command)

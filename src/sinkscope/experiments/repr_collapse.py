"""`repr_collapse`: representational collapse of the last token as the sequence grows, with and without
`<bos>` (Barbero et al. 2024; paper notes §3.6).

For each family, `<bos>` condition and n (one trial each): the sequence ``prefix + t[:n]`` and the same
with ``t[n-1]`` appended; the distances (L2, L-inf, cosine) between their last tokens' residual streams at
the last depth (the last layer's output, before the final norm). ``repeated``: t is one token repeated;
``natural``: the first n tokens of a text. n counts text tokens only, so every condition holds the same
text; the prefix is what the condition puts before the text (found by alignment: a suffix the tokenizer
appends, such as `<eos>`, is not used). Each sequence runs alone (no padding).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch

from ..data import probe_set
from ..errors import InputError
from ..metrics import collapse as collapse_metrics
from ..models.loader import LoadedModel
from ..models.tokens import encode
from .base import Context, Experiment, Result
from .functions import experiment_function
from .inputs import bos_conditions, check_length, prefix_ids, require_tokenizer, token_strings
from .residual import residual_streams
from .settings import Command, setting

REPR_LENGTHS = (8, 16, 32, 64, 128, 256, 512)
FAMILIES = ("repeated", "natural")


class ReprCollapseResult(Result):
    """Table ``repr_collapse``: one row per family x bos x length n."""



@dataclass(frozen=True)
class Trial:
    """One (family, condition, n): the sequence and the token appended to it."""

    family: str
    bos: str
    n: int
    ids: list[int]
    repeated: int
    source: str = ""  # the repeated token (family ``repeated``; "" for ``natural``)


@dataclass
class ReprCollapse(Experiment[ReprCollapseResult]):
    """Last-token distance between a sequence and the same with its last token repeated, by length n."""

    name = "repr_collapse"
    command = Command(
        "repr-collapse", "explain",
        "Representational collapse: last-token distance between a sequence and the same with its last token "
        "repeated.")
    unit_label = "lengths"

    lengths: tuple[int, ...] = setting(REPR_LENGTHS, "text lengths n", flag="--length")
    families: tuple[str, ...] = setting(FAMILIES, "repeated | natural", flag="--family")
    bos: tuple[str, ...] = ("add", "strip")
    repeat_token: str = setting(" a", "the one token the 'repeated' family repeats")
    text: str | None = None
    repeat_tokens: tuple[str, ...] = ()  # more repeated tokens: each its own sequence (independent units)

    def __post_init__(self) -> None:  # settings checked (and normalised) before any model loads
        sizes = sorted({int(n) for n in self.lengths})
        if not sizes or sizes[0] < 1:
            raise InputError("lengths must be positive integers (at least one)")
        unknown = [f for f in self.families if f not in FAMILIES]
        if unknown or not self.families:
            raise InputError(f"unknown families {unknown or '(none given)'} (use {', '.join(FAMILIES)})")
        self.lengths, self.families = tuple(sizes), tuple(dict.fromkeys(self.families))
        self.bos = tuple(bos_conditions(self.bos))

    def prepare(self, loaded: LoadedModel) -> Context:
        tokenizer = require_tokenizer(loaded)
        longest = self.lengths[-1]
        sources = {(f, token if f == "repeated" else ""): _family_tokens(tokenizer, f, longest, token, self.text)
                   for f in self.families
                   for token in (dict.fromkeys((self.repeat_token, *self.repeat_tokens)) if f == "repeated"
                                 else (self.repeat_token,))}
        prefixes = {c: prefix_ids(tokenizer, c) for c in self.bos}
        check_length(loaded, max(len(p) for p in prefixes.values()) + longest + 1, "the longest sequence")
        trials = []
        for (family, token), text_ids in sources.items():
            for condition in self.bos:
                trials += [Trial(family, condition, n, prefixes[condition] + text_ids[:n], text_ids[n - 1], token)
                           for n in self.lengths]
        return Context(loaded, trials)

    def describe(self, units: Sequence[Trial]) -> str:
        (trial,) = units
        return f"{trial.family} bos={trial.bos} n={trial.n}"

    def measure(self, ctx: Context, engine: Any, units: Sequence[Trial]) -> dict[str, pd.DataFrame]:
        (trial,) = units
        last = {}
        for name, seq in (("base", trial.ids), ("repeated_last", trial.ids + [trial.repeated])):
            (stream,) = residual_streams(engine, [seq], [f"{trial.family} n={trial.n}, bos={trial.bos} ({name})"])
            last[name] = stream[-1, -1].to(torch.float64).cpu().numpy()
        distances = collapse_metrics.vector_distances(last["base"], last["repeated_last"])
        norm = float(np.linalg.norm(last["base"]))
        first, final = token_strings(ctx.tokenizer, [trial.ids[0], trial.ids[-1]])
        return {"repr_collapse": pd.DataFrame([{
            "family": trial.family, "repeat_token": trial.source, "bos": trial.bos, "n": trial.n,
            "n_tokens": len(trial.ids),
            "first_token": first, "last_token": final, **{k: float(v) for k, v in distances.items()},
            "relative_l2": float(distances["l2"]) / norm if norm > 0 else float("nan"),
            "residual_norm": norm,
        }])}

    def summarise(self, ctx: Context, tables: dict[str, pd.DataFrame]) -> dict[str, Any]:
        every = tables["repr_collapse"]
        # the curves: of the first repeated token (more repeated tokens are units for the report's slope)
        frame = every[(every["family"] != "repeated") | (every["repeat_token"] == self.repeat_token)]
        curves: dict[str, Any] = {}
        largest: dict[str, Any] = {}
        for family in self.families:
            curves[family], largest[family] = {}, {}
            for condition in list(self.bos):
                rows = frame[(frame["family"] == family) & (frame["bos"] == condition)].sort_values("n")
                curve = {c: rows[c].tolist() for c in ("n", *collapse_metrics.DISTANCES, "relative_l2")}
                curve["l2_loglog_slope"] = loglog_slope(curve["n"], curve["l2"])
                curves[family][condition] = curve
                last = rows.iloc[-1]
                largest[family][condition] = {
                    "n": int(last["n"]), "first_token": str(last["first_token"]),
                    **{c: float(last[c]) for c in (*collapse_metrics.DISTANCES, "relative_l2")}}
        return {
            "model": ctx.loaded.info.name, "bos": list(self.bos), "families": list(self.families),
            "lengths": list(self.lengths), "repeat_token": self.repeat_token,
            "distances": list(collapse_metrics.DISTANCES),
            "what": "last token's residual at the last depth (before the final norm): sequence vs same + last "
                    "token repeated",
            "at_largest_n": largest, "curves": curves,
        }


def _family_tokens(tokenizer: Any, family: str, longest: int, repeat_token: str, text: str | None) -> list[int]:
    """The first ``longest`` text tokens of one family."""
    if family == "repeated":
        ids = encode(tokenizer, repeat_token, "strip", None)
        if len(ids) != 1:
            raise InputError(f"repeat token {repeat_token!r} is {len(ids)} tokens for this tokenizer; it must be one")
        return ids * longest
    source = text if text is not None else "\n\n".join(p.text for p in probe_set())
    ids = encode(tokenizer, source, "strip", None)
    if len(ids) < longest:
        raise InputError(f"the natural text has {len(ids)} tokens; the longest length asked for is {longest}")
    return ids[:longest]


def loglog_slope(n: Sequence[float], values: Sequence[float]) -> float:
    """Least-squares slope of log(values) against log(n) over the positive values (NaN if fewer than 2)."""
    x, y = np.asarray(n, dtype=np.float64), np.asarray(values, dtype=np.float64)
    keep = (x > 0) & (y > 0) & np.isfinite(y)
    if keep.sum() < 2:
        return float("nan")
    return float(np.polyfit(np.log(x[keep]), np.log(y[keep]), 1)[0])


representational_collapse = experiment_function(
    ReprCollapse, "representational_collapse",
    """Last-token representational collapse as a function of the number of text tokens n (module docstring).

    ``natural`` reads ``text`` (default: the probe set's texts joined).""")

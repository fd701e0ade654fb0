"""`perturb`: how far a one-word change spreads through depth and sequence, with vs without `<bos>`
(Barbero et al. 2025, Fig. 2).

The text x and a copy x' with one word swapped (the paper: the App. C.1 Shakespeare paragraph,
"greatest" -> "best", same token count) run under each `<bos>` condition (one unit each). For every
residual depth d (0 = the embeddings, d = the output of layer d-1, the last before the final norm) and
text token j,

    Delta[d, j] = ||h_j^(d)(x) - h_j^(d)(x')||_2       and      Delta[d, j] / ||h_j^(d)(x)||_2.

Conditions are aligned on the text tokens (the text span, found by alignment): a prefix at position 0
that is not text (`<bos>`, a replacement token) is dropped, and a suffix the tokenizer appends (an
`<eos>` under ``--bos auto``) is not run — it comes after every text token, so it cannot change them.
Summaries (p = the last changed position): S_total = sum over depths and tokens j > p, S_final = mean
over tokens j > p at the last depth, and R = S(strip) / S(add). The paper's claim predicts R > 1:
without the sink the change spreads further.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch

from ..data.texts import SHAKESPEARE_PARAGRAPH as SHAKESPEARE
from ..errors import InputError
from ..metrics import sensitivity
from ..models.loader import LoadedModel
from .base import Context, Experiment, Result
from .functions import experiment_function
from .inputs import bos_conditions, check_context, check_length, encode_one, require_tokenizer, token_label
from .residual import DEPTH_CONVENTION, residual_streams

DEFAULT_SWAP = ("greatest", "best")
SPREAD_KEYS = ("S_total", "S_final", "S_total_rel", "S_final_rel")
__all__ = ["SHAKESPEARE", "Perturb", "PerturbResult", "parse_swap", "perturb", "swap_word"]


def parse_swap(spec: str) -> tuple[str, str]:
    """``"old=new"`` -> ("old", "new"); a malformed spec is an InputError."""
    if spec.count("=") != 1:
        raise InputError(f"--swap must look like old=new (e.g. greatest=best), got '{spec}'")
    old, new = (part.strip() for part in spec.split("="))
    if not old or not new:
        raise InputError(f"--swap needs a word on both sides of '=', got '{spec}'")
    return old, new


def swap_word(text: str, old: str, new: str) -> tuple[str, int]:
    """Replace the first whole-word occurrence of ``old`` by ``new``; returns the text and its character offset."""
    if old == new:
        raise InputError(f"--swap {old}={new} changes nothing")
    match = re.search(rf"(?<!\w){re.escape(old)}(?!\w)", text)
    if match is None:
        raise InputError(f"--swap: the word '{old}' does not occur in the text")
    return text[:match.start()] + new + text[match.end():], match.start()


@dataclass
class PerturbContext(Context):
    text_ids: list[int]  # the text tokens every condition holds
    perturbed_ids: list[int]  # ... of the swapped text
    changed: list[int]  # the text positions the swap changes


class PerturbResult(Result):
    """Table ``delta``: one row per bos x depth x text token."""



@dataclass(frozen=True)
class SwapPair:
    """One `<bos>` condition: the text and the swapped text, each as prefix + the shared text tokens."""

    bos: str
    ids: list[int]
    perturbed_ids: list[int]
    text_start: int


@dataclass
class Perturb(Experiment[PerturbResult]):
    """Perturbation spread of a one-word swap under each `<bos>` condition (see the module docstring)."""

    name = "perturb"
    unit_label = "conditions"

    text: str = SHAKESPEARE
    swap: tuple[str, str] = DEFAULT_SWAP
    bos: tuple[str, ...] = ("add", "strip")
    max_tokens: int | None = None

    def __post_init__(self) -> None:  # settings checked before any model loads
        self.swap = (str(self.swap[0]), str(self.swap[1]))
        swap_word(self.text, *self.swap)  # refuses a swap that cannot apply
        self.bos = tuple(bos_conditions(self.bos))

    @property
    def perturbed_text(self) -> str:
        """The text with the swap made."""
        return swap_word(self.text, *self.swap)[0]

    def prepare(self, loaded: LoadedModel) -> PerturbContext:
        tokenizer = require_tokenizer(loaded, "perturb")
        old, new = self.swap
        original = {mode: encode_one(tokenizer, self.text, mode, self.max_tokens) for mode in self.bos}
        changed = {mode: encode_one(tokenizer, self.perturbed_text, mode, self.max_tokens) for mode in self.bos}
        check_context(loaded, [], self.max_tokens)
        for mode, encoded in original.items():
            check_length(loaded, len(encoded), f"the text with bos={mode}")
        for mode, encoded in original.items():
            a, b = encoded, changed[mode]
            if a.text_stop - a.text_start != b.text_stop - b.text_start or a.ids[:a.text_start] != b.ids[:b.text_start]:
                raise InputError(f"--swap {old}={new} changes the token count ({len(a)} -> {len(b)} tokens with "
                                 f"bos={mode}); pick a replacement with as many tokens")
        # every condition holds a head of the same text tokens; compare them on the tokens they all hold
        n_text = min(e.text_stop - e.text_start for e in original.values())
        first = next(iter(original.values()))
        text_ids = first.text_ids[:n_text]
        perturbed_ids = changed[first.bos].text_ids[:n_text]
        positions = [j for j, (a, b) in enumerate(zip(text_ids, perturbed_ids, strict=True)) if a != b]
        if not positions:
            raise InputError(f"--swap {old}={new} leaves the tokens unchanged (within --max-tokens?)")
        units = [SwapPair(mode, e.ids[:e.text_start + n_text], changed[mode].ids[:e.text_start + n_text],
                          e.text_start) for mode, e in original.items()]
        return PerturbContext(loaded, units, text_ids, perturbed_ids, positions)

    def describe(self, units: Sequence[SwapPair]) -> str:
        return f"bos={units[0].bos}"

    def measure(self, ctx: PerturbContext, engine: Any, units: Sequence[SwapPair]) -> dict[str, pd.DataFrame]:
        (pair,) = units
        start, position = pair.text_start, ctx.changed[-1]  # spread is measured after the last changed token
        (stream,) = residual_streams(engine, [pair.ids], [f"bos={pair.bos} (the text)"])
        (stream_perturbed,) = residual_streams(engine, [pair.perturbed_ids], [f"bos={pair.bos} (the swapped text)"])
        hidden = stream[:, start:].to(torch.float64).cpu().numpy()  # [depths, text tokens, d]
        hidden_perturbed = stream_perturbed[:, start:].to(torch.float64).cpu().numpy()
        delta = sensitivity.perturbation_delta(hidden, hidden_perturbed)
        rel = sensitivity.relative_delta(delta, hidden)
        n_depths, n_tokens = delta.shape
        positions = np.tile(np.arange(n_tokens), n_depths)
        tokens = np.array(ctx.tokenizer.convert_ids_to_tokens(ctx.text_ids), dtype=object)
        tokens_perturbed = np.array(ctx.tokenizer.convert_ids_to_tokens(ctx.perturbed_ids), dtype=object)
        return {"delta": pd.DataFrame({
            "bos": pair.bos,
            "depth": np.repeat(np.arange(n_depths), n_tokens),
            "position": positions,
            "sequence_position": positions + start,
            "token": tokens[positions],
            "token_perturbed": tokens_perturbed[positions],
            "changed": np.isin(positions, ctx.changed),
            "after_swap": positions > position,
            "delta": delta.reshape(-1),
            "delta_rel": rel.reshape(-1),
            "norm": np.linalg.norm(hidden, axis=-1).reshape(-1),
        })}

    def summarise(self, ctx: PerturbContext, tables: dict[str, pd.DataFrame]) -> dict[str, Any]:
        frame, loaded, tokenizer = tables["delta"], ctx.loaded, ctx.tokenizer
        position, changed = ctx.changed[-1], ctx.changed
        per_condition: dict[str, Any] = {}
        for pair in ctx.units:
            rows = frame[frame["bos"] == pair.bos]
            delta, rel = (rows.pivot(index="depth", columns="position", values=v).to_numpy()
                          for v in ("delta", "delta_rel"))
            stats = sensitivity.spread_summary(delta, position)
            stats.update({f"{k}_rel": v for k, v in sensitivity.spread_summary(rel, position).items()})
            # causality audit: nothing before the first changed token may move
            stats["max_delta_before_swap"] = float(delta[:, :changed[0]].max()) if changed[0] else 0.0
            stats["n_tokens"] = len(pair.ids)
            stats["first_token"] = tokenizer.convert_ids_to_tokens(int(pair.ids[0]))
            per_condition[pair.bos] = stats
        labels = [token_label(tokenizer, t) for t in ctx.text_ids]
        for j in changed:
            labels[j] = f"{labels[j]}→{token_label(tokenizer, ctx.perturbed_ids[j])}"
        summary: dict[str, Any] = {
            "model": loaded.info.name,
            "text": self.text,
            "perturbed_text": self.perturbed_text,
            "swap": {"old": self.swap[0], "new": self.swap[1]},
            "changed_positions": changed,
            "perturbed_position": position,
            "n_text_tokens": len(ctx.text_ids),
            "n_layers": loaded.info.n_layers,
            "token_labels": labels,
            "conditions": per_condition,
            "depth_convention": DEPTH_CONVENTION,
        }
        if "add" in per_condition and "strip" in per_condition:
            for key in SPREAD_KEYS:
                summary["R" + key[1:]] = sensitivity.spread_ratio(per_condition["strip"][key],
                                                                  per_condition["add"][key])
        return summary


perturb = experiment_function(
    Perturb, "perturb",
    """Perturbation spread of a one-word swap under each `<bos>` condition (see the module docstring).

    ``swap``: (old, new); the first whole-word occurrence of old is replaced. Swaps whose word is absent,
    that change nothing, or that change the token count are refused (InputError).
    """, inputs="text")

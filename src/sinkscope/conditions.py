"""Conditions: what sits at position 0, and what is done to the attention on the first token.

A condition is one string, parsed here and nowhere else::

    <position-0>[+<intervention>[:<argument>][@<layers>[/<heads>]]]

position 0 (how the text is encoded; see `sinkscope.models.tokens`):
  ``auto``           the tokenizer's default       ``add``    ``<bos>`` + text tokens
  ``strip``          text tokens only              ``replace:<tok>``  <tok> + text tokens
  ``given``          token ids used exactly as given (no text)

interventions (on every later query's attention to the first token, in the chosen layers and heads;
the formulas are in ``docs/conditions.md``):
  ``knockout``       key 0 hidden from every later query, the rest renormalised
  ``scale:λ``        the weight on key 0 becomes λ·p₀ (λ ∈ [0, 1]) and the other keys share 1 − λ·p₀ in
                     their old ratios; λ = 1 is the model, λ = 0 the knock-out
  ``zero-value``     the value vector of the first token is zeroed (attention still goes there; it writes
                     nothing): the paper's "no-op" made exact
  ``random-key[:seed]``  the equal-budget control: one random key other than the first hidden from each
                     later query (seeded; default seed 0)

``@3-5`` chooses layers 3, 4 and 5, ``@3/0,2`` heads 0 and 2 of layer 3, ``@/0`` head 0 of every layer;
without ``@`` every head of every layer. Examples: ``add``, ``strip``, ``replace:.``, ``add+scale:0.25``,
``add+knockout@3-5``, ``add+zero-value@0-8``, ``add+random-key``.

``str(parse_condition(s))`` is the canonical spelling (layers and heads sorted, ranges merged), and
``parse_condition(str(c)) == c``: the string is the ``condition`` of every table and summary. This module
imports nothing from the rest of the package but its errors, so every layer can use it.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from .errors import InputError, TokenizationError

POSITION_KINDS = ("auto", "add", "strip", "replace", "given")
INTERVENTIONS = ("knockout", "scale", "zero-value", "random-key")
_NAME = re.compile(r"[a-z][a-z-]*")


@dataclass(frozen=True)
class Position:
    """What sits at position 0: ``kind`` (auto | add | strip | replace | given) and, for replace, the token."""

    kind: str
    token: str | None = None

    def __str__(self) -> str:
        return f"replace:{self.token}" if self.kind == "replace" else self.kind


@dataclass(frozen=True)
class Intervention:
    """One intervention on the attention to the first token. ``layers`` / ``heads``: None = all."""

    kind: str  # knockout | scale | zero-value | random-key
    scale: float | None = None  # λ of scale
    seed: int = 0  # random-key's draw
    layers: tuple[int, ...] | None = None
    heads: tuple[int, ...] | None = None

    def __str__(self) -> str:
        text = self.kind
        if self.kind == "scale":
            assert self.scale is not None
            text += f":{_number(self.scale)}"
        elif self.kind == "random-key" and self.seed:
            text += f":{self.seed}"
        if self.layers is not None or self.heads is not None:
            text += "@" + ("" if self.layers is None else _ranges(self.layers))
            if self.heads is not None:
                text += "/" + _ranges(self.heads)
        return text

    def selects(self, layer: int) -> bool:
        return self.layers is None or layer in self.layers

    def check(self, n_layers: int, n_heads: int, where: str) -> None:
        """Refuse layers or heads the model does not have (`InputError` naming them)."""
        bad = [x for x in self.layers or () if x >= n_layers]
        if bad:
            raise InputError(f"condition {where}: layer {bad[0]} out of range (the model has layers "
                             f"0-{n_layers - 1})")
        bad = [x for x in self.heads or () if x >= n_heads]
        if bad:
            raise InputError(f"condition {where}: head {bad[0]} out of range (the model has heads 0-{n_heads - 1})")


@dataclass(frozen=True)
class Condition:
    """What sits at position 0 plus at most one intervention (see the module docstring)."""

    position: Position
    intervention: Intervention | None = None

    def __str__(self) -> str:
        return str(self.position) + ("" if self.intervention is None else f"+{self.intervention}")

    @property
    def bos(self) -> str:
        """The position-0 part alone (how the text is encoded)."""
        return str(self.position)

    def check(self, n_layers: int, n_heads: int) -> None:
        if self.intervention is not None:
            self.intervention.check(n_layers, n_heads, str(self))


def parse_condition(spec: str | Condition) -> Condition:
    """One condition from its text (`TokenizationError` for a bad position-0 part, `InputError` for a bad
    intervention; both name what is wrong)."""
    if isinstance(spec, Condition):
        return spec
    text = str(spec).strip()
    head, plus, tail = text.rpartition("+")
    name = _NAME.match(tail)
    if plus and name is not None and name.group() in INTERVENTIONS:
        return Condition(parse_position(head, text), _parse_intervention(tail, text))
    if plus and name is not None and not text.startswith("replace:"):
        raise InputError(f"condition '{text}': unknown intervention '{name.group()}' "
                         f"(use {', '.join(INTERVENTIONS)})")
    return Condition(parse_position(text, text))


def parse_position(text: str, whole: str | None = None) -> Position:
    if text in ("auto", "add", "strip", "given"):
        return Position(text)
    if text.startswith("replace:") and len(text) > len("replace:"):
        return Position("replace", text[len("replace:"):])
    word = _NAME.match(text)
    if word is not None and word.group() in INTERVENTIONS:
        raise TokenizationError(f"condition '{whole or text}': say what sits at position 0 first, e.g. add+{text}")
    raise TokenizationError(f"unknown --bos mode / condition '{whole or text}': position 0 must be auto, add, strip, "
                            "given or replace:<token>, then optionally +knockout, +scale:λ, +zero-value or +random-key")


def parse_conditions(specs: str | Condition | Iterable[str | Condition]) -> list[Condition]:
    """Conditions from one string or several, each once (an error names the first bad or repeated one)."""
    items = [specs] if isinstance(specs, str | Condition) else list(specs)
    conditions = [parse_condition(s) for s in items]
    if not conditions:
        raise InputError("give at least one condition")
    seen: set[str] = set()
    for condition in conditions:
        if str(condition) in seen:
            raise InputError(f"each --bos condition may be given once ('{condition}' is given twice)")
        seen.add(str(condition))
    return conditions


def _parse_intervention(text: str, whole: str) -> Intervention:
    spec, at, selection = text.partition("@")
    kind, colon, argument = spec.partition(":")
    layers, heads = _selection(selection, whole) if at else (None, None)
    if kind == "scale":
        if not colon:
            raise InputError(f"condition '{whole}': scale needs its dose, e.g. scale:0.25 (λ in [0, 1])")
        try:
            value = float(argument)
        except ValueError:
            raise InputError(f"condition '{whole}': cannot read the dose '{argument}' (a number in [0, 1])") from None
        if not math.isfinite(value) or not 0.0 <= value <= 1.0:
            raise InputError(f"condition '{whole}': the dose λ = {argument} must lie in [0, 1]")
        return Intervention("scale", scale=value, layers=layers, heads=heads)
    if kind == "random-key":
        seed = 0
        if colon:
            if not argument.isdigit():
                raise InputError(f"condition '{whole}': random-key's seed must be a whole number, e.g. random-key:7")
            seed = int(argument)
        return Intervention("random-key", seed=seed, layers=layers, heads=heads)
    if colon:
        raise InputError(f"condition '{whole}': {kind} takes no argument")
    return Intervention(kind, layers=layers, heads=heads)


def _selection(text: str, whole: str) -> tuple[tuple[int, ...] | None, tuple[int, ...] | None]:
    """``3-5`` / ``3/0,2`` / ``/0`` -> (layers, heads); None = all."""
    layer_text, slash, head_text = text.partition("/")
    layers = _indices(layer_text, "layers", whole) if layer_text not in ("", "*") else None
    heads = _indices(head_text, "heads", whole) if slash else None
    if layers is None and heads is None:
        raise InputError(f"condition '{whole}': '@' must be followed by layers and/or heads, e.g. @3-5 or @3/0,2")
    return layers, heads


def _indices(text: str, what: str, whole: str) -> tuple[int, ...]:
    chosen: set[int] = set()
    for piece in text.split(","):
        low, dash, high = piece.strip().partition("-")
        if not low.isdigit() or (dash and not high.isdigit()):
            raise InputError(f"condition '{whole}': cannot read {what} '{text}' (e.g. 3, 3-5 or 0,2)")
        start, stop = int(low), int(high) if dash else int(low)
        if stop < start:
            raise InputError(f"condition '{whole}': {what} range {piece} runs backwards")
        chosen.update(range(start, stop + 1))
    return tuple(sorted(chosen))


def _ranges(values: Sequence[int]) -> str:
    """(0, 1, 2, 5) -> '0-2,5'."""
    pieces, start = [], None
    for i, value in enumerate(values):
        if start is None:
            start = value
        if i + 1 == len(values) or values[i + 1] != value + 1:
            pieces.append(str(start) if start == value else f"{start}-{value}")
            start = None
    return ",".join(pieces)


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))

"""`knockout`: leave the tokens alone and remove the attention to position 0 (renormalising over the rest)
in all heads, one layer at a time, or one head at a time; Δloss against the unmodified model.

The equal-budget control (``control``, on by default): the same interventions at the all-heads and
per-layer scopes, removing instead *one random key* per query among the keys it sees other than the first
(`capture.RandomKeyKnockout`, seeded), so "the sink matters" is compared with "any one key matters".
Rows say which key went in ``target`` ("first" or "random").

Uncertainty: every Δloss comes with a 95% percentile bootstrap interval over windows (each window's mean
Δloss is one unit; table ``windows`` holds them), and the summary gives the paired interval of
Δloss(first) - Δloss(random) over the same windows.

Work units: the interventions — all heads of every layer, then for each chosen layer all its heads and
(``per_head``) each head alone, or the single heads a ``heads`` spec names. Each runs over every window
(see `loss` for the targets) and is one batch, so an interrupted run resumes at the next intervention.
The unmodified baseline every intervention is compared with is computed once, in `begin`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import pandas as pd

from ..capture import Probe, RandomKeyKnockout, SinkKnockout
from ..conditions import Intervention as ConditionIntervention
from ..conditions import parse_condition
from ..errors import InputError
from ..metrics.loss import delta_summary, mean_loss, perplexity
from ..metrics.stats import bootstrap_interval, paired_difference_interval
from ..models.loader import LoadedModel
from .base import Result
from .functions import experiment_function
from .inputs import first_token_label, prefix_ids, require_tokenizer
from .loss import TextContext, TextLoss
from .settings import setting


def _index_range(piece: str, option: str, example: str) -> range:
    """``"3"`` or ``"0-3"`` as a range of indices."""
    try:
        low, _, high = piece.partition("-")
        return range(int(low), int(high or low) + 1)
    except ValueError:
        raise InputError(f"{option}: cannot read '{piece}' (use e.g. {example})") from None


def parse_layers(spec: str | Sequence[int] | None, n_layers: int) -> list[int]:
    """``None`` (all), a list of ints, or a string like ``"0-3,7"`` -> sorted layer indices, checked."""
    if spec is None:
        return list(range(n_layers))
    chosen: set[int] = set()
    if isinstance(spec, str):
        for piece in filter(None, (p.strip() for p in spec.split(","))):
            chosen.update(_index_range(piece, "--layers", "0-3,7"))
    else:
        chosen.update(int(x) for x in spec)
    if not chosen:
        raise InputError("--layers selects no layer")
    bad = sorted(x for x in chosen if not 0 <= x < n_layers)
    if bad:
        raise InputError(f"--layers {bad} out of range: the model has layers 0-{n_layers - 1}")
    return sorted(chosen)


def parse_heads(spec: str | Sequence[Sequence[int]], n_layers: int, n_heads: int) -> list[tuple[int, int]]:
    """A string like ``"5:1,11:0-3"`` (layer:head, ranges allowed on either side) or (layer, head) pairs ->
    sorted (layer, head) pairs, checked against the model."""
    pairs: set[tuple[int, int]] = set()
    if isinstance(spec, str):
        for piece in filter(None, (p.strip() for p in spec.split(","))):
            layer_part, colon, head_part = piece.partition(":")
            if not colon:
                raise InputError(f"--heads: cannot read '{piece}' (use layer:head, e.g. 5:1,11:0-3)")
            layers = _index_range(layer_part, "--heads", "5:1,11:0-3")
            heads = _index_range(head_part, "--heads", "5:1,11:0-3")
            pairs.update((layer, head) for layer in layers for head in heads)
    else:
        pairs.update((int(layer), int(head)) for layer, head in spec)
    if not pairs:
        raise InputError("--heads selects no head")
    bad = sorted(p for p in pairs if not (0 <= p[0] < n_layers and 0 <= p[1] < n_heads))
    if bad:
        shown = ", ".join(f"{layer}:{head}" for layer, head in bad[:5])
        raise InputError(f"--heads {shown} out of range: the model has layers 0-{n_layers - 1} and heads "
                         f"0-{n_heads - 1}")
    return sorted(pairs)


@dataclass(frozen=True)
class Intervention:
    """What is knocked out: every head (``all``), one layer's heads (``layer``) or one head (``head``); the
    first key (``target="first"``) or one random key per query (``"random"``, the control)."""

    scope: str
    layer: int | None = None
    head: int | None = None
    target: str = "first"

    @property
    def heads(self) -> dict[int, list[int] | None] | None:
        """`SinkKnockout`'s selection: None is every head of every layer."""
        if self.scope == "all":
            return None
        assert self.layer is not None
        return {self.layer: None if self.head is None else [self.head]}


@dataclass
class KnockoutContext(TextContext):
    prefix: list[int]
    first_token: str
    chosen: list[int]  # the layers run one by one
    pairs: list[tuple[int, int]] | None  # the single heads asked for (None: every head of those layers)
    probe: SinkKnockout
    control: RandomKeyKnockout
    baseline: np.ndarray | None = None  # NLL [windows, W-1] with nothing removed (`begin`)


class KnockoutResult(Result):
    """Tables ``knockout`` (one row per intervention: scope, layer, head, target, loss, Δloss and its 95%
    interval over windows, ...) and ``windows`` (intervention x window: that window's mean Δloss)."""



@dataclass
class Knockout(TextLoss[KnockoutResult]):
    """Δloss when the attention to position 0 is removed in all heads, per layer and per head."""

    name = "knockout"
    unit_label = "interventions"
    summary_needs_begin = True  # the summary compares with the baseline, which is measured again after a resume

    window: int = setting(256, "text tokens per window")
    max_windows: int | None = setting(2, "windows of the text")
    bos: str = "add"
    layers: str | list[int] | None = setting(None, "e.g. 0-3,7 (none: all)")
    heads: str | list[tuple[int, int]] | None = setting(
        None, "single heads to knock out, layer:head, e.g. 5:1,11:0-3 (none: every head of --layers)")
    per_head: bool = setting(True, "also knock out each head alone")
    control: bool = setting(True, "also remove one random non-first key per query (all heads, each layer): "
                            "the control")
    seed: int = setting(0, "seed of the control's random keys")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.layers is not None and not isinstance(self.layers, str):
            self.layers = [int(x) for x in self.layers]
        if self.heads is not None and not isinstance(self.heads, str):
            self.heads = [(int(a), int(b)) for a, b in self.heads]
        condition = parse_condition(self.bos)
        if condition.intervention is not None:
            raise InputError(f"knockout sweeps its own knockout and random-key conditions; give what sits at "
                             f"position 0 only, not '{condition}'")
        self.bos = str(condition)

    def prepare(self, loaded: LoadedModel) -> KnockoutContext:
        info = loaded.info
        pairs = None if self.heads is None else parse_heads(self.heads, info.n_layers, info.n_heads)
        if self.layers is not None or pairs is None:
            chosen = parse_layers(self.layers, info.n_layers)
        else:  # --heads alone: the layers of those heads
            chosen = sorted({layer for layer, _ in pairs})
        if pairs is not None:
            outside = sorted({layer for layer, _ in pairs} - set(chosen))
            if outside:
                raise InputError(f"--heads names layers {outside} that --layers leaves out")
        tokenizer = require_tokenizer(loaded, "knockout")
        prefix = prefix_ids(tokenizer, self.bos)
        windows = self.text_windows(loaded, len(prefix))
        units = [Intervention("all")] + ([Intervention("all", target="random")] if self.control else [])
        for layer in chosen:
            units.append(Intervention("layer", layer))
            if self.control:
                units.append(Intervention("layer", layer, target="random"))
            if pairs is not None:
                units += [Intervention("head", layer, head) for lay, head in pairs if lay == layer]
            elif self.per_head:
                units += [Intervention("head", layer, head) for head in range(info.n_heads)]
        return KnockoutContext(loaded, units, windows, prefix, first_token_label(tokenizer, prefix), chosen, pairs,
                               SinkKnockout({}), RandomKeyKnockout({}, seed=self.seed))

    def condition(self, unit: Intervention) -> str:
        """The intervention as a condition string (`sinkscope.conditions`), e.g. ``add+knockout@3/1``."""
        base = parse_condition(self.bos)
        kind = "knockout" if unit.target == "first" else "random-key"
        layers = None if unit.layer is None else (unit.layer,)
        heads = None if unit.head is None else (unit.head,)
        spec = ConditionIntervention(kind, seed=self.seed if kind == "random-key" else 0, layers=layers, heads=heads)
        return str(replace(base, intervention=spec))

    def probes(self, ctx: KnockoutContext) -> list[Probe]:
        return [ctx.probe, ctx.control]

    def describe(self, units: Sequence[Intervention]) -> str:
        unit = units[0]
        label = {"all": "all heads", "layer": f"layer {unit.layer}"}.get(unit.scope, f"layer {unit.layer} head "
                                                                                     f"{unit.head}")
        return label + (" (random key)" if unit.target == "random" else "")

    def _run_nll(self, ctx: KnockoutContext, engine: Any, heads: dict[int, list[int] | None] | None,
                 target: str = "first") -> np.ndarray:
        # {}: no layer touched; None: every head of every layer
        ctx.probe.heads, ctx.control.heads = (heads, {}) if target == "first" else ({}, heads)
        return self.nll(engine, [ids for _, ids in ctx.windows], ctx.prefix)

    def begin(self, ctx: KnockoutContext, engine: Any) -> None:
        ctx.baseline = self._run_nll(ctx, engine, {})

    def measure(self, ctx: KnockoutContext, engine: Any, units: Sequence[Intervention]) -> dict[str, pd.DataFrame]:
        baseline = ctx.baseline
        assert baseline is not None
        rows, windows = [], []
        for unit in units:
            knocked = self._run_nll(ctx, engine, unit.heads, unit.target)
            delta = delta_summary(baseline, knocked)
            per_window = (knocked - baseline).mean(1)  # [windows]: the units of the interval
            _, low, high = bootstrap_interval(per_window, seed=self.seed)
            key = {"scope": unit.scope, "layer": unit.layer, "head": unit.head, "target": unit.target,
                   "condition": self.condition(unit)}
            rows.append({**key, "loss": mean_loss(knocked), "ppl": perplexity(knocked),
                         "delta_loss": delta["delta_loss"], "delta_se": delta["delta_se"], "delta_loss_low": low,
                         "delta_loss_high": high, "fraction_worse": delta["fraction_worse"],
                         "n_tokens": delta["n_tokens"]})
            windows.append(pd.DataFrame({**key, "window": np.arange(len(per_window)), "delta_loss": per_window}))
        types = {"layer": "Int64", "head": "Int64"}
        return {"knockout": pd.DataFrame(rows).astype(types),
                "windows": pd.concat(windows, ignore_index=True).astype(types)}

    def summarise(self, ctx: KnockoutContext, tables: dict[str, pd.DataFrame]) -> dict[str, Any]:
        baseline = ctx.baseline
        assert baseline is not None
        frame = tables["knockout"]
        control = frame[frame["target"] == "random"]
        frame = frame[frame["target"] == "first"]

        def top(scope: str, n: int) -> list[dict[str, Any]]:
            rows = frame[frame["scope"] == scope].nlargest(n, "delta_loss")
            return [{"layer": int(r.layer), **({"head": int(r.head)} if scope == "head" else {}),
                     "delta_loss": float(r.delta_loss), "delta_se": float(r.delta_se),
                     "delta_loss_ci": [float(r.delta_loss_low), float(r.delta_loss_high)]} for r in rows.itertuples()]

        everything = frame[frame["scope"] == "all"].iloc[0]
        per_layer = frame[frame["scope"] == "layer"]
        info = ctx.loaded.info
        with_heads = self.per_head or ctx.pairs is not None
        return {
            "model": info.name, "bos": self.bos, "first_token": ctx.first_token, "text": self.source,
            "window": len(ctx.windows[0][1]), "n_windows": len(ctx.windows), "n_tokens": int(baseline.size),
            "n_layers": info.n_layers, "n_heads": info.n_heads, "layers": ctx.chosen, "per_head": self.per_head,
            "heads": None if ctx.pairs is None else [list(p) for p in ctx.pairs],
            "baseline": {"loss": mean_loss(baseline), "ppl": perplexity(baseline)},
            "all_heads": _headline(everything),
            "delta_loss_by_layer": {int(r.layer): float(r.delta_loss) for r in per_layer.itertuples()},
            "delta_loss_by_layer_ci": {int(r.layer): [float(r.delta_loss_low), float(r.delta_loss_high)]
                                       for r in per_layer.itertuples()},
            "top_layers": top("layer", 5), "top_heads": top("head", 10) if with_heads else [],
            "control": self._control_summary(control, tables["windows"]),
        }

    def _control_summary(self, control: pd.DataFrame, windows: pd.DataFrame) -> dict[str, Any] | None:
        """The random-key rows, and per scope the paired interval of Δloss(first) - Δloss(random) over windows."""
        if control.empty:
            return None

        def paired(scope: str, layer: int | None) -> dict[str, Any]:
            rows = windows[(windows["scope"] == scope) & (windows["head"].isna())]
            if layer is not None:
                rows = rows[rows["layer"] == layer]
            first = rows[rows["target"] == "first"].sort_values("window")["delta_loss"].to_numpy()
            random = rows[rows["target"] == "random"].sort_values("window")["delta_loss"].to_numpy()
            mean, low, high = paired_difference_interval(first, random, seed=self.seed)
            return {"delta_loss": mean, "delta_loss_ci": [low, high]}

        per_layer = control[control["scope"] == "layer"]
        return {
            "target": "one random key per query among the visible keys other than the first", "seed": self.seed,
            "all_heads": _headline(control[control["scope"] == "all"].iloc[0]),
            "delta_loss_by_layer": {int(r.layer): float(r.delta_loss) for r in per_layer.itertuples()},
            "delta_loss_by_layer_ci": {int(r.layer): [float(r.delta_loss_low), float(r.delta_loss_high)]
                                       for r in per_layer.itertuples()},
            "first_minus_random": {"all_heads": paired("all", None),
                                   "by_layer": {int(r.layer): paired("layer", int(r.layer))
                                                for r in per_layer.itertuples()}},
        }


def _headline(row: Any) -> dict[str, Any]:
    return {"loss": float(row["loss"]), "ppl": float(row["ppl"]), "delta_loss": float(row["delta_loss"]),
            "delta_se": float(row["delta_se"]), "delta_loss_ci": [float(row["delta_loss_low"]),
                                                                  float(row["delta_loss_high"])]}


knockout = experiment_function(
    Knockout, "knockout",
    """Δloss when the attention to position 0 is removed (and renormalised) in all heads, in each layer,
    and (``per_head``) in each head, on the same tokens as the unmodified baseline.

    ``layers`` limits the per-layer and per-head runs ("0-3,7" or a list); ``heads`` ("5:1,11:0-3" or
    (layer, head) pairs) runs just those single heads (and, without ``layers``, their layers). The
    all-heads run always covers every layer. ``control``: also remove one random non-first key per query
    (seeded by ``seed``) at the all-heads and per-layer scopes, the equal-budget comparison. Every Δloss has a
    95% bootstrap interval over windows. ``out``: each finished intervention is written to ``out/parts/`` so
    ``resume`` can continue.
    """,
    inputs="text")

"""`oversquash`: Jacobian sensitivity of the last layer to the input, with vs without `<bos>`
(Barbero et al. 2025, Section 3.1 / Thm 3.2).

For a target token j and every source i <= j,

    s[i] = || d h_j^(L) / d h_i^(0) ||_F

where h^(L) is the residual stream after the last layer, *before* the final norm, and h^(0) is what
enters the first decoder layer: the engine's ``residual[0]``. For Gemma that is the embedding already
multiplied by sqrt(d_model) (the scale sits inside Gemma's embedding layer, so the ``inputs_embeds`` we
pass are the scaled embeddings); for GPT-2 it includes the learned position embedding (a constant
offset, which does not change the Jacobian). We differentiate with respect to that tensor itself, so the
choice holds for every architecture.

Estimator: with k probes u_r ~ N(0, I_d) on h_j^(L), one backward pass gives u_r^T J_{j<-i} for all i at
once, and s_i^2 ~= mean_r ||u_r^T J_{j<-i}||^2 (unbiased: E[u u^T] = I): the column ``s2``, with its
standard error ``s2_se``. Its square root ``s`` is biased low by an amount that depends on the block's rank
(sqrt(2/pi) = 0.80 for a rank-one block at k = 1), so comparisons use ``s2``. Cost: one forward and k backward
passes, i.e. at most k + 1 forward+backward passes (recorded in the summary). ``exact=True`` adds the
exact Jacobian from d backward passes (one per output coordinate; small models only).

Path-sum bound: from the same forward (eager kernel, `AttentionWeights` probe), B_{j<-i} =
[Abar^(L) ... Abar^(1)]_{j,i} with Abar^(l) = sum_h c_h A^(l,h) + I, for c_h = 1 (``B_sum``) and
c_h = 1/H (``B_mean``). It needs the full T x T weights, so it is for short inputs.

Only tokens up to the target are run: by causality later tokens cannot change h_j.

One unit per `<bos>` condition; the target is a text token, found in the text span (a suffix the
tokenizer appends, such as `<eos>`, is never the target).

Summary per condition: ``s_self`` (i = j), ``s_prefix`` (position 0 when it is a prefix), ``s_first_text``,
and over the sources all conditions share on equal terms — text tokens 1..j-1, leaving out position 0
(where the sink sits, with or without `<bos>`) and the target — ``s_mean``, ``B_mean_mean``, ``B_sum_mean``
and ``decay_slope`` (log10 s per token of distance; < 0: s decays with distance), and the unbiased
``s2_mean`` with its standard error ``s2_mean_se``. ``R_s_mean``, ``R_s2_mean`` and ``R_B_mean`` are the
strip / add ratios of those means; ``estimator`` in the summary says which numbers are unbiased.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch

from ..capture import AttentionWeights, CaptureEngine
from ..capture.engine import final_norm
from ..data.texts import SHAKESPEARE_PARAGRAPH as SHAKESPEARE
from ..errors import InputError
from ..metrics import sensitivity
from ..models.loader import LoadedModel
from .base import Context, Experiment, Result
from .functions import experiment_function
from .inputs import bos_conditions, check_context, check_length, encode_one, require_tokenizer, token_label
from .residual import check_residual_finite
from .settings import setting

ESTIMATOR_NOTE = ("s2 = mean over probes of ||u^T J||^2 is unbiased for ||J||_F^2 (s2_se: its standard error; "
                  "s2_mean, s2_mean_se, R_s2_mean over the shared sources); s = sqrt(s2), s_mean and R_s_mean are "
                  "biased low by a rank-dependent amount (0.80 for a rank-one block at 1 probe): compare s2")
PATH_SUM_MAX_TOKENS = 512  # L x H x T x T weights in memory
EXACT_MAX_DIM = 2048  # exact mode costs d backward passes


@dataclass
class OversquashContext(Context):
    directions: torch.Tensor  # [k, d]: the random probes, the same for every condition
    hidden_size: int
    final_norm: Any  # the model's final norm (with ``normed``), else None
    weights: AttentionWeights  # the attention weights, for the path-sum bound


class OversquashResult(Result):
    """Table ``sensitivity``: one row per bos x source position."""



@dataclass(frozen=True)
class Plan:
    """One `<bos>` condition: the tokens up to the target j (later ones cannot influence h_j: causal)."""

    bos: str
    ids: list[int]
    text_start: int
    target: int
    text: int = 0  # which text (of ``texts``; 0 for the single ``text``)


def _vjp(output: torch.Tensor, first: torch.Tensor, direction: torch.Tensor) -> torch.Tensor:
    """One backward pass: ``direction^T d output / d first`` for every source at once, [T, d] float64."""
    (grad,) = torch.autograd.grad(output, first, grad_outputs=direction.to(output.dtype), retain_graph=True)
    return grad[0].double()


def _inner(frame: pd.DataFrame) -> pd.Series:
    """The sources every condition shares on equal terms: text tokens 1 .. j-1. Position 0 is left out in
    all conditions (a `<bos>` prefix, or without one the first text token, where the sink then forms),
    and so is the target itself (its own residual path dominates)."""
    return (frame["text_position"] >= 1) & (frame["distance"] > 0)


def _inner_s2_mean(squares: np.ndarray | None, s2: np.ndarray, inner: np.ndarray) -> dict[str, float]:
    """Mean s^2 over the shared sources and its standard error (from per-probe means: the sources share
    their probes, so their errors are correlated); exact values have no error."""
    if squares is None:
        return {"s2_mean": float(s2[inner].mean()), "s2_mean_se": 0.0}
    mean, stderr = sensitivity.mean_and_stderr(squares[:, inner].mean(1))
    return {"s2_mean": float(mean), "s2_mean_se": float(stderr)}


def _shared_s2(shared: pd.DataFrame, bos: str) -> dict[str, float]:
    row = shared[(shared["bos"] == bos) & (shared.get("text", 0) == 0)].iloc[0]
    return {"s2_mean": float(row["s2_mean"]), "s2_mean_se": float(row["s2_mean_se"])}


def _checked_target(target: int, n_text: int) -> int:
    if not -n_text <= target < n_text:
        raise InputError(f"--target {target} is outside the {n_text} text tokens "
                         f"(use 0..{n_text - 1}, or -1 for the last)")
    return target % n_text


@dataclass
class Oversquash(Experiment[OversquashResult]):
    """Jacobian sensitivity of one text token to every earlier position, and the path-sum bound, per condition."""

    name = "oversquash"
    unit_label = "conditions"

    text: str = SHAKESPEARE
    target: int = setting(-1, "target text token j (-1: the last)")
    probes: int = setting(16, "random probes k (cost: 1 forward + k backward passes)")
    bos: tuple[str, ...] = ("add", "strip")
    exact: bool = setting(False, "also the exact Jacobian (d backward passes; small models)")
    path_sum: bool = setting(True, "attention path-sum bound B (needs the full weights)")
    max_tokens: int | None = 64
    seed: int = setting(0, "seed of the random probes")
    texts: tuple[str, ...] = ()  # several texts (independent units) instead of ``text``
    # also the sensitivity of the *normed* state norm(h_j^(L)) (one more backward per probe)
    normed: bool = setting(False, "also the sensitivity after the final norm (k more backward passes)")

    def __post_init__(self) -> None:  # settings checked before any model loads
        if self.probes < 0 or (self.probes == 0 and not self.exact):
            raise InputError("--probes must be at least 1 (or 0 together with --exact)")
        self.bos = tuple(bos_conditions(self.bos))

    def prepare(self, loaded: LoadedModel) -> OversquashContext:
        tokenizer = require_tokenizer(loaded, "oversquash")
        hidden_size = int(loaded.model.get_input_embeddings().embedding_dim)
        if self.exact and hidden_size > EXACT_MAX_DIM:
            raise InputError(f"--exact needs {hidden_size} backward passes per condition; it is for models with "
                             f"hidden size <= {EXACT_MAX_DIM} (use the probe estimator)")
        plans = []
        for index, text in enumerate(self.texts or (self.text,)):
            for mode in self.bos:
                encoded = encode_one(tokenizer, text, mode, self.max_tokens)
                start = encoded.text_start
                j = start + _checked_target(self.target, encoded.text_stop - start)
                if self.path_sum and j + 1 > PATH_SUM_MAX_TOKENS:
                    raise InputError(f"the path-sum bound needs the full attention matrices: {j + 1} tokens is more "
                                     f"than {PATH_SUM_MAX_TOKENS}; lower --max-tokens or --target, or pass "
                                     "--no-path-sum")
                plans.append(Plan(mode, encoded.ids[: j + 1], start, j, index))
        check_context(loaded, [], self.max_tokens)
        for plan in plans:
            check_length(loaded, len(plan.ids), f"the text with bos={plan.bos}")
        # the same probes for every condition, so differences between conditions are not probe noise
        directions = torch.from_numpy(
            sensitivity.gaussian_probes(max(self.probes, 1), hidden_size, self.seed))[:self.probes]
        return OversquashContext(loaded, plans, directions, hidden_size,
                                 final_norm(loaded.model) if self.normed else None, AttentionWeights())

    def open(self, ctx: OversquashContext) -> CaptureEngine:
        # `probes` is the number of random probes here, so the engine is built without `Experiment.probes()`
        return CaptureEngine(ctx.loaded, [ctx.weights] if self.path_sum else [],
                             path="eager" if self.path_sum else "auto")

    def describe(self, units: Sequence[Plan]) -> str:
        return f"bos={units[0].bos}"

    def measure(self, ctx: OversquashContext, engine: Any, units: Sequence[Plan]) -> dict[str, pd.DataFrame]:
        (plan,) = units
        mode, ids, start, j = plan.bos, plan.ids, plan.text_start, plan.target
        path_sum, exact, hidden_size = self.path_sum, self.exact, ctx.hidden_size
        with torch.no_grad():
            inputs = ctx.loaded.model.get_input_embeddings()(torch.tensor([ids])).detach()
        inputs.requires_grad_(True)
        out = engine.forward(inputs_embeds=inputs, grad=True, residual=True)
        check_residual_finite(out.residual[:, 0], f"bos={mode}")
        first = out.hidden_states[0]  # the tensor entering layer 1: residual[0]
        if not first.requires_grad:
            first = inputs
        output = out.residual[-1, 0, j]  # h_j^(L), before the final norm
        products = [_vjp(output, first, u).numpy() for u in ctx.directions]
        squares = sensitivity.probe_squares(np.stack(products)) if products else np.full((1, j + 1), np.nan)
        s2_normed = np.full(j + 1, np.nan)
        if ctx.final_norm is not None:  # what the LM head reads: the state after the final norm
            normed = ctx.final_norm(output[None])[0]
            s2_normed, _ = sensitivity.mean_and_stderr(sensitivity.probe_squares(np.stack(
                [_vjp(normed, first, u).numpy() for u in ctx.directions])))
        s2, s2_se = sensitivity.mean_and_stderr(squares)  # unbiased for ||J||_F^2, and its error
        s_probe = np.sqrt(s2)  # biased low, by a rank-dependent amount
        s_exact = np.full(j + 1, np.nan)
        if exact:
            exact_sq = torch.zeros(j + 1, dtype=torch.float64)
            for coordinate in range(hidden_size):
                basis = torch.nn.functional.one_hot(torch.tensor(coordinate), hidden_size)
                exact_sq += (_vjp(output, first, basis) ** 2).sum(-1)
            s_exact = exact_sq.sqrt().numpy()
            s2, s2_se = exact_sq.numpy(), np.zeros(j + 1)
        if path_sum:
            attention = ctx.weights.stacked()[:, 0]  # [L, H, T, T]
            b_sum = sensitivity.path_sum_bound(attention, j, "sum")
            b_mean = sensitivity.path_sum_bound(attention, j, "mean")
        else:
            b_sum = b_mean = np.full(j + 1, np.nan)
        del out, output, first, inputs  # free the graph before the next condition

        s = s_exact if exact else s_probe
        sources = np.arange(j + 1)
        distance = j - sources
        is_prefix = sources < start
        frame = pd.DataFrame({
            "text": plan.text,
            "bos": mode,
            "source": sources,
            "text_position": np.where(is_prefix, -1, sources - start),
            "token": ctx.tokenizer.convert_ids_to_tokens(ids),
            "is_prefix": is_prefix,
            "distance": distance,
            "s": s,
            "s_rel": s / np.nanmax(s),
            "s_probe": s_probe,
            "s_exact": s_exact,
            "s2": s2,
            "s2_se": s2_se,
            "s2_normed": s2_normed,
            "B_sum": b_sum,
            "B_mean": b_mean,
            "B_sum_rel": b_sum / np.nanmax(b_sum) if path_sum else b_sum,
            "B_mean_rel": b_mean / np.nanmax(b_mean) if path_sum else b_mean,
        })
        inner = _inner(frame).to_numpy()
        shared = pd.DataFrame([{"text": plan.text, "bos": mode,
                                **_inner_s2_mean(None if exact else squares, s2, inner)}])
        return {"sensitivity": frame, "shared_sources": shared}

    def passes(self, hidden_size: int) -> dict[str, int]:
        """Forward and backward passes per condition: one forward, k probes (+ d for the exact Jacobian)."""
        return {"forward": 1, "backward": self.probes + (hidden_size if self.exact else 0)}

    def summarise(self, ctx: OversquashContext, tables: dict[str, pd.DataFrame]) -> dict[str, Any]:
        every_text = tables["sensitivity"]
        table = every_text[every_text["text"] == 0]  # the per-condition details: of the first text
        probes, exact, path_sum, hidden_size = self.probes, self.exact, self.path_sum, ctx.hidden_size
        tokenizer, loaded, units = ctx.tokenizer, ctx.loaded, ctx.units
        per_condition, passes = {}, {}
        for plan in (u for u in units if u.text == 0):
            mode, ids, start, j = plan.bos, plan.ids, plan.text_start, plan.target
            frame = table[table["bos"] == mode].sort_values("source")
            s, s_probe, s_exact = (frame[c].to_numpy() for c in ("s", "s_probe", "s_exact"))
            b_mean = frame["B_mean"].to_numpy()
            earlier = frame[_inner(frame)]
            stats: dict[str, Any] = {
                "n_tokens": len(ids),
                "target_position": j,
                "first_token": tokenizer.convert_ids_to_tokens(int(ids[0])),
                "s_self": float(s[j]),
                "s_mean": float(earlier["s"].mean()),
                **_shared_s2(tables["shared_sources"], mode),
                "s_first_text": float(s[start]),
                "s_prefix": float(s[0]) if start else None,
                "decay_slope": sensitivity.log_slope(earlier["distance"], earlier["s"]),
                "B_mean_mean": float(earlier["B_mean"].mean()),
                "B_sum_mean": float(earlier["B_sum"].mean()),
                "B_mean_prefix": float(b_mean[0]) if start and path_sum else None,
                "decay_slope_B_mean": sensitivity.log_slope(earlier["distance"], earlier["B_mean"]),
            }
            if exact and probes:
                stats["probe_max_rel_error"] = float(np.nanmax(np.abs(s_probe - s_exact) / s_exact))
            per_condition[mode] = stats
            passes[mode] = self.passes(hidden_size)

        summary: dict[str, Any] = {
            "model": loaded.info.name,
            "text": self.texts[0] if self.texts else self.text,
            "n_texts": len(self.texts) or 1,
            "target_token": token_label(tokenizer, units[0].ids[-1]),
            "method": "exact Jacobian" if exact else f"{probes}-probe estimate",
            "estimator": ESTIMATOR_NOTE,
            "probes": probes,
            "seed": self.seed,
            "exact": exact,
            "n_layers": loaded.info.n_layers,
            "n_heads": loaded.info.n_heads,
            "conditions": per_condition,
            "passes": passes,
            "pass_budget": probes + 1 + (hidden_size if exact else 0),
            "h0": "residual[0]: the input of the first decoder layer (embedding scale included)",
            "hL": "residual[-1]: the last layer's output before the final norm",
        }
        if "add" in per_condition and "strip" in per_condition:
            add, strip = per_condition["add"], per_condition["strip"]
            summary["R_s_mean"] = sensitivity.spread_ratio(strip["s_mean"], add["s_mean"])
            summary["R_s2_mean"] = sensitivity.spread_ratio(strip["s2_mean"], add["s2_mean"])
            summary["R_B_mean"] = sensitivity.spread_ratio(strip["B_mean_mean"], add["B_mean_mean"])
            # per text source: is the no-bos sensitivity larger? (same text tokens in both conditions)
            paired = table[_inner(table)].pivot(
                index="text_position", columns="bos", values="s")
            summary["frac_sources_s_larger_without_bos"] = float((paired["strip"] > paired["add"]).mean())
            # per text: the mean s2 over its shared sources, strip / add (the texts are the independent units)
            by_text = every_text[_inner(every_text)].groupby(["text", "bos"])["s2"].mean().unstack("bos")
            summary["R_s2_mean_by_text"] = [float(r) for r in by_text["strip"] / by_text["add"]]
        return summary


oversquash = experiment_function(
    Oversquash, "oversquash",
    """Jacobian sensitivity s[i] of text token ``target`` (an index into the text tokens, -1 = last) to every
    earlier position, per `<bos>` condition, plus the attention path-sum bound (see the module docstring).

    ``probes``: k random probes for the estimator (0 only with ``exact``); ``max_tokens`` counts the whole
    sequence, prefix included (the paper's T = 64). ``texts``: several texts, each its own unit (instead of
    ``text``); ``normed``: also ``s2_normed``, the sensitivity of the state after the final norm (what the LM head
    reads), with the same probes.
    """, inputs="text")

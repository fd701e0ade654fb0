"""Interventions on the attention to the first token: one small class per kind, one registry.

Each class turns a layer's `AttentionInputs` into the inputs of the intervened attention — a mask that
hides a key, an additive logit on the first key, a zeroed value row — for the selected heads only. The
engine (`CaptureEngine.intervening`) runs the layer's kernel on them and replaces the call's inputs,
output, log-normaliser and weights *before any probe reads it*, so every probe measures the intervened
attention (α on the first token after ``scale:0.25`` is a quarter of the model's) and the model continues
with the intervened output. Heads that are not selected keep their output bit for bit.

The first token is found by position (`AttentionCall.locate_key`): during cached generation it is still
the first token, and a sliding-window layer that no longer holds it is left alone. Only queries after the
first token are touched (the first token's own query sees nothing else). A learned sink logit (gpt-oss) stays in the
normaliser throughout. The conditions' syntax lives in `sinkscope.conditions`.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import replace
from typing import TYPE_CHECKING, ClassVar

import torch

from ..attention.kernels import AttentionInputs, repeat_kv, run_kernel
from ..conditions import Intervention
from ..errors import UnsupportedModelError

if TYPE_CHECKING:
    from .engine import AttentionCall


class SinkIntervention:
    """Base: which heads of a layer, which queries, and `apply`; a subclass supplies `edit`."""

    kind: ClassVar[str] = ""
    changes_weights: ClassVar[bool] = True  # False: the weights stay the model's (probes read them as they are)

    def __init__(self, spec: Intervention) -> None:
        self.spec = spec

    def edit(self, call: AttentionCall, heads: torch.Tensor, hide: torch.Tensor, index: torch.Tensor
             ) -> AttentionInputs | None:
        """The layer's inputs under the intervention (None: nothing changes). ``heads`` bool [H]: the selected
        heads; ``hide`` bool [B, T]: the queries after the first token while it is among the keys; ``index``
        long [B]: the first token's key index per row."""
        raise NotImplementedError

    def heads(self, call: AttentionCall) -> torch.Tensor | None:
        """bool [H]: the heads this layer's call changes (None: the layer is not selected)."""
        if not self.spec.selects(call.layer):
            return None
        selected = torch.ones(call.n_heads, dtype=torch.bool, device=call.query.device)
        if self.spec.heads is not None:
            selected[:] = False
            selected[[h for h in self.spec.heads if h < call.n_heads]] = True
        return selected if bool(selected.any()) else None

    def apply(self, call: AttentionCall) -> bool:
        """Intervene on ``call`` in place (inputs, output, lse, weights, kernel); False where nothing changed."""
        heads = self.heads(call)
        if heads is None:
            return False
        first = call.batch.first_positions.to(call.query.device)
        index, present = call.locate_key(first)
        hide = (call.query_positions[None, :] > first[:, None]) & present[:, None]  # [B, T]
        inputs = self.edit(call, heads, hide, index)
        if inputs is None:
            return False
        # the fused kernel runs plain logits only; an added logit needs the chunked one
        kernel = "chunked" if call.kernel == "fused" and inputs.bias is not None else call.kernel
        result = run_kernel(kernel, inputs, call.options)
        chosen = heads[None, :, None] & hide[:, None, :]  # [B, H, T]: the queries after the first token
        call.output = torch.where(chosen[..., None], result.output, call.output)
        if not self.changes_weights:  # the attention is the model's; only what the first token writes changed
            return True
        call.lse = torch.where(chosen, result.lse, call.lse)
        if call.weights is not None and result.weights is not None:
            call.weights = torch.where(chosen[..., None], result.weights, call.weights)
        if call.model_inputs is None:
            call.model_inputs = call.inputs
        call.inputs, call.kernel = inputs, kernel
        return True


def _per_head_allowed(call: AttentionCall) -> torch.Tensor:
    """The call's mask as bool [B, H, T, S] (a copy, to edit for the selected heads)."""
    b, h, t, _ = call.query.shape
    return call.dense_allowed().expand(b, h, t, -1).clone()


def _hide_key(call: AttentionCall, heads: torch.Tensor, hide: torch.Tensor, index: torch.Tensor
              ) -> AttentionInputs | None:
    """Inputs with the key at ``index[b]`` hidden from the queries ``hide`` in the selected heads."""
    if not bool(hide.any()):
        return None
    allowed = _per_head_allowed(call)
    rows = torch.arange(allowed.shape[0], device=allowed.device)
    column = allowed[rows, :, :, index]  # [B, H, T]
    allowed[rows, :, :, index] = column & ~(hide[:, None, :] & heads[None, :, None])
    return replace(call.inputs, allowed=allowed)


class Knockout(SinkIntervention):
    """Key 0 hidden from every later query; the other weights renormalised (p_j / (1 - p_0))."""

    kind = "knockout"

    def edit(self, call: AttentionCall, heads: torch.Tensor, hide: torch.Tensor, index: torch.Tensor
             ) -> AttentionInputs | None:
        return _hide_key(call, heads, hide, index)


class Scale(SinkIntervention):
    """The dose: p_0' = λ p_0 and p_j' = (1 - λ p_0) softmax_{k≠0}(s)_j, as one extra logit on key 0.

    Any reweighting of key 0 that keeps the others' ratios is an additive logit b on key 0; solving
    p_0' = λ p_0 gives b = log λ + log(1 - p_0) - log(1 - λ p_0). log(1 - p_0) is taken as lse_rest - lse
    (lse_rest: the normaliser without key 0, from the knock-out's kernel call), never as log1p(-p_0), which
    is -inf wherever p_0 rounds to 1 in float32 (the strongest heads): that form would drop the other keys'
    weights, while this one goes continuously to the knock-out as λ -> 0.
    """

    kind = "scale"

    def edit(self, call: AttentionCall, heads: torch.Tensor, hide: torch.Tensor, index: torch.Tensor
             ) -> AttentionInputs | None:
        dose = float(self.spec.scale if self.spec.scale is not None else 1.0)
        if dose == 1.0:
            return None
        if dose == 0.0:
            return _hide_key(call, heads, hide, index)
        if not call.variant.normalised:
            raise UnsupportedModelError(f"scale:λ is not defined for {call.variant.name} attention (its rows do "
                                        "not sum to one); use knockout or zero-value")
        hidden = _hide_key(call, heads, hide, index)
        if hidden is None:
            return None
        lse = call.lse
        lse_rest = run_kernel(call.kernel, hidden, replace(call.options, keep_weights=False)).lse
        first = call.batch.first_positions.to(call.query.device)
        p0 = call.key_attention(first)  # [B, H, T]
        log_rest = lse_rest - lse  # log(1 - p_0), exact where p_0 rounds to 1
        logit = math.log(dose) + log_rest - torch.log(torch.exp(log_rest) + (1.0 - dose) * p0)
        chosen = hide[:, None, :] & heads[None, :, None]
        logit = torch.where(chosen & torch.isfinite(logit), logit, torch.zeros((), dtype=logit.dtype,
                                                                                 device=logit.device))
        b, h, t, _ = call.query.shape
        bias = torch.zeros(b, h, t, call.key.shape[2], dtype=lse.dtype, device=lse.device)
        bias[torch.arange(b, device=bias.device), :, :, index] = logit
        if call.inputs.bias is not None:
            bias = bias + call.inputs.bias.to(bias.dtype)
        return replace(call.inputs, bias=bias)


class ZeroValue(SinkIntervention):
    """The first token's value vector zeroed for every later query in the selected heads: attention still goes
    there (the weights, and what probes read of them, are the model's), it writes nothing. The first token's
    own query is left alone, so the sink itself is computed as in the model. With a subset of the heads of a
    GQA group, keys and values are expanded per query head for the recomputation."""

    kind = "zero-value"
    changes_weights = False

    def edit(self, call: AttentionCall, heads: torch.Tensor, hide: torch.Tensor, index: torch.Tensor
             ) -> AttentionInputs | None:
        first = call.batch.first_positions.to(call.query.device)
        _, present = call.locate_key(first)
        if not bool(present.any()):
            return None
        key, value = call.key, call.value
        n_rep = call.n_heads // key.shape[1]
        if not bool(heads.all()) and n_rep > 1:
            key, value = repeat_kv(key, n_rep), repeat_kv(value, n_rep)
        value = value.clone()
        rows = torch.arange(value.shape[0], device=value.device)[present]
        group = heads if value.shape[1] == call.n_heads else heads.view(value.shape[1], -1).any(-1)
        kept = torch.ones(value.shape[1], 1, device=value.device, dtype=value.dtype)
        kept[group] = 0
        value[rows, :, index[present]] = value[rows, :, index[present]] * kept
        return replace(call.inputs, key=key, value=value)


class RandomKey(SinkIntervention):
    """The equal-budget control: each query after the first token loses one key drawn uniformly among the
    keys it may see other than the first, renormalised over the rest. The drawn key is the same for every
    head of a layer, drawn anew per layer, from a generator seeded with the seed, the layer and the row's
    token ids — so it does not depend on batching, resuming or what ran before."""

    kind = "random-key"

    def __init__(self, spec: Intervention) -> None:
        super().__init__(spec)
        self.removed: dict[int, torch.Tensor] = {}  # layer -> long [B, T], the key each query lost (-1: none)

    def _uniforms(self, call: AttentionCall) -> torch.Tensor:
        """float64 [B, T]: one uniform draw per (row, query position), fixed by seed, layer and the row's ids."""
        positions = call.query_positions.cpu()
        draws = []
        for ids in call.batch.input_ids.cpu():
            digest = hashlib.sha256(f"{self.spec.seed}:{call.layer}:".encode() + ids.numpy().tobytes()).digest()
            generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)
            draws.append(torch.rand(int(positions.max()) + 1, generator=generator, dtype=torch.float64)[positions])
        return torch.stack(draws).to(call.query.device)

    def edit(self, call: AttentionCall, heads: torch.Tensor, hide: torch.Tensor, index: torch.Tensor
             ) -> AttentionInputs | None:
        b = call.query.shape[0]
        first = call.batch.first_positions.to(call.query.device)
        allowed = call.dense_allowed().expand(b, -1, -1, -1)
        # candidates: the keys each query may see (the mask is the same for every head), the first one excluded
        candidates = allowed[:, 0] & (call.key_positions[None, None, :] != first[:, None, None])  # [B, T, S]
        count = candidates.sum(-1)  # [B, T]
        lose = (call.query_positions[None, :] > first[:, None]) & (count > 0)
        if not bool(lose.any()):
            return None
        rank = (self._uniforms(call) * count).floor().long().clamp(max=(count - 1).clamp_min(0))
        chosen = (candidates & (candidates.cumsum(-1, dtype=torch.int32) == (rank + 1)[..., None])).int().argmax(-1)
        self.removed[call.layer] = torch.where(lose, chosen, torch.full_like(chosen, -1)).cpu()
        drop = torch.zeros_like(candidates).scatter_(2, chosen[..., None], lose[..., None])  # [B, T, S]
        per_head = _per_head_allowed(call)
        per_head &= ~(drop[:, None] & heads[None, :, None, None])
        return replace(call.inputs, allowed=per_head)


INTERVENTION_TYPES: dict[str, type[SinkIntervention]] = {
    cls.kind: cls for cls in (Knockout, Scale, ZeroValue, RandomKey)
}


def make_intervention(spec: Intervention) -> SinkIntervention:
    """The intervention object for one parsed `Intervention`."""
    return INTERVENTION_TYPES[spec.kind](spec)

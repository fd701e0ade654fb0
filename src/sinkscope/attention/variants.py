"""Attention variants: how a layer turns its logits s_ij into weights p_ij.

``softmax``       the standard  p_ij = exp(s_ij) / sum_k exp(s_ik)
``off_by_one``    softmax with an implicit extra zero logit: p_ij = exp(s_ij) / (1 + sum_k exp(s_ik)),
                  so a head can attend to "nothing" (Miller 2023, "softmax1")
``learned_sink``  softmax with a learned per-head sink logit b_h in the normaliser (gpt-oss style)
``sigmoid``       p_ij = sigmoid(s_ij + b), no normalisation over keys (Gu et al. 2024 find no sinks form)
``softpick``      p_ij = relu(e^s_ij - 1) / sum_k |e^s_ik - 1|: rows sum to at most one, so a head can put
                  weight nowhere (Zuhri et al. 2025)
``gated_headwise``, ``gated_elementwise``
                  softmax, then each head's output multiplied by a sigmoid gate computed from the layer's
                  input, one scalar per head or one per output dimension (Qiu et al. 2025, as in Qwen3-Next):
                  the gate, not a sink, can switch a head off

Each variant is an `AttentionVariant` in the `VARIANTS` registry. It declares what the capture engine
needs: the reference weights formula, the kernel it needs (``None``: any softmax kernel), its extra
normaliser logit (a sink, per head) or logit bias, and how it sets itself up on an attention module.
A module says which variant it computes with ``module.attention_variant`` (a registry name; absent =
softmax); `module_variant` resolves it. The lab's models carry their variant this way; the engine calls
the variant's methods and never reads its parameters by name.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch

from ..errors import UnsupportedModelError
from .kernels import softmax_weights, softpick_terms

VARIANT_ATTRIBUTE = "attention_variant"  # on an attention module: the name of its variant in VARIANTS


class AttentionVariant:
    """Softmax attention; subclasses override what their normalisation changes."""

    name: ClassVar[str] = "softmax"
    kernel: ClassVar[str | None] = None  # the kernel it needs (a `kernels.KERNELS` name); None = any softmax one
    normalised: ClassVar[bool] = True  # each row (with its extra logit) sums to one: lse, entropy are defined

    def extra_logit(self, module: Any) -> torch.Tensor | None:
        """Per-head logit [H] that joins the normaliser without a value (a sink), or None."""
        return None

    def logit_bias(self, module: Any) -> float | None:
        """A constant added to every logit before a non-normalised activation (sigmoid), or None."""
        return None

    def setup(self, module: Any, n_heads: int, logit_bias: float | None) -> None:
        """Give an attention module what this variant needs (its parameters) and name the variant on it."""
        setattr(module, VARIANT_ATTRIBUTE, self.name)

    def weights(self, scores: torch.Tensor, allowed: torch.Tensor, extra_logit: torch.Tensor | None = None,
                logit_bias: float | None = None) -> torch.Tensor:
        """The explicit formula: weights [B, H, T, S] from logits [B, H, T, S] and bool ``allowed``."""
        return softmax_weights(scores, allowed, extra_logit)[0]

    def key_weight(self, scores: torch.Tensor, lse: torch.Tensor, logit_bias: float | None) -> torch.Tensor:
        """The weight of one key given its logits [B, H, T] and the rows' log-normaliser ``lse`` [B, H, T]."""
        return torch.exp(scores - lse)

    def gate(self, module: Any) -> torch.Tensor | None:
        """The output gate of the module's current call, [B, H, T, 1 | Dv] in (0, 1), or None (no gate)."""
        return None

    def gate_output(self, module: Any, output: torch.Tensor) -> torch.Tensor:
        """The attention output [B, H, T, Dv] as the layer passes it on (gated variants multiply it)."""
        gate = self.gate(module)
        return output if gate is None else output * gate.to(output.dtype)


class Softmax(AttentionVariant):
    name = "softmax"


class _SinkLogitVariant(AttentionVariant):
    """Softmax with one more logit per head in the normaliser, kept on the module as ``sink_logits`` [H]."""

    def extra_logit(self, module: Any) -> torch.Tensor | None:
        sink_logits = getattr(module, "sink_logits", None)
        if not isinstance(sink_logits, torch.Tensor):
            raise UnsupportedModelError(f"{type(module).__name__} is marked {self.name} but has no sink logits")
        return sink_logits

    def weights(self, scores: torch.Tensor, allowed: torch.Tensor, extra_logit: torch.Tensor | None = None,
                logit_bias: float | None = None) -> torch.Tensor:
        if extra_logit is None:
            raise ValueError(f"{self.name} attention needs its sink logits")
        return super().weights(scores, allowed, extra_logit, logit_bias)


class OffByOne(_SinkLogitVariant):
    name = "off_by_one"

    def setup(self, module: Any, n_heads: int, logit_bias: float | None) -> None:
        super().setup(module, n_heads, logit_bias)
        weight = module.q_proj.weight
        module.register_buffer("sink_logits", torch.zeros(n_heads, dtype=weight.dtype, device=weight.device),
                               persistent=False)


class LearnedSink(_SinkLogitVariant):
    name = "learned_sink"

    def setup(self, module: Any, n_heads: int, logit_bias: float | None) -> None:
        super().setup(module, n_heads, logit_bias)
        weight = module.q_proj.weight
        module.sink_logits = torch.nn.Parameter(torch.zeros(n_heads, dtype=weight.dtype, device=weight.device))


class Sigmoid(AttentionVariant):
    name = "sigmoid"
    kernel = "sigmoid"
    normalised = False

    def logit_bias(self, module: Any) -> float | None:
        bias = getattr(module, "sigmoid_bias", None)
        if bias is None:
            raise UnsupportedModelError(f"{type(module).__name__} is marked sigmoid but has no sigmoid bias")
        return float(bias)

    def setup(self, module: Any, n_heads: int, logit_bias: float | None) -> None:
        if logit_bias is None:
            raise ValueError("sigmoid attention needs a bias")
        super().setup(module, n_heads, logit_bias)
        module.sigmoid_bias = float(logit_bias)

    def weights(self, scores: torch.Tensor, allowed: torch.Tensor, extra_logit: torch.Tensor | None = None,
                logit_bias: float | None = None) -> torch.Tensor:
        if logit_bias is None:
            raise ValueError("sigmoid attention needs a bias")
        return torch.sigmoid(scores + logit_bias) * allowed

    def key_weight(self, scores: torch.Tensor, lse: torch.Tensor, logit_bias: float | None) -> torch.Tensor:
        assert logit_bias is not None
        return torch.sigmoid(scores + logit_bias)


class Softpick(AttentionVariant):
    name = "softpick"
    kernel = "softpick"
    normalised = False  # rows sum to at most one: no entropy, no softmax normaliser

    def weights(self, scores: torch.Tensor, allowed: torch.Tensor, extra_logit: torch.Tensor | None = None,
                logit_bias: float | None = None) -> torch.Tensor:
        numerators, denominator, _ = softpick_terms(scores.masked_fill(~allowed, float("-inf")))
        return numerators / denominator

    def key_weight(self, scores: torch.Tensor, lse: torch.Tensor, logit_bias: float | None) -> torch.Tensor:
        return torch.relu(torch.exp(scores - lse) - torch.exp(-lse))


GATE_MODULE = "output_gate"  # on a gated attention module: the linear map from its input to the gate logits


class _Gated(AttentionVariant):
    """Softmax attention whose output is gated: sigmoid(W_g x + b_g) per head (or per output dimension),
    x the hidden state the attention module was called with (kept by a forward pre-hook for the call)."""

    per_dimension: ClassVar[bool] = False

    def setup(self, module: Any, n_heads: int, logit_bias: float | None) -> None:
        super().setup(module, n_heads, logit_bias)
        weight = module.q_proj.weight
        head_dim = int(module.head_dim)
        gate = torch.nn.Linear(weight.shape[1], n_heads * (head_dim if self.per_dimension else 1), bias=True,
                               dtype=weight.dtype, device=weight.device)
        torch.nn.init.zeros_(gate.weight)
        torch.nn.init.constant_(gate.bias, 3.0)  # starts nearly open (sigmoid(3) = 0.95): softmax at first
        module.add_module(GATE_MODULE, gate)
        module.gate_shape = (n_heads, head_dim if self.per_dimension else 1)
        if not getattr(module, "_gate_hooked", False):
            module.register_forward_pre_hook(_keep_gate_input, with_kwargs=True)
            module._gate_hooked = True

    def gate(self, module: Any) -> torch.Tensor | None:
        hidden = getattr(module, "_gate_input", None)
        if hidden is None:
            raise UnsupportedModelError(f"{type(module).__name__} is gated but was called without its input")
        logits = getattr(module, GATE_MODULE)(hidden)  # [B, T, H * (1 | D)]
        b, t, _ = logits.shape
        heads, width = module.gate_shape
        return torch.sigmoid(logits.view(b, t, heads, width).transpose(1, 2))  # [B, H, T, 1 | D]


def _keep_gate_input(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    module._gate_input = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]


class GatedHeadwise(_Gated):
    name = "gated_headwise"


class GatedElementwise(_Gated):
    name = "gated_elementwise"
    per_dimension = True


VARIANTS: dict[str, AttentionVariant] = {}


def register_variant(variant: AttentionVariant) -> AttentionVariant:
    """Add a variant to the registry under its name (modules then select it by that name)."""
    VARIANTS[variant.name] = variant
    return variant


for _variant in (Softmax(), OffByOne(), LearnedSink(), Sigmoid(), Softpick(), GatedHeadwise(), GatedElementwise()):
    register_variant(_variant)
VARIANT_NAMES = tuple(VARIANTS)
SOFTMAX = VARIANTS["softmax"]


# Models that gate each head's output themselves, after the attention function (so the engine never applies
# these gates, it only reports them): attention class name -> the gate [B, H, T, D] in (0, 1) from the output
# of the module's query projection, which the engine keeps for the call (`NATIVE_GATE_INPUT`).
NATIVE_GATE_INPUT = "q_proj"
_NATIVE_PROJECTION = "_sinkscope_gate_projection"


def _query_half_gate(module: Any, projected: torch.Tensor) -> torch.Tensor:
    """Qwen3-Next: q_proj gives [query | gate] per head; the model multiplies its output by sigmoid(gate)."""
    b, t, _ = projected.shape
    head_dim = int(module.head_dim)
    return torch.sigmoid(projected.view(b, t, -1, 2 * head_dim)[..., head_dim:].transpose(1, 2))


NATIVE_GATES = {"Qwen3NextAttention": _query_half_gate}


def keep_native_gate_input(module: Any) -> Any:
    """Hook ``module``'s query projection so its output is kept for `native_gate` (returns the handle),
    or None when the module's class does not gate its output itself."""
    if type(module).__name__ not in NATIVE_GATES:
        return None

    def keep(_projection: Any, _args: Any, output: torch.Tensor) -> None:
        setattr(module, _NATIVE_PROJECTION, output)

    return getattr(module, NATIVE_GATE_INPUT).register_forward_hook(keep)


def native_gate(module: Any) -> torch.Tensor | None:
    """The output gate [B, H, T, D] a model's own attention module applies in its current call, or None."""
    projected = getattr(module, _NATIVE_PROJECTION, None)
    return None if projected is None else NATIVE_GATES[type(module).__name__](module, projected)


def drop_native_gate_input(module: Any) -> None:
    """Forget the kept projection once the call's probes are done (it is one layer's [B, T, 2 H D])."""
    if getattr(module, _NATIVE_PROJECTION, None) is not None:
        setattr(module, _NATIVE_PROJECTION, None)


def module_variant(module: Any) -> AttentionVariant:
    """The variant an attention module computes with (softmax unless it names another)."""
    name = getattr(module, VARIANT_ATTRIBUTE, None)
    if name is None:
        return SOFTMAX
    if name not in VARIANTS:
        raise UnsupportedModelError(f"{type(module).__name__}: unknown attention variant {name!r} "
                                    f"(known: {', '.join(VARIANTS)})")
    return VARIANTS[name]


def default_sigmoid_bias(context_length: int) -> float:
    """b = -log(n): each key starts near weight 1/n, as softmax over n keys would (Ramapuram et al. 2024)."""
    return -math.log(max(int(context_length), 2))

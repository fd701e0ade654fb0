"""The capture engine: one registered attention function through which every probe sees attention.

While a `CaptureEngine` is active, the model's attention implementation is switched to ``"sinkscope"``
(transformers' AttentionInterface). Each attention layer then hands its own q, k, v (after rotary, q/k
norms; k/v in their GQA layout), mask, scale, soft-cap and learned sink logits to the engine, which

1. computes the layer's output and softmax log-normaliser with a kernel (`kernels.py`),
2. gives an `AttentionCall` to each probe in turn; a probe may read anything and may replace the output,
3. returns the output to the model.

On exit the original implementation is restored, so the model computes exactly what it did before.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import UnsupportedModelError
from ..models.loader import LoadedModel, check_attention_supported, text_config
from . import kernels

IMPLEMENTATION = "sinkscope"
PATHS = ("auto", "fused", "chunked", "eager")

# Keyword arguments attention layers pass that do not change the attention math (or that we handle).
_NEUTRAL_KWARGS = {
    "dropout", "scaling", "position_ids", "use_cache", "output_router_logits", "output_attentions",
    "cache_position", "past_key_values", "past_key_value", "layer_idx", "position_embeddings",
    "token_type_ids", "return_dict", "output_hidden_states", "sliding_window",
}
_HANDLED_KWARGS = {"softcap", "s_aux", "sinks", "position_bias", "is_causal"}


@dataclass
class BatchInfo:
    """What probes need to know about the batch being run."""

    input_ids: torch.Tensor  # [B, T]
    attention_mask: torch.Tensor  # [B, T] 1 = real token
    first_positions: torch.Tensor  # [B] index of each row's first real token (left padding moves it)

    @property
    def query_valid(self) -> torch.Tensor:
        return self.attention_mask.bool()


@dataclass
class AttentionCall:
    """One attention layer's call, as probes see it. Shapes: query [B, H, T, D], key/value [B, KVH, S, D]."""

    layer: int
    layer_type: str
    module: Any
    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    allowed: torch.Tensor | None  # bool [B, 1|H, T, S]; None = plain causal (or all, for one query)
    causal: bool
    scaling: float
    softcap: float | None
    bias: torch.Tensor | None  # additive logits bias [B|1, H|1, T, S]
    sinks: torch.Tensor | None  # learned per-head sink logits [H] (gpt-oss)
    batch: BatchInfo
    output: torch.Tensor | None = None  # [B, H, T, Dv]
    lse: torch.Tensor | None = None  # [B, H, T] log of the full softmax normaliser (sink included)
    weights: torch.Tensor | None = None  # [B, H, T, S] on the eager path only
    engine: Any = None  # the CaptureEngine running this call
    sigmoid_bias: float | None = None  # set for sigmoid attention (lab variant): p_ij = sigmoid(s_ij + bias)

    @property
    def n_heads(self) -> int:
        return self.query.shape[1]

    def key_allowed(self, key_index: torch.Tensor) -> torch.Tensor:
        """bool [B, 1|H, T]: which queries may attend to key `key_index[b]` of row b."""
        b, _, t, _ = self.query.shape
        s = self.key.shape[2]
        key_index = key_index.to(self.query.device)
        if self.allowed is None:
            queries = torch.arange(t, device=self.query.device) + (s - t)
            visible = queries[None, :] >= key_index[:, None] if self.causal and t > 1 else (
                torch.ones(b, t, dtype=torch.bool, device=self.query.device)
            )
            return (visible & (key_index[:, None] < s))[:, None, :]
        allowed = self.allowed.expand(b, -1, -1, -1)
        index = key_index.clamp(max=s - 1).view(-1, 1, 1, 1).expand(*allowed.shape[:3], 1)
        return torch.gather(allowed, 3, index)[..., 0] & (key_index < s).view(-1, 1, 1)

    def key_scores(self, key_index: torch.Tensor) -> torch.Tensor:
        """float [B, H, T]: the logit each query gives key `key_index[b]`, as the model computes it."""
        n_rep = self.n_heads // self.key.shape[1]
        index = key_index.clamp(max=self.key.shape[2] - 1).to(self.key.device)
        keys = self.key[torch.arange(self.key.shape[0]), :, index]  # [B, KVH, D]
        keys = keys.repeat_interleave(n_rep, dim=1)
        dtype = self.lse.dtype if self.lse is not None else torch.float32
        scores = torch.einsum("bhtd,bhd->bht", self.query.to(dtype), keys.to(dtype)) * self.scaling
        if self.softcap is not None:
            scores = torch.tanh(scores / self.softcap) * self.softcap
        if self.bias is not None:
            bias = self.bias.expand(self.query.shape[0], self.n_heads, *self.bias.shape[2:])
            scores = scores + torch.gather(
                bias, 3, index.view(-1, 1, 1, 1).expand(*bias.shape[:3], 1)
            )[..., 0].to(dtype)
        return scores

    def key_attention(self, key_index: torch.Tensor) -> torch.Tensor:
        """float [B, H, T]: the attention weight each query puts on key `key_index[b]` (0 where masked)."""
        allowed = self.key_allowed(key_index)
        if self.sigmoid_bias is not None and self.weights is None:
            attention = torch.sigmoid(self.key_scores(key_index) + self.sigmoid_bias)
            return torch.where(allowed, attention, torch.zeros((), dtype=attention.dtype, device=attention.device))
        if self.weights is not None:
            index = key_index.clamp(max=self.key.shape[2] - 1).to(self.weights.device)
            weights = torch.gather(self.weights, 3, index.view(-1, 1, 1, 1).expand(*self.weights.shape[:3], 1))
            return (weights[..., 0] * allowed).float()
        attention = torch.exp(self.key_scores(key_index) - self.lse)
        return torch.where(allowed, attention, torch.zeros((), dtype=attention.dtype, device=attention.device))

    def weighted_sum(self, values: torch.Tensor) -> torch.Tensor:
        """sum_j p_ij values_j for per-key values [B, KVH, S, Dx]: one more attention call with other values.
        The result is [B, H, T, Dx], normalised like the layer's own attention (a learned sink adds nothing)."""
        self._require_softmax("a weighted sum through the softmax normaliser")
        if self.weights is not None:
            n_rep = self.n_heads // values.shape[1]
            return torch.matmul(self.weights.to(self.lse.dtype), kernels.repeat_kv(values, n_rep).to(self.lse.dtype))
        fused = self.engine.kernel_for(self) == "fused"
        allowed = self.allowed if fused else self.engine._dense_allowed(self)
        width = values.shape[-1]
        if fused:
            if width < self.query.shape[-1]:  # the fused kernel wants values as wide as the keys: pad with zeros
                values = torch.nn.functional.pad(values, (0, self.query.shape[-1] - width))
            result = kernels.fused_attention(self.query, self.key, values.to(self.query.dtype), allowed, self.scaling,
                                             self.causal, None, self.engine.chunk_size,
                                             torch.float64 if self.lse.dtype == torch.float64 else None)
        else:
            result = kernels.chunked_attention(self.query, self.key, values, allowed, self.scaling, self.softcap,
                                               self.bias, None, self.engine.chunk_size, self.lse.dtype)
        share = torch.exp(result.lse.to(self.lse.dtype) - self.lse).nan_to_num(0.0)
        return result.output[..., :width].to(self.lse.dtype) * share[..., None]

    def attend_with(self, allowed: torch.Tensor) -> kernels.KernelOutput:
        """Recompute this layer's attention under another mask (bool [B, 1|H, T, S]), same kernel choice.
        For interventions that hide keys: exact, unlike subtracting a key's share from the output."""
        sinks = None if self.sinks is None else self.sinks.to(self.engine.compute_dtype)
        if self.sigmoid_bias is not None:
            return kernels.sigmoid_attention(self.query, self.key, self.value, allowed, self.scaling,
                                             self.sigmoid_bias, self.engine.chunk_size, self.engine.compute_dtype,
                                             self.engine.path == "eager")
        if self.engine.kernel_for(self) == "fused":
            return kernels.fused_attention(self.query, self.key, self.value, allowed, self.scaling, self.causal, sinks,
                                           self.engine.chunk_size,
                                           torch.float64 if self.engine.compute_dtype == torch.float64 else None)
        if self.engine.kernel_for(self) == "chunked":
            return kernels.chunked_attention(self.query, self.key, self.value, allowed, self.scaling, self.softcap,
                                             self.bias, sinks, self.engine.chunk_size, self.engine.compute_dtype)
        return kernels.eager_attention(self.query, self.key, self.value, allowed, self.scaling, self.softcap,
                                       self.bias, sinks, self.engine.compute_dtype)

    def entropy_and_max(self, with_max: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(entropy [B, H, T], max weight [B, H, T] or None) of each query's attention distribution.
        Entropy is O(n) memory on the fused path (see `kernels.entropy_fused`); the max weight needs a
        chunked pass over the logits (O(chunk x n) memory, O(n^2) time)."""
        self._require_softmax("attention entropy")
        if self.weights is not None:
            p = self.weights.to(self.lse.dtype)
            entropy = -(p * torch.log(p)).nan_to_num(0.0).sum(-1)
            sink = self.sink_attention()
            if sink is not None:
                entropy = entropy - (sink * torch.log(sink)).nan_to_num(0.0)
            return entropy, p.amax(-1) if with_max else None
        kind = self.engine.kernel_for(self)
        if kind == "fused" and not with_max:
            return kernels.entropy_fused(self.query, self.key, self.allowed, self.scaling, self.causal, self.lse,
                                         self.sinks, self.engine.chunk_size), None
        entropy, maximum = kernels.row_statistics_chunked(
            self.query, self.key, self.engine._dense_allowed(self), self.scaling, self.lse, self.softcap, self.bias,
            self.sinks, self.engine.chunk_size)
        if kind == "fused":  # the linear-memory formula is the one reported on the fused path
            entropy = kernels.entropy_fused(self.query, self.key, self.allowed, self.scaling, self.causal, self.lse,
                                            self.sinks, self.engine.chunk_size)
        return entropy, maximum if with_max else None

    def _require_softmax(self, what: str) -> None:
        if self.sigmoid_bias is not None:
            raise UnsupportedModelError(f"{what} is not defined for sigmoid attention (its rows do not sum to one)")

    def sink_attention(self) -> torch.Tensor | None:
        """float [B, H, T]: the share of each query's attention the learned sink logit takes (gpt-oss)."""
        if self.sinks is None:
            return None
        return torch.exp(self.sinks.to(self.lse.dtype)[None, :, None] - self.lse)


class Probe:
    """Base class of everything that reads (or, for interventions, edits) attention through the engine."""

    def start(self, batch: BatchInfo, engine: CaptureEngine) -> None:
        """Called before each forward pass."""

    def on_attention(self, call: AttentionCall) -> torch.Tensor | None:
        """Called once per layer per forward; return a tensor [B, H, T, Dv] to replace the output."""
        return None

    def finish(self) -> None:
        """Called after each forward pass."""


_active: list[CaptureEngine] = []


def _sinkscope_attention(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                         attention_mask: torch.Tensor | None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    if not _active:
        raise RuntimeError("the 'sinkscope' attention implementation is only usable inside a CaptureEngine")
    return _active[-1].attend(module, query, key, value, attention_mask, **kwargs)


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(IMPLEMENTATION, _sinkscope_attention)
    # sdpa-style masks: boolean, and None when plain causal attention needs no mask (no padding, no window).
    AttentionMaskInterface.register(IMPLEMENTATION, sdpa_mask)


class CaptureEngine:
    """Run a model with probes attached to every attention layer.

    ``path``: ``auto``/``fused`` use the fused log-sum-exp kernel where it can express the layer and
    the chunked kernel elsewhere (soft-capping, additive biases, non-CPU devices); ``chunked`` and
    ``eager`` force those kernels (``eager`` materialises the full weights: the reference).
    ``precision``: ``float32`` or ``float64`` for the kernel arithmetic.
    """

    def __init__(self, model: LoadedModel | Any, probes: Sequence[Probe] = (), *, path: str = "auto",
                 chunk_size: int = 1024, precision: str = "float32") -> None:
        if path not in PATHS:
            raise ValueError(f"path must be one of {PATHS}, not {path!r}")
        if precision not in ("float32", "float64"):
            raise ValueError("precision must be 'float32' or 'float64'")
        self.model = model.model if isinstance(model, LoadedModel) else model
        check_attention_supported(self.model)
        self.probes = list(probes)
        self.path = path
        self.chunk_size = int(chunk_size)
        self.compute_dtype = torch.float64 if precision == "float64" else torch.float32
        config = text_config(self.model)
        self.n_layers = int(config.num_hidden_layers)
        self.layer_types = list(getattr(config, "layer_types", None) or ["full_attention"] * self.n_layers)
        self.batch: BatchInfo | None = None
        self.calls_seen = 0
        self.kernels_used: set[str] = set()
        self._saved: Any = None

    # -- context management -------------------------------------------------------------------
    def __enter__(self) -> CaptureEngine:
        if _active:
            raise RuntimeError("capture engines do not nest")
        _register()
        self._saved = self.model.config._attn_implementation
        self.model.set_attn_implementation(IMPLEMENTATION)
        _active.append(self)
        return self

    def __exit__(self, *exc: Any) -> None:
        _active.remove(self)
        self.model.set_attn_implementation(self._saved)

    # -- running --------------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None, *,
                inputs_embeds: torch.Tensor | None = None, logits: bool = False, residual: bool = False,
                grad: bool = False) -> Any:
        """Run one batch. Position ids follow the attention mask, so a padded row is computed exactly
        as it would be alone.

        Returns the base model's output (``logits=False``: the LM head is skipped, which for Gemma's 262k
        vocabulary is most of the cost) or the causal-LM output with logits. ``residual=True`` adds
        ``output.residual``: the residual stream [layers + 1, B, T, d] — the embeddings, then every
        layer's output, the last taken *before* the final norm. ``grad=True`` runs with autograd (e.g.
        for Jacobians w.r.t. ``inputs_embeds``); otherwise under inference mode.
        """
        if self not in _active:
            raise RuntimeError("use the engine as a context manager: with CaptureEngine(...) as engine")
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        device = next(self.model.parameters()).device
        reference = input_ids if input_ids is not None else inputs_embeds[..., 0]
        if attention_mask is None:
            attention_mask = torch.ones(reference.shape, dtype=torch.long, device=device)
        attention_mask = attention_mask.to(device)
        if not bool((attention_mask.sum(-1) > 0).all()):
            raise ValueError("every row of the batch needs at least one real token")
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        ids = input_ids.to(device) if input_ids is not None else torch.zeros(reference.shape, dtype=torch.long)
        self.batch = BatchInfo(ids, attention_mask, attention_mask.long().argmax(-1))
        for probe in self.probes:
            probe.start(self.batch, self)
        self.calls_seen = 0
        self.model.eval()
        runner = self.model if logits else self.model.base_model
        inputs: dict[str, Any] = {"attention_mask": attention_mask, "position_ids": position_ids, "use_cache": False}
        if input_ids is not None:
            inputs["input_ids"] = ids
        else:
            inputs["inputs_embeds"] = inputs_embeds.to(device)
        pre_norm: list[torch.Tensor] = []
        hook = None
        if residual:
            inputs["output_hidden_states"] = True
            hook = final_norm(self.model).register_forward_pre_hook(lambda _m, args: pre_norm.append(args[0]))
        try:
            with torch.enable_grad() if grad else torch.inference_mode():
                output = runner(**inputs)
        finally:
            if hook is not None:
                hook.remove()
        if self.calls_seen != self.n_layers:
            raise UnsupportedModelError(
                f"{type(self.model).__name__}: captured {self.calls_seen} attention calls for {self.n_layers} "
                "layers; its attention does not all go through transformers' attention interface"
            )
        if residual:
            # hidden_states[-1] is after the final norm; the residual stream proper ends before it.
            output.residual = torch.stack(list(output.hidden_states[:-1]) + [pre_norm[-1]])
        for probe in self.probes:
            probe.finish()
        return output

    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs: Any) -> Any:
        """``model.generate`` with the probes attached (e.g. an intervention during decoding). Each decoding
        step's attention call sees the cached keys; the first token stays the first key."""
        if self not in _active:
            raise RuntimeError("use the engine as a context manager: with CaptureEngine(...) as engine")
        device = next(self.model.parameters()).device
        input_ids = input_ids.to(device)
        attention_mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(device)
        self.batch = BatchInfo(input_ids, attention_mask, attention_mask.long().argmax(-1))
        for probe in self.probes:
            probe.start(self.batch, self)
        self.model.eval()
        with torch.inference_mode():
            output = self.model.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        for probe in self.probes:
            probe.finish()
        return output

    # -- the attention function -----------------------------------------------------------------
    def attend(self, module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               attention_mask: torch.Tensor | None, **kwargs: Any) -> tuple[torch.Tensor, None]:
        unknown = [k for k, v in kwargs.items()
                   if k not in _NEUTRAL_KWARGS | _HANDLED_KWARGS and v is not None]
        if unknown:
            raise UnsupportedModelError(
                f"{type(module).__name__} passes {unknown} to its attention function; sinkscope does not "
                "know how these change the attention and refuses rather than report wrong numbers"
            )
        layer = getattr(module, "layer_idx", None)
        layer = self.calls_seen if layer is None else int(layer)
        self.calls_seen += 1
        causal = bool(kwargs.get("is_causal") if kwargs.get("is_causal") is not None
                      else getattr(module, "is_causal", True))
        t, s = query.shape[2], key.shape[2]
        if attention_mask is None and causal and 1 < t < s:
            # As transformers' SDPA path does: keys past the queries are padding of a static cache.
            key, value, s = key[:, :, :t], value[:, :, :t], t
        allowed, bias = None, kwargs.get("position_bias")
        if attention_mask is not None:
            if attention_mask.dtype == torch.bool:
                allowed = attention_mask
            else:  # an additive float mask: keep its values as a bias
                allowed = attention_mask > torch.finfo(attention_mask.dtype).min / 2
                bias = attention_mask if bias is None else bias + attention_mask
            allowed = allowed[..., :s]
        sinks = kwargs.get("s_aux", kwargs.get("sinks"))
        # Lab attention variants (sinkscope.lab.variants) carry their normalisation on the module.
        variant = getattr(module, "attention_variant", "softmax")
        if sinks is None:
            sinks = getattr(module, "sink_logits", None)
        softcap = kwargs.get("softcap")
        call = AttentionCall(
            layer=layer, layer_type=self.layer_types[layer] if layer < len(self.layer_types) else "full_attention",
            module=module, query=query, key=key, value=value, allowed=allowed, causal=causal,
            scaling=float(kwargs.get("scaling") or query.shape[-1] ** -0.5), softcap=softcap,
            bias=None if bias is None else bias[..., :s], sinks=sinks, batch=self.batch, engine=self,
            sigmoid_bias=float(module.sigmoid_bias) if variant == "sigmoid" else None,
        )
        self._run_kernel(call)
        for probe in self.probes:
            replaced = probe.on_attention(call)
            if replaced is not None:
                call.output = replaced
        return call.output.transpose(1, 2).contiguous(), None

    def _dense_allowed(self, call: AttentionCall) -> torch.Tensor:
        if call.allowed is not None:
            return call.allowed
        t, s = call.query.shape[2], call.key.shape[2]
        if not call.causal or t == 1:
            return torch.ones(1, 1, t, s, dtype=torch.bool, device=call.query.device)
        queries = torch.arange(t, device=call.query.device)[:, None] + (s - t)
        return (queries >= torch.arange(s, device=call.query.device)[None, :])[None, None]

    def kernel_for(self, call: AttentionCall) -> str:
        """Which kernel computes this call: the fused one wherever it can express the layer."""
        if call.sigmoid_bias is not None:
            return "sigmoid"
        if self.path not in ("auto", "fused"):
            return self.path
        if call.softcap is None and call.bias is None and call.query.device.type == "cpu":
            return "fused"
        if self.path == "fused" and call.query.device.type != "cpu":
            warnings.warn("the fused kernel runs on CPU only; using the chunked kernel", stacklevel=2)
        return "chunked"

    def _run_kernel(self, call: AttentionCall) -> None:
        kind = self.kernel_for(call)
        self.kernels_used.add(kind)
        sinks = None if call.sinks is None else call.sinks.to(self.compute_dtype)
        if kind == "sigmoid":
            result = kernels.sigmoid_attention(
                call.query, call.key, call.value, self._dense_allowed(call), call.scaling, call.sigmoid_bias,
                self.chunk_size, self.compute_dtype, self.path == "eager",
            )
        elif kind == "fused":
            result = kernels.fused_attention(
                call.query, call.key, call.value, call.allowed, call.scaling, call.causal, sinks,
                self.chunk_size, torch.float64 if self.compute_dtype == torch.float64 else None,
            )
        elif kind == "chunked":
            result = kernels.chunked_attention(
                call.query, call.key, call.value, self._dense_allowed(call), call.scaling, call.softcap,
                call.bias, sinks, self.chunk_size, self.compute_dtype,
            )
        else:
            result = kernels.eager_attention(
                call.query, call.key, call.value, self._dense_allowed(call), call.scaling, call.softcap,
                call.bias, sinks, self.compute_dtype,
            )
        call.output, call.lse, call.weights = result.output, result.lse, result.weights


_FINAL_NORMS = ("norm", "final_layernorm", "ln_f", "final_layer_norm", "final_norm")


def final_norm(model: Any) -> torch.nn.Module:
    """The base model's final normalisation layer (its input is the end of the residual stream)."""
    base = model.base_model
    for name in _FINAL_NORMS:
        module = getattr(base, name, None)
        if isinstance(module, torch.nn.Module):
            return module
    raise UnsupportedModelError(f"{type(model).__name__}: cannot find the final norm (looked for {_FINAL_NORMS})")


def capture(model: LoadedModel | Any, probes: Sequence[Probe] = (), **options: Any) -> CaptureEngine:
    """``with capture(model, [probe, ...]) as engine: engine.forward(input_ids, attention_mask)``."""
    return CaptureEngine(model, probes, **options)

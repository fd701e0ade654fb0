"""The capture engine: one registered attention function through which every probe sees attention.

While a `CaptureEngine` is active, the model's attention implementation is switched to ``"sinkscope"``
(`attention.py`, transformers' AttentionInterface). Each attention layer then hands its own q, k, v (after
rotary and q/k norms; k/v in their GQA layout), mask, scale, soft-cap and learned sink logits to the
engine, which

1. resolves the module's attention variant (`variants.py`) and picks a kernel for the call
   (`kernels.choose_kernel`),
2. computes the layer's output and softmax log-normaliser with it,
3. gives an `AttentionCall` to each probe in turn; a probe may read anything and may replace the output,
4. returns the output to the model.

On exit the original implementation is restored, so the model computes exactly what it did before.
Shapes, positions and the meaning of ``layer``: see the `sinkscope.capture` package docstring.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, replace
from typing import Any

import torch

from ..attention.interface import IMPLEMENTATION, active_handlers, pop_handler, push_handler, register
from ..attention.kernels import (
    PATHS,
    AttentionInputs,
    KernelOptions,
    KernelOutput,
    choose_kernel,
    row_statistics,
    run_kernel,
)
from ..attention.masks import parse_mask
from ..attention.variants import (
    AttentionVariant,
    drop_native_gate_input,
    keep_native_gate_input,
    module_variant,
    native_gate,
)
from ..conditions import Condition, Intervention, parse_condition
from ..errors import NonFiniteError, UnsupportedModelError
from ..models.loader import LoadedModel, check_attention_supported, input_device, text_config
from .interventions import SinkIntervention, make_intervention

NON_SOFTMAX_LAYERS = frozenset({"linear_attention"})  # `layer_types` entries without softmax attention

# Keyword arguments attention layers pass that do not change the attention math (or that we handle).
_NEUTRAL_KWARGS = {
    "dropout", "scaling", "position_ids", "use_cache", "output_router_logits", "output_attentions",
    "cache_position", "past_key_values", "past_key_value", "layer_idx", "position_embeddings",
    "token_type_ids", "return_dict", "output_hidden_states", "sliding_window",
}
_HANDLED_KWARGS = {"softcap", "s_aux", "sinks", "position_bias", "is_causal"}


@dataclass
class BatchInfo:
    """What probes need to know about the batch being run (positions: see the package docstring)."""

    input_ids: torch.Tensor  # [B, N] the batch as given (the prompt, when generating)
    attention_mask: torch.Tensor  # [B, N] 1 = real token
    first_positions: torch.Tensor  # [B] position of each row's first real token (left padding moves it)

    @property
    def query_valid(self) -> torch.Tensor:
        """bool [B, N]: which positions of the batch hold real tokens."""
        return self.attention_mask.bool()

    def real_tokens(self, positions: torch.Tensor) -> torch.Tensor:
        """bool [B, len(positions)]: whether each position holds a real token; positions past the batch
        (tokens generated after it) are real."""
        mask = self.query_valid.to(positions.device)
        inside = positions < mask.shape[1]
        real = mask[:, positions.clamp(max=mask.shape[1] - 1)]
        return real | ~inside[None, :]


@dataclass
class AttentionCall:
    """One attention layer's call, as probes see it (shapes: see the `sinkscope.capture` docstring).

    Tokens are found by *position* (a column of the batch): key j of the call holds position
    ``key_offset + j``, query i position ``query_offset + i``. Once a sliding window has moved
    (generation with a cache), key 0 is not the first token; `locate_key` and the ``key_*`` methods
    take positions for that reason."""

    layer: int  # attention block 0..L-1
    layer_type: str  # "full_attention", "sliding_attention", ...
    module: Any
    inputs: AttentionInputs
    variant: AttentionVariant
    kernel: str  # the `kernels.KERNELS` name that computed (and re-runs) this call
    options: KernelOptions
    batch: BatchInfo
    output: torch.Tensor  # [B, H, T, Dv] model dtype; what the model continues with (probes may replace it)
    lse: torch.Tensor  # [B, H, T] compute dtype, log of the full softmax normaliser (sink included)
    weights: torch.Tensor | None = None  # [B, H, T, S] on the eager path only
    key_offset: int = 0  # position of key 0
    query_offset: int = 0  # position of query 0
    # the layer's inputs as the model gave them, when an intervention replaced ``inputs`` (its mask says which
    # queries *could* see a key: the denominator of alpha stays the model's under a knock-out)
    model_inputs: AttentionInputs | None = None

    # -- the layer's own inputs -------------------------------------------------------------------
    @property
    def query(self) -> torch.Tensor:
        return self.inputs.query

    @property
    def key(self) -> torch.Tensor:
        return self.inputs.key

    @property
    def value(self) -> torch.Tensor:
        return self.inputs.value

    @property
    def allowed(self) -> torch.Tensor | None:
        return self.inputs.allowed

    @property
    def causal(self) -> bool:
        return self.inputs.causal

    @property
    def scaling(self) -> float:
        return self.inputs.scaling

    @property
    def softcap(self) -> float | None:
        return self.inputs.softcap

    @property
    def bias(self) -> torch.Tensor | None:
        return self.inputs.bias

    @property
    def sinks(self) -> torch.Tensor | None:
        return self.inputs.sinks

    @property
    def n_heads(self) -> int:
        return int(self.query.shape[1])

    # -- positions --------------------------------------------------------------------------------
    @property
    def key_positions(self) -> torch.Tensor:
        """long [S]: the position each key holds."""
        return torch.arange(self.key.shape[2], device=self.query.device) + self.key_offset

    @property
    def query_positions(self) -> torch.Tensor:
        """long [T]: the position of each query."""
        return torch.arange(self.query.shape[2], device=self.query.device) + self.query_offset

    def query_valid(self) -> torch.Tensor:
        """bool [B, T]: which queries are real tokens."""
        return self.batch.real_tokens(self.query_positions)

    def locate_key(self, position: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(index [B] into this call's keys, present [B]) of position ``position[b]`` of row b. Where the
        position is not among the keys (slid out of a window, or not reached yet) the index is clamped."""
        index = position.to(self.query.device) - self.key_offset
        s = self.key.shape[2]
        present = (index >= 0) & (index < s)
        return index.clamp(0, s - 1), present

    def dense_allowed(self) -> torch.Tensor:
        """bool [B|1, 1|H, T, S]: which keys each query may attend to."""
        return self.inputs.dense_allowed()

    def key_allowed(self, position: torch.Tensor, model_mask: bool = False) -> torch.Tensor:
        """bool [B, 1|H, T]: which queries may attend to the key at position ``position[b]`` of row b — under
        the intervention in force, or (``model_mask``) under the model's own mask."""
        b, _, t, _ = self.query.shape
        s = self.key.shape[2]
        index, present = self.locate_key(position)
        mask = (self.model_inputs or self.inputs).allowed if model_mask else self.allowed
        if mask is None:  # plain causal: O(T), without the T x S mask
            if self.causal and t > 1:
                visible = (torch.arange(t, device=index.device) + (s - t))[None, :] >= index[:, None]
            else:
                visible = torch.ones(b, t, dtype=torch.bool, device=index.device)
            return (visible & present[:, None])[:, None, :]
        allowed = mask.expand(b, -1, -1, -1)
        gathered = torch.gather(allowed, 3, index.view(-1, 1, 1, 1).expand(*allowed.shape[:3], 1))[..., 0]
        return gathered & present.view(-1, 1, 1)

    def key_scores(self, position: torch.Tensor) -> torch.Tensor:
        """float [B, H, T]: the logit each query gives the key at ``position[b]``, as the model computes it."""
        index, _ = self.locate_key(position)
        keys = self.key[torch.arange(self.key.shape[0], device=index.device), :, index]  # [B, KVH, D]
        scores = self.scores_against(keys)
        dtype = self.options.compute_dtype
        if self.bias is not None:
            bias = self.bias.expand(self.query.shape[0], self.n_heads, *self.bias.shape[2:])
            scores = scores + torch.gather(
                bias, 3, index.view(-1, 1, 1, 1).expand(*bias.shape[:3], 1)
            )[..., 0].to(dtype)
        return scores

    def scores_against(self, keys: torch.Tensor) -> torch.Tensor:
        """float [B, H, T]: the logit each query gives one key per row and key/value head, ``keys`` [B, KVH, D]
        (query head h reads kv head h // (H // KVH)), scaled and soft-capped as the model computes it; the
        additive bias, which depends on the key's column, is the caller's."""
        dtype = self.options.compute_dtype
        keys = keys.repeat_interleave(self.n_heads // keys.shape[1], dim=1)
        scores = torch.einsum("bhtd,bhd->bht", self.query.to(dtype), keys.to(dtype)) * self.scaling
        if self.softcap is not None:
            scores = torch.tanh(scores / self.softcap) * self.softcap
        return scores

    def key_attention(self, position: torch.Tensor) -> torch.Tensor:
        """float [B, H, T]: the attention weight each query puts on the key at ``position[b]`` (0 where the
        query may not attend to it, or the key is not in this call)."""
        allowed = self.key_allowed(position)
        if self.weights is not None:
            index, _ = self.locate_key(position)
            weights = self.weights
            attention = torch.gather(weights, 3, index.view(-1, 1, 1, 1).expand(*weights.shape[:3], 1))[..., 0]
        else:
            attention = self.variant.key_weight(self.key_scores(position), self.lse, self.inputs.logit_bias)
        return torch.where(allowed, attention, torch.zeros((), dtype=attention.dtype, device=attention.device))

    # -- re-running the layer's attention ----------------------------------------------------------
    def attend_with(self, allowed: torch.Tensor) -> KernelOutput:
        """Recompute this layer's attention under another mask (bool [B, 1|H, T, S]), same kernel.
        For interventions that hide keys: exact, unlike subtracting a key's share from the output."""
        return run_kernel(self.kernel, replace(self.inputs, allowed=allowed), self.options)

    def weighted_sum(self, values: torch.Tensor) -> torch.Tensor:
        """sum_j p_ij values_j for per-key values [B, KVH, S, Dx]: one more attention call with other values.
        The result is [B, H, T, Dx] in the compute dtype, normalised like the layer's own attention (a
        learned sink adds nothing)."""
        self._require_normalised("a weighted sum through the softmax normaliser")
        options = replace(self.options, output_dtype=self.options.compute_dtype, keep_weights=False)
        result = run_kernel(self.kernel, replace(self.inputs, value=values, sinks=None), options)
        share = torch.exp(result.lse - self.lse).nan_to_num(0.0)  # that call normalised over the keys only
        return result.output * share[..., None]

    def entropy_and_max(self, with_max: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(entropy [B, H, T], max weight [B, H, T] or None) of each query's attention distribution, in the
        compute dtype. On the fused path without the max weight, the entropy takes O(n) memory:
        H_i = lse_i - scale * q_i . (sum_j p_ij k_j) - p_sink * sink, the weighted key sum being one more
        fused call with the keys as values. Otherwise one chunked pass over the logits (O(chunk x n)
        memory, O(n^2) time) gives both."""
        self._require_normalised("attention entropy")
        lse = self.lse
        if self.weights is not None:
            p = self.weights
            entropy = -(p * torch.log(p)).nan_to_num(0.0).sum(-1)
            sink = self.sink_attention()
            if sink is not None:
                entropy = entropy - (sink * torch.log(sink)).nan_to_num(0.0)
            return entropy, p.amax(-1) if with_max else None
        if self.kernel == "fused" and not with_max:  # the fused kernel only runs plain scaled logits
            weighted_keys = self.weighted_sum(self.key)
            entropy = lse - self.scaling * (self.query.to(lse.dtype) * weighted_keys).sum(-1)
            if self.sinks is not None:
                sink_logit = self.sinks.to(lse.dtype)[None, :, None]
                entropy = entropy - torch.exp(sink_logit - lse) * sink_logit
            return torch.where(torch.isfinite(lse), entropy, torch.zeros((), dtype=lse.dtype)), None
        entropy, maximum = row_statistics(self.inputs, lse, self.options.chunk_size)
        return entropy, maximum if with_max else None

    def gate(self) -> torch.Tensor | None:
        """float [B, H, T, 1 | Dv]: the gate on each head's output (a gated lab variant's, or the model's own,
        e.g. Qwen3-Next's), or None for ungated attention."""
        gate = self.variant.gate(self.module)
        return native_gate(self.module) if gate is None else gate

    def sink_attention(self) -> torch.Tensor | None:
        """float [B, H, T]: the share of each query's attention the extra (sink) logit takes, or None."""
        if self.sinks is None:
            return None
        return torch.exp(self.sinks.to(self.lse.dtype)[None, :, None] - self.lse)

    def _require_normalised(self, what: str) -> None:
        if not self.variant.normalised:
            raise UnsupportedModelError(f"{what} is not defined for {self.variant.name} attention "
                                        "(its rows do not sum to one)")


class Probe:
    """Base class of everything that reads (or, for interventions, edits) attention through the engine."""

    def start(self, batch: BatchInfo, engine: CaptureEngine) -> None:
        """Called before each forward pass (once per `CaptureEngine.generate`)."""

    def on_attention(self, call: AttentionCall) -> torch.Tensor | None:
        """Called once per layer per forward; return a tensor [B, H, T, Dv] to replace the output."""
        return None

    def finish(self) -> None:
        """Called after each forward pass."""


class CaptureEngine:
    """Run a model with probes attached to every attention layer.

    ``path``: ``auto``/``fused`` use the fused log-sum-exp kernel where it can express the layer and
    the chunked kernel elsewhere (soft-capping, additive biases, non-CPU devices); ``chunked`` and
    ``eager`` force those kernels (``eager`` materialises the full weights: the reference). An attention
    variant that needs its own kernel (sigmoid) always gets it.
    ``precision``: ``float32`` or ``float64`` for all kernel arithmetic, whatever the model's dtype.
    """

    def __init__(self, model: LoadedModel | Any, probes: Sequence[Probe] = (), *, path: str = "auto",
                 chunk_size: int = 1024, precision: str = "float32", follow: bool = False) -> None:
        if path not in PATHS:
            raise ValueError(f"path must be one of {PATHS}, not {path!r}")
        if precision not in ("float32", "float64"):
            raise ValueError("precision must be 'float32' or 'float64'")
        self.model = model.model if isinstance(model, LoadedModel) else model
        check_attention_supported(self.model)
        self.probes = list(probes)
        # follow: forwards the model is called for directly (a harness such as lm-eval runs it) are captured
        # too; each fresh forward (no cached positions) becomes the batch, a cached step continues it
        self.follow = follow
        self.path = path
        self.chunk_size = int(chunk_size)
        self.compute_dtype = torch.float64 if precision == "float64" else torch.float32
        self.options = KernelOptions(self.compute_dtype, self.chunk_size, keep_weights=path == "eager")
        config = text_config(self.model)
        self.n_layers = int(config.num_hidden_layers)
        self.layer_types = list(getattr(config, "layer_types", None) or ["full_attention"] * self.n_layers)
        # hybrid models (Qwen3-Next) mix softmax layers with linear-attention ones, which have no sinks
        self.attention_layers = [i for i, kind in enumerate(self.layer_types) if kind not in NON_SOFTMAX_LAYERS]
        if not self.attention_layers:
            raise UnsupportedModelError(f"{type(self.model).__name__} has no softmax attention layers")
        self.batch: BatchInfo | None = None
        self.intervention: SinkIntervention | None = None  # applied to every call before the probes read it
        self.calls_seen = 0
        self.kernels_used: set[str] = set()
        self._saved: Any = None
        self._module_ids: set[int] = set()
        self._hook: Any = None
        self._positions_before = 0  # positions the cache already holds when the current forward starts
        self._active = False
        # inf/NaN in a layer's attention inputs is an error naming the layer; a forward that captures the
        # residual stream checks that instead (it names the depth where they first appear).
        self._check_inputs = True

    # -- context management -------------------------------------------------------------------
    def __enter__(self) -> CaptureEngine:
        if active_handlers():
            raise RuntimeError("capture engines do not nest")
        register()
        self._saved = self.model.config._attn_implementation
        self.model.set_attn_implementation(IMPLEMENTATION)
        self._module_ids = {id(module) for module in self.model.modules()}
        self._hook = self.model.base_model.register_forward_pre_hook(self._note_cache, with_kwargs=True)
        self._gate_hooks = [h for h in map(keep_native_gate_input, self.model.modules()) if h is not None]
        push_handler(self)
        self._active = True
        return self

    def __exit__(self, *exc: Any) -> None:
        self._active = False
        pop_handler(self)
        self._hook.remove()
        for hook in self._gate_hooks:
            hook.remove()
        self.model.set_attn_implementation(self._saved)

    def owns(self, module: Any) -> bool:
        """Whether ``module`` belongs to this engine's model (its attention calls come here)."""
        return id(module) in self._module_ids

    def _note_cache(self, _module: Any, _args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """Before each forward of the base model: how many positions its cache already holds (0 without one),
        so every call knows the position of its first key."""
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        self._positions_before = int(cache.get_seq_length()) if cache is not None else 0
        if self.follow and self._positions_before == 0:
            self._follow(_args, kwargs)

    def _follow(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """A fresh forward the engine did not start: its ids and mask become the batch the calls refer to."""
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            embeds = kwargs.get("inputs_embeds")
            if embeds is None:
                return
            ids = torch.zeros(embeds.shape[:2], dtype=torch.long, device=embeds.device)
        mask = kwargs.get("attention_mask")
        mask = torch.ones_like(ids) if not isinstance(mask, torch.Tensor) or mask.dim() != 2 else mask
        self.batch = BatchInfo(ids, mask, mask.long().argmax(-1))
        self.calls_seen = 0
        for probe in self.probes:
            probe.start(self.batch, self)

    def _require_active(self) -> None:
        if not self._active:
            raise RuntimeError("use the engine as a context manager: with CaptureEngine(...) as engine")

    @contextmanager
    def probing(self, probes: Sequence[Probe]) -> Iterator[None]:
        """Run the forwards inside with ``probes`` attached instead of the engine's own (which come back after)."""
        saved = self.probes
        self.probes = list(probes)
        try:
            yield
        finally:
            self.probes = saved

    @contextmanager
    def intervening(self, what: str | Condition | Intervention | SinkIntervention | None) -> Iterator[
            SinkIntervention | None]:
        """Run the forwards inside under a condition's intervention (`sinkscope.conditions`; its position-0
        part is the caller's business), or none; the previous one is restored on leaving."""
        if isinstance(what, str | Condition):
            what = parse_condition(what).intervention
        if isinstance(what, Intervention):
            what = make_intervention(what)
        if what is not None:
            what.spec.check(self.n_layers, max(1, int(getattr(text_config(self.model), "num_attention_heads", 1))),
                            str(what.spec))
        saved, self.intervention = self.intervention, what
        try:
            yield what
        finally:
            self.intervention = saved

    # -- running --------------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None, *,
                inputs_embeds: torch.Tensor | None = None, logits: bool = False, residual: bool = False,
                grad: bool = False) -> Any:
        """Run one batch. Position ids follow the attention mask, so a padded row is computed exactly
        as it would be alone.

        Returns the base model's output (``logits=False``: the LM head is skipped, which for Gemma's 262k
        vocabulary is most of the cost) or the causal-LM output with logits. ``residual=True`` adds
        ``output.residual``: the residual stream [L + 1, B, T, d] indexed by depth — the embeddings, then
        every layer's output, the last taken *before* the final norm. ``grad=True`` runs with autograd
        (e.g. for Jacobians w.r.t. ``inputs_embeds``); otherwise under inference mode.
        """
        self._require_active()
        device = input_device(self.model)
        ids, attention_mask, position_ids = _batch_tensors(input_ids, inputs_embeds, attention_mask, device)
        self.batch = BatchInfo(ids, attention_mask, attention_mask.long().argmax(-1))
        for probe in self.probes:
            probe.start(self.batch, self)
        self.calls_seen = 0
        self._check_inputs = not residual
        self.model.eval()
        runner = self.model if logits else self.model.base_model
        inputs: dict[str, Any] = {"attention_mask": attention_mask, "position_ids": position_ids, "use_cache": False}
        if inputs_embeds is not None:
            inputs["inputs_embeds"] = inputs_embeds.to(device)
        else:
            inputs["input_ids"] = ids
        with residual_stream(self.model, inputs) if residual else nullcontext() as stream:
            with torch.enable_grad() if grad else torch.inference_mode():
                output = runner(**inputs)
        if self.calls_seen != len(self.attention_layers):
            raise UnsupportedModelError(
                f"{type(self.model).__name__}: captured {self.calls_seen} attention calls for "
                f"{len(self.attention_layers)} softmax attention layers; its attention does not all go through "
                "transformers' attention interface"
            )
        if stream is not None:
            output.residual = stream.of(output)
        for probe in self.probes:
            probe.finish()
        return output

    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs: Any) -> Any:
        """``model.generate`` with the probes attached (e.g. an intervention during decoding). Each decoding
        step's call sees the cached keys, located by position (sliding windows included)."""
        self._require_active()
        device = input_device(self.model)
        input_ids = input_ids.to(device)
        attention_mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(device)
        self.batch = BatchInfo(input_ids, attention_mask, attention_mask.long().argmax(-1))
        self._check_inputs = True
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
        """One layer's attention call (transformers' attention-function signature; output [B, T, H, Dv])."""
        unknown = [k for k, v in kwargs.items()
                   if k not in _NEUTRAL_KWARGS | _HANDLED_KWARGS and v is not None]
        if unknown:
            raise UnsupportedModelError(
                f"{type(module).__name__} passes {unknown} to its attention function; sinkscope does not "
                "know how these change the attention and refuses rather than report wrong numbers"
            )
        if self.batch is None:
            raise RuntimeError("run the model through engine.forward or engine.generate")
        layer = getattr(module, "layer_idx", None)
        if layer is None:  # calls come in layer order
            layer = self.attention_layers[min(self.calls_seen, len(self.attention_layers) - 1)]
        layer = int(layer)
        self.calls_seen += 1
        if self._check_inputs:
            check_attention_inputs(layer, query, key, value)
        causal = bool(kwargs.get("is_causal") if kwargs.get("is_causal") is not None
                      else getattr(module, "is_causal", True))
        t, s = query.shape[2], key.shape[2]
        if attention_mask is None and causal and 1 < t < s:
            # As transformers' SDPA path does: keys past the queries are padding of a static cache.
            key, value, s = key[:, :, :t], value[:, :, :t], t
        allowed, bias = parse_mask(attention_mask, s)
        if kwargs.get("position_bias") is not None:
            position_bias = kwargs["position_bias"][..., :s]
            bias = position_bias if bias is None else position_bias + bias
        variant = module_variant(module)
        sinks = kwargs.get("s_aux", kwargs.get("sinks"))
        if sinks is None:
            sinks = variant.extra_logit(module)
        inputs = AttentionInputs(query, key, value, allowed, causal, float(kwargs.get("scaling") or
                                 query.shape[-1] ** -0.5), kwargs.get("softcap"), bias, sinks,
                                 variant.logit_bias(module))
        kernel = choose_kernel(inputs, self.path, variant.kernel)
        self.kernels_used.add(kernel)
        result = run_kernel(kernel, inputs, self.options)
        # The queries are the newest positions. Every cache layout transformers uses ends the keys at the last
        # query (no cache, dynamic and sliding caches, a full static buffer) except a static buffer not yet
        # full, which holds positions 0..S-1 (padding past the last query, masked).
        end = self._positions_before + t
        call = AttentionCall(
            layer=layer, layer_type=self.layer_types[layer] if layer < len(self.layer_types) else "full_attention",
            module=module, inputs=inputs, variant=variant, kernel=kernel, options=self.options, batch=self.batch,
            output=result.output, lse=result.lse, weights=result.weights, key_offset=end - s if s <= end else 0,
            query_offset=end - t,
        )
        self._intervene_and_probe(call)
        drop_native_gate_input(module)  # the model applies its own gate; only the probes needed it kept
        # a gated variant's gate acts on the (possibly replaced) output, as in the model's own computation
        return variant.gate_output(module, call.output).transpose(1, 2).contiguous(), None

    def _intervene_and_probe(self, call: AttentionCall) -> None:
        """The condition's intervention first (so every probe reads the intervened attention), then the probes,
        each of which may replace the output."""
        if self.intervention is not None and self.intervention.apply(call):
            self.kernels_used.add(call.kernel)
        for probe in self.probes:
            replaced = probe.on_attention(call)
            if replaced is not None:
                call.output = replaced


def _batch_tensors(input_ids: torch.Tensor | None, inputs_embeds: torch.Tensor | None,
                   attention_mask: torch.Tensor | None, device: torch.device
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ids, attention mask, position ids) of one batch on ``device``; ids are zeros for embeddings input."""
    if input_ids is not None and inputs_embeds is None:
        reference = input_ids
    elif inputs_embeds is not None and input_ids is None:
        reference = inputs_embeds[..., 0]
    else:
        raise ValueError("pass exactly one of input_ids and inputs_embeds")
    if attention_mask is None:
        attention_mask = torch.ones(reference.shape, dtype=torch.long, device=device)
    attention_mask = attention_mask.to(device)
    if not bool((attention_mask.sum(-1) > 0).all()):
        raise ValueError("every row of the batch needs at least one real token")
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    ids = input_ids.to(device) if input_ids is not None else torch.zeros(reference.shape, dtype=torch.long)
    return ids, attention_mask, position_ids


def check_attention_inputs(layer: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> None:
    """Raise `NonFiniteError` naming the layer whose attention inputs hold inf/NaN (a float16 overflow in
    the layers below, typically): a measurement on them would be silently wrong."""
    for name, tensor in (("queries", query), ("keys", key), ("values", value)):
        # One reduction first (NaN and inf carry into the sum; 2% of a scan at n = 4096 otherwise); only a sum
        # that overflowed on finite elements needs the elementwise check.
        if not bool(torch.isfinite(tensor.sum(dtype=torch.float32))) and not bool(torch.isfinite(tensor).all()):
            raise NonFiniteError(
                f"layer {layer}: the attention {name} hold inf/NaN ({tensor.dtype} overflow in the layers up to "
                f"{layer}?); load the model with --dtype float32 (or bfloat16)")


_FINAL_NORMS = ("norm", "final_layernorm", "ln_f", "final_layer_norm", "final_norm")


class ResidualStream:
    """The residual stream of one forward, [L + 1, B, T, d] by depth: the embeddings, then every layer's output,
    the last taken *before* the final norm (``hidden_states[-1]`` is after it). Made by `residual_stream`."""

    def __init__(self) -> None:
        self.pre_norm: list[torch.Tensor] = []

    def of(self, output: Any) -> torch.Tensor:
        return torch.stack(list(output.hidden_states[:-1]) + [self.pre_norm[-1]])


@contextmanager
def residual_stream(model: Any, inputs: dict[str, Any]) -> Iterator[ResidualStream]:
    """Around one forward with ``inputs`` (asked here for its hidden states): ``stream.of(output)`` is its
    residual stream. For `CaptureEngine.forward` and a forward through a cache alike."""
    inputs["output_hidden_states"] = True
    stream = ResidualStream()
    hook = final_norm(model).register_forward_pre_hook(lambda _m, args: stream.pre_norm.append(args[0]))
    try:
        yield stream
    finally:
        hook.remove()


def final_norm(model: Any) -> torch.nn.Module:
    """The base model's final normalisation layer (its input is the end of the residual stream, depth L)."""
    base = model.base_model
    for name in _FINAL_NORMS:
        module = getattr(base, name, None)
        if isinstance(module, torch.nn.Module):
            return module
    raise UnsupportedModelError(f"{type(model).__name__}: cannot find the final norm (looked for {_FINAL_NORMS})")


def capture(model: LoadedModel | Any, probes: Sequence[Probe] = (), **options: Any) -> CaptureEngine:
    """``with capture(model, [probe, ...]) as engine: engine.forward(input_ids, attention_mask)``."""
    return CaptureEngine(model, probes, **options)

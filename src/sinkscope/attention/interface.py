"""The one attention function sinkscope registers with transformers (``"sinkscope"``), and installing it.

`sinkscope_attention` has transformers' attention-function signature. Inside a `CaptureEngine` over the
calling module's model it hands the call to the engine (kernels + probes). Anywhere else it computes the
module's own attention variant plainly: PyTorch SDPA for softmax, explicit (differentiable) weights for the
other variants. That second mode is how lab models train, so a lab model computes the same attention in
training, in `sinkscope.load` and under the engine.

`install` gives a LLaMA-style model an attention variant (module parameters, the config entry, this
implementation); `restore` re-installs it after ``from_pretrained`` of a saved checkpoint.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

import torch

from ..errors import ModelLoadError
from .kernels import _flash_cpu, keys_share, repeat_kv, scores_block
from .masks import additive_mask, dense_allowed, parse_mask
from .variants import GATE_MODULE, SOFTMAX, VARIANTS, default_sigmoid_bias, module_variant

_flash_cpu_backward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward

IMPLEMENTATION = "sinkscope"
CONFIG_KEY = "sinkscope_attention"  # in a model's config: the name of its attention variant
SIGMOID_BIAS_KEY = "sinkscope_sigmoid_bias"


class AttentionHandler(Protocol):
    """What the registered function hands calls to (a `CaptureEngine`)."""

    def owns(self, module: Any) -> bool: ...

    def attend(self, module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               attention_mask: torch.Tensor | None, **kwargs: Any) -> tuple[torch.Tensor, None]: ...


_handlers: list[AttentionHandler] = []  # the active engines, innermost last (engines do not nest today)


def push_handler(handler: AttentionHandler) -> None:
    _handlers.append(handler)


def pop_handler(handler: AttentionHandler) -> None:
    _handlers.remove(handler)


def active_handlers() -> tuple[AttentionHandler, ...]:
    return tuple(_handlers)


class _SinkThroughLse(torch.autograd.Function):
    """Softmax attention with a per-head sink logit b_h (value 0) through the CPU flash op, which returns the
    log-sum-exp: the sink's share of row i is sigmoid(b_h - lse_i), so the output is O * sigmoid(lse - b).

    The op's backward takes no gradient for the lse, but it does not need one: with w = sigmoid(lse - b) and
    dO = w * G, the lse's term P_ij * D_i (1 - w_i) folds into the op's row term D_i = dO_i . out_i when it is
    handed the rescaled output w * O as ``out``: ds_ij = P_ij (dP_ij - w_i D_i), exactly the chain rule."""

    @staticmethod
    def forward(ctx: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, sinks: torch.Tensor,
                mask: torch.Tensor | None, causal: bool, scaling: float) -> torch.Tensor:
        output, lse = _flash_cpu(query, key, value, 0.0, causal, attn_mask=mask, scale=scaling)
        keep = keys_share(lse, sinks)
        result: torch.Tensor = output * keep.to(output.dtype)[..., None]
        ctx.save_for_backward(query, key, value, mask, output, result, lse, keep)
        ctx.causal, ctx.scaling = causal, scaling
        return result

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        query, key, value, mask, output, result, lse, keep = ctx.saved_tensors
        grad_output = grad * keep.to(grad.dtype)[..., None]
        grad_q, grad_k, grad_v = _flash_cpu_backward(grad_output.contiguous(), query, key, value, result, lse, 0.0,
                                                     ctx.causal, attn_mask=mask, scale=ctx.scaling)
        grad_keep = (grad.to(keep.dtype) * output.to(keep.dtype)).sum(-1)
        grad_sinks = -(grad_keep * keep * (1 - keep)).sum((0, 2))
        return grad_q, grad_k, grad_v, grad_sinks, None, None, None


def _lse_route(query: torch.Tensor, value: torch.Tensor, dropout: float) -> bool:
    """Whether `_SinkThroughLse` can take the call: the CPU flash op, no dropout, values as wide as keys."""
    return (query.device.type == "cpu" and not dropout and value.shape[-1] == query.shape[-1]
            and query.dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16))


def sdpa_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, allowed: torch.Tensor | None,
                   bias: torch.Tensor | None, causal: bool, scaling: float, sinks: torch.Tensor | None = None,
                   dropout: float = 0.0, through_lse: bool | None = None) -> torch.Tensor:
    """Softmax attention [B, H, T, Dv] through PyTorch SDPA (differentiable, fused where the device has it).

    A per-head sink logit b_h [H] joins the normaliser as one more key with value 0. On CPU (``through_lse``
    None or True) the flash op's log-sum-exp gives the sink's share directly (`_SinkThroughLse`); elsewhere
    (or ``through_lse=False``) the sink is an extra key: off-by-one's b = 0 the zero key, a learned b_h on one
    extra query/key dimension (query 1, sink key b_h / scaling, other keys 0), so autograd reaches it through
    the op. ``allowed``/``bias`` as `masks.parse_mask` returns them."""
    sdpa = torch.nn.functional.scaled_dot_product_attention
    t, s = query.shape[2], key.shape[2]
    plain_causal = allowed is None and causal and t > 1
    if plain_causal and t != s:  # SDPA's is_causal aligns queries with the first keys, not the last
        allowed, plain_causal = dense_allowed(None, t, s, True, query.device), False
    mask = bias if bias is not None else allowed
    if sinks is None:
        output = sdpa(query, key, value, attn_mask=mask, dropout_p=dropout, is_causal=plain_causal, scale=scaling,
                      enable_gqa=query.shape[1] != key.shape[1])
        # A query that sees no key (a padded row) gets no output, as in the explicit formula.
        return output if allowed is None else output.masked_fill(~allowed.any(-1, keepdim=True), 0.0)
    if through_lse is None:
        through_lse = _lse_route(query, value, dropout)
    if through_lse:  # the op takes grouped K/V heads (GQA) as they are, in both directions
        if mask is not None and mask.dtype == torch.bool:  # the op takes additive masks
            mask = additive_mask(mask, query.dtype)
        shared: torch.Tensor = _SinkThroughLse.apply(query, key, value, sinks, mask, plain_causal, scaling)
        return shared if allowed is None else shared.masked_fill(~allowed.any(-1, keepdim=True), 0.0)
    n_rep = query.shape[1] // key.shape[1]
    key, value = repeat_kv(key, n_rep), repeat_kv(value, n_rep)
    b, h, _, d = query.shape
    sinks = sinks.to(query.dtype)
    if sinks.requires_grad or bool(sinks.any()):
        query = torch.cat([query, query.new_ones(b, h, t, 1)], -1)
        key = torch.cat([key, key.new_zeros(b, h, s, 1)], -1)
        sink_key = torch.cat([key.new_zeros(1, h, 1, d), (sinks / scaling).view(1, h, 1, 1)], -1)
    else:
        sink_key = key.new_zeros(1, h, 1, d)
    key = torch.cat([sink_key.expand(b, -1, -1, -1), key], 2)
    value = torch.cat([value.new_zeros(b, h, 1, value.shape[-1]), value], 2)
    if plain_causal:
        # With one leading placeholder query, SDPA's top-left causal mask lets query i see the sink and keys
        # 0..i: exactly causal attention plus the sink. The placeholder's row is dropped.
        query = torch.cat([query.new_zeros(b, h, 1, query.shape[-1]), query], 2)
        return sdpa(query, key, value, dropout_p=dropout, is_causal=True, scale=scaling)[:, :, 1:]
    if mask is not None:
        mask = torch.nn.functional.pad(mask, (1, 0), value=True if mask.dtype == torch.bool else 0.0)
    return sdpa(query, key, value, attn_mask=mask, dropout_p=dropout, scale=scaling)


def plain_attention(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                    **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The module's attention variant without an engine: SDPA for plain softmax, explicit weights otherwise
    (lab models are small, so the n x n weights are cheap; they also keep autograd simple).

    Kept beside `kernels.KERNELS` on purpose: this is the training path (autograd through every op, attention
    dropout, transformers' own SDPA for plain softmax), where the kernels serve measurement (inference mode,
    the normaliser every probe reads, no dropout). The formulas are shared: the weights come from
    `AttentionVariant.weights` (`kernels.softmax_weights`), the fused sink/gate path from `sdpa_attention`."""
    variant = module_variant(module)
    extra_logit = kwargs.pop("s_aux", None)
    extra_logit = kwargs.pop("sinks", None) if extra_logit is None else extra_logit
    softcap, position_bias = kwargs.get("softcap"), kwargs.get("position_bias")
    if extra_logit is None:
        extra_logit = variant.extra_logit(module)
    if variant is SOFTMAX and extra_logit is None and softcap is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                      **kwargs)
    scaling = scaling if scaling is not None else query.shape[-1] ** -0.5
    t, s = query.shape[2], key.shape[2]
    allowed, mask_bias = parse_mask(attention_mask, s)
    causal = bool(getattr(module, "is_causal", True))
    fused = variant.normalised and variant.kernel is None and softcap is None and position_bias is None
    if fused and not kwargs.get("output_attentions"):  # asked for the weights: the explicit formula has them
        # Softmax with a sink logit (off-by-one, learned sink) or a gate: the fused op, at softmax speed.
        output = sdpa_attention(query, key, value, allowed, mask_bias, causal, scaling, extra_logit,
                                dropout if module.training else 0.0)
        return variant.gate_output(module, output).transpose(1, 2).contiguous(), None
    bias = mask_bias if position_bias is None else position_bias if mask_bias is None else position_bias + mask_bias
    allowed = dense_allowed(allowed, t, s, causal, query.device)
    scores = scores_block(query, key, scaling, softcap, bias, query.dtype)
    weights = variant.weights(scores, allowed, extra_logit, variant.logit_bias(module))
    if dropout and module.training:
        weights = torch.nn.functional.dropout(weights, p=dropout)
    output = torch.matmul(weights.to(value.dtype), repeat_kv(value, query.shape[1] // value.shape[1]))
    return variant.gate_output(module, output).transpose(1, 2).contiguous(), weights


def sinkscope_attention(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                        attention_mask: torch.Tensor | None, **kwargs: Any) -> tuple[torch.Tensor,
                                                                                    torch.Tensor | None]:
    """The registered attention function (transformers' signature; output [B, T, H, Dv], weights or None)."""
    for handler in reversed(_handlers):
        if handler.owns(module):
            return handler.attend(module, query, key, value, attention_mask, **kwargs)
    return plain_attention(module, query, key, value, attention_mask, **kwargs)


def register() -> None:
    """Register `sinkscope_attention` (and sdpa-style masks: boolean, None when plain causal needs none)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(IMPLEMENTATION, sinkscope_attention)
    AttentionMaskInterface.register(IMPLEMENTATION, sdpa_mask)


def attention_modules(model: Any) -> list[Any]:
    layers = getattr(model.base_model, "layers", None)
    if layers is None:
        raise ModelLoadError(f"{type(model).__name__}: attention variants need a LLaMA-style model (.layers)")
    return [layer.self_attn for layer in layers]


def install(model: Any, variant: str, sigmoid_bias: float | None = None) -> Any:
    """Give a LLaMA-style model an attention variant (in place), record it in its config (so a saved
    checkpoint names it) and switch the model to the sinkscope attention function."""
    if variant not in VARIANTS:
        raise ModelLoadError(f"unknown attention variant {variant!r}; choose from {', '.join(VARIANTS)}")
    register()
    config = model.config
    if variant == "sigmoid":
        if sigmoid_bias is None:
            sigmoid_bias = default_sigmoid_bias(config.max_position_embeddings)
        setattr(config, SIGMOID_BIAS_KEY, float(sigmoid_bias))
    setattr(config, CONFIG_KEY, variant)
    for module in attention_modules(model):
        VARIANTS[variant].setup(module, int(config.num_attention_heads), sigmoid_bias)
    model.set_attn_implementation(IMPLEMENTATION)
    return model


def variant_of(config: Any) -> str | None:
    """The attention variant a (lab) model's config names, or None for any other model."""
    return getattr(config, CONFIG_KEY, None)


def restore(model: Any, directory: str | Path) -> Any:
    """After ``from_pretrained`` of a checkpoint saved with a variant: re-install it, and load the weights
    transformers does not know about (learned sink logits) from the checkpoint's safetensors."""
    from safetensors import safe_open

    variant = variant_of(model.config)
    if variant is None:
        return model
    install(model, variant, getattr(model.config, SIGMOID_BIAS_KEY, None))
    # Parameters a variant adds (learned sink logits, output gates; off-by-one's zeros are a buffer, not saved).
    wanted = {name: param for name, param in model.named_parameters()
              if name.endswith("sink_logits") or f".{GATE_MODULE}." in name}
    if not wanted:
        return model
    found: set[str] = set()
    for file in sorted(Path(directory).glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as handle:
            for name in set(handle.keys()) & set(wanted):
                with torch.no_grad():
                    wanted[name].copy_(handle.get_tensor(name))
                found.add(name)
    if found != set(wanted):
        missing = sorted(set(wanted) - found)[:2]
        raise ModelLoadError(f"{directory}: checkpoint lacks the variant's parameters {missing}")
    return model

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
from .kernels import repeat_kv, scores_block
from .masks import dense_allowed, parse_mask
from .variants import GATE_MODULE, SOFTMAX, VARIANTS, default_sigmoid_bias, module_variant

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


def plain_attention(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                    **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The module's attention variant without an engine: SDPA for plain softmax, explicit weights otherwise
    (lab models are small, so the n x n weights are cheap; they also keep autograd simple)."""
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
    bias = mask_bias if position_bias is None else position_bias if mask_bias is None else position_bias + mask_bias
    allowed = dense_allowed(allowed, t, s, bool(getattr(module, "is_causal", True)), query.device)
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

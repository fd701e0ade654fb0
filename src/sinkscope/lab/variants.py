"""Attention variants for lab models: one registered attention function, four normalisations.

``softmax``       the standard  p_ij = exp(s_ij) / sum_k exp(s_ik)  (PyTorch SDPA)
``off_by_one``    softmax with an implicit extra zero logit: p_ij = exp(s_ij) / (1 + sum_k exp(s_ik)),
                  so a head can attend to "nothing" (Miller 2023, "softmax1")
``learned_sink``  softmax with a learned per-head sink logit b_h in the normaliser (gpt-oss style)
``sigmoid``       p_ij = sigmoid(s_ij + b), no normalisation over keys (Gu et al. 2024 find no sinks form)

A lab model is a plain transformers LLaMA model whose attention modules carry the variant:
``module.attention_variant``, ``module.sink_logits`` (off-by-one: a zero buffer; learned sink: a
parameter) and ``module.sigmoid_bias``. The capture engine reads the same attributes, so every sinkscope
measurement computes exactly what the trained model computes. The variant is stored in the model's
config (``sinkscope_attention``), so `sinkscope.load` rebuilds it from a saved checkpoint.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from ..capture.kernels import repeat_kv
from ..errors import ModelLoadError

VARIANTS = ("softmax", "off_by_one", "learned_sink", "sigmoid")
IMPLEMENTATION = "sinkscope_lab"
CONFIG_KEY = "sinkscope_attention"
SIGMOID_BIAS_KEY = "sinkscope_sigmoid_bias"


def _allowed(attention_mask: torch.Tensor | None, t: int, s: int, device: torch.device) -> torch.Tensor:
    """bool [B|1, 1, T, S] from what the mask interface hands us (None = causal)."""
    if attention_mask is None:
        queries = torch.arange(t, device=device)[:, None] + (s - t)
        return (queries >= torch.arange(s, device=device)[None, :])[None, None]
    if attention_mask.dtype == torch.bool:
        return attention_mask[..., :s]
    return attention_mask[..., :s] > torch.finfo(attention_mask.dtype).min / 2


def variant_weights(scores: torch.Tensor, allowed: torch.Tensor, variant: str,
                    sink_logits: torch.Tensor | None = None, sigmoid_bias: float | None = None) -> torch.Tensor:
    """Attention weights [B, H, T, S] from logits [B, H, T, S] under a variant (the reference formula)."""
    if variant == "sigmoid":
        if sigmoid_bias is None:
            raise ValueError("sigmoid attention needs a bias")
        return torch.sigmoid(scores + sigmoid_bias) * allowed
    scores = scores.masked_fill(~allowed, float("-inf"))
    if variant == "softmax":
        return torch.softmax(scores, dim=-1).nan_to_num(0.0)
    if variant not in ("off_by_one", "learned_sink") or sink_logits is None:
        raise ValueError(f"unknown attention variant {variant!r} (or a sink variant without sink logits)")
    column = sink_logits.to(scores.dtype).reshape(1, -1, 1, 1).expand(*scores.shape[:3], 1)
    return torch.softmax(torch.cat([scores, column], dim=-1), dim=-1)[..., :-1]


def lab_attention(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                  attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                  **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The registered attention function: SDPA for softmax, explicit weights for the other variants
    (lab models are small, so the n x n weights are cheap; they also keep autograd simple)."""
    variant = getattr(module, "attention_variant", "softmax")
    if variant == "softmax":
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                      **kwargs)
    scaling = scaling if scaling is not None else query.shape[-1] ** -0.5
    n_rep = query.shape[1] // key.shape[1]
    key, value = repeat_kv(key, n_rep), repeat_kv(value, n_rep)
    scores = torch.matmul(query, key.transpose(-1, -2)) * scaling
    allowed = _allowed(attention_mask, query.shape[2], key.shape[2], query.device)
    weights = variant_weights(scores, allowed, variant, getattr(module, "sink_logits", None),
                              getattr(module, "sigmoid_bias", None))
    if dropout and module.training:
        weights = torch.nn.functional.dropout(weights, p=dropout)
    output = torch.matmul(weights.to(value.dtype), value)
    return output.transpose(1, 2).contiguous(), weights


def register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(IMPLEMENTATION, lab_attention)
    AttentionMaskInterface.register(IMPLEMENTATION, sdpa_mask)


def attention_modules(model: Any) -> list[Any]:
    layers = getattr(model.base_model, "layers", None)
    if layers is None:
        raise ModelLoadError(f"{type(model).__name__}: lab attention variants need a LLaMA-style model (.layers)")
    return [layer.self_attn for layer in layers]


def default_sigmoid_bias(context_length: int) -> float:
    """b = -log(n): each key starts near weight 1/n, as softmax over n keys would (Ramapuram et al. 2024)."""
    return -math.log(max(int(context_length), 2))


def install(model: Any, variant: str, sigmoid_bias: float | None = None) -> Any:
    """Give a LLaMA-style model an attention variant (in place) and record it in its config."""
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
        module.attention_variant = variant
        heads = int(config.num_attention_heads)
        weight = module.q_proj.weight
        if variant == "off_by_one":
            module.register_buffer("sink_logits", torch.zeros(heads, dtype=weight.dtype, device=weight.device),
                                   persistent=False)
        elif variant == "learned_sink":
            module.sink_logits = torch.nn.Parameter(torch.zeros(heads, dtype=weight.dtype, device=weight.device))
        elif variant == "sigmoid":
            module.sigmoid_bias = float(sigmoid_bias)
    model.set_attn_implementation(IMPLEMENTATION)
    return model


def variant_of(config: Any) -> str | None:
    return getattr(config, CONFIG_KEY, None)


def restore(model: Any, directory: str | Path) -> Any:
    """After ``from_pretrained`` of a lab checkpoint: re-install its variant and the weights transformers
    does not know about (learned sink logits), read from the checkpoint's safetensors."""
    from safetensors import safe_open

    variant = variant_of(model.config)
    install(model, variant, getattr(model.config, SIGMOID_BIAS_KEY, None))
    if variant != "learned_sink":
        return model
    files = sorted(Path(directory).glob("*.safetensors"))
    wanted = {name: param for name, param in model.named_parameters() if name.endswith("sink_logits")}
    found: set[str] = set()
    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            for name in set(handle.keys()) & set(wanted):
                with torch.no_grad():
                    wanted[name].copy_(handle.get_tensor(name))
                found.add(name)
    if found != set(wanted):
        raise ModelLoadError(f"{directory}: checkpoint lacks learned sink logits {sorted(set(wanted) - found)[:2]}")
    return model

"""Lab models: transformers' LLaMA (RoPE, RMSNorm, SwiGLU) built from a small spec, never hand-written, so
every sinkscope command runs on a trained checkpoint."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch

from ..attention.interface import install
from ..attention.variants import VARIANT_NAMES, default_sigmoid_bias


@dataclass
class ModelSpec:
    hidden_size: int = 64
    layers: int = 2
    heads: int = 4
    kv_heads: int | None = None  # None = heads (no GQA)
    intermediate_size: int | None = None  # None = the LLaMA ratio, 8/3 x hidden, rounded up to 16
    attention: str = "softmax"  # one of attention.variants.VARIANT_NAMES
    sigmoid_bias: float | None = None  # sigmoid attention only; None = -log(context length)
    rope_theta: float = 10000.0
    tie_embeddings: bool = True
    init_std: float = 0.02

    def __post_init__(self) -> None:
        if self.hidden_size % self.heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by heads {self.heads}")
        if self.attention not in VARIANT_NAMES:
            raise ValueError(f"attention must be one of {VARIANT_NAMES}, not {self.attention!r}")

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def llama_config(spec: ModelSpec, vocab_size: int, context_length: int, bos_id: int, eos_id: int) -> Any:
    from transformers import LlamaConfig

    intermediate = spec.intermediate_size or -(-int(spec.hidden_size * 8 / 3) // 16) * 16
    return LlamaConfig(
        vocab_size=vocab_size, hidden_size=spec.hidden_size, intermediate_size=intermediate,
        num_hidden_layers=spec.layers, num_attention_heads=spec.heads,
        num_key_value_heads=spec.kv_heads or spec.heads, max_position_embeddings=context_length,
        rms_norm_eps=1e-5, rope_theta=spec.rope_theta, tie_word_embeddings=spec.tie_embeddings,
        initializer_range=spec.init_std, bos_token_id=bos_id, eos_token_id=eos_id, pad_token_id=eos_id,
        attention_dropout=0.0, use_cache=False,
    )


def build_model(spec: ModelSpec, vocab_size: int, context_length: int, bos_id: int, eos_id: int,
                seed: int) -> Any:
    """A freshly initialised LlamaForCausalLM with the spec's attention variant installed (seeded)."""
    from transformers import LlamaForCausalLM

    config = llama_config(spec, vocab_size, context_length, bos_id, eos_id)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    bias = spec.sigmoid_bias
    if spec.attention == "sigmoid" and bias is None:
        bias = default_sigmoid_bias(context_length)
    return install(model, spec.attention, bias)


def count_parameters(model: Any) -> int:
    return sum(p.numel() for p in model.parameters())

"""A StreamingLLM KV cache (Xiao et al., 2024) on transformers' `Cache` API.

`StreamingCache(model, sink_tokens=k, window=w)` keeps the first ``k`` tokens of a stream (the attention
sinks) plus the ``w`` most recent ones; everything in between is evicted. Positions are assigned *inside
the cache*: a token's rotary position is its index in the cache, not in the original text, so relative
distances stay within what the model saw in training however long the stream gets. ``sink_tokens=0`` is
plain window attention (with the same in-cache positions).

Semantics: every query attends to at most ``k + w`` keys, itself included, at positions ``0 .. k+w-1``:
the next-token logits after eviction are those of a fresh forward pass over [the k sink tokens + the w
most recent tokens]. Between forward passes the cache holds at most ``k + w - 1`` tokens (room for the
next one), so its memory is flat once it has filled.

How positions move: transformers applies rotary embeddings *before* `Cache.update`, and in transformers 5
the attention layers no longer pass cos/sin to the cache. So each layer undoes the rotary of incoming
keys once (it knows the position the model gave them: their index in the cache) and stores raw keys; at
every use it rotates all cached keys at their current index. This replaces the old HF `SinkCache`
re-rotation (which rotated already-rotated keys by the shift, step after step) with one exact rotation
per use, so no rounding error accumulates over a long stream.

Supported: rotary models whose attention rotates the full head with `rotate_half` and whose inverse
frequencies do not depend on the sequence length (llama/SmolLM2, mistral, qwen2/3, gemma/2/3). Gemma-3's
two rotary bases (local for sliding layers, global for full layers) are read per layer from the model's
own rotary module. Anything else (absolute positions, partial or interleaved rotary, dynamic/YaRN/longrope
scaling, explicit ``position_ids`` that disagree with the cache) is refused with a clear error.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch
from transformers.cache_utils import Cache, DynamicLayer

from ..errors import InputError, UnsupportedModelError
from ..models.loader import LoadedModel, text_config

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text")
# Rope types whose inverse frequencies are fixed (the rotary of position p is the same at any stream length).
STATIC_ROPE_TYPES = ("default", "linear", "llama3")


@dataclass
class Rope:
    """One layer's rotary embedding: cos/sin of ``position * inv_freq``, computed as transformers does."""

    inv_freq: torch.Tensor  # [head_dim / 2], float32

    def cos_sin(self, n: int, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        positions = torch.arange(n, device=device, dtype=torch.float32)
        freqs = positions[:, None] * self.inv_freq.to(device=device, dtype=torch.float32)[None, :]
        angles = torch.cat((freqs, freqs), dim=-1)
        return angles.cos().to(dtype), angles.sin().to(dtype)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding (the `rotate_half` convention) of x [..., n, D] with cos/sin [n, D]; -sin undoes it."""
    half = x.shape[-1] // 2
    rotated_half = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated_half * sin


def layer_ropes(model: LoadedModel | Any) -> list[Rope]:
    """Each layer's rotary embedding, read from the model's own rotary module (per layer type for Gemma-3).

    Raises `UnsupportedModelError` for anything the streaming cache cannot re-position exactly."""
    model = model.model if isinstance(model, LoadedModel) else model
    config = text_config(model)
    name = f"{type(model).__name__} (model_type '{config.model_type}')"
    if config.model_type not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedModelError(
            f"{name}: the streaming cache supports rotary models of types {', '.join(SUPPORTED_MODEL_TYPES)}; "
            "other position schemes (absolute, partial or interleaved rotary) are not re-positioned by it"
        )
    rotary = getattr(model.base_model, "rotary_emb", None)
    if rotary is None:
        raise UnsupportedModelError(f"{name}: no rotary embedding module found (base_model.rotary_emb)")
    n_layers = int(config.num_hidden_layers)
    layer_types = list(getattr(config, "layer_types", None) or ["full_attention"] * n_layers)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)
    ropes = []
    for layer_type in layer_types:
        if hasattr(rotary, "layer_types"):  # one rotary per layer type (Gemma-3: local and global bases)
            inv_freq = getattr(rotary, f"{layer_type}_inv_freq")
            scaling = getattr(rotary, f"{layer_type}_attention_scaling")
            rope_type = rotary.rope_type[layer_type]
        else:
            inv_freq, scaling, rope_type = rotary.inv_freq, rotary.attention_scaling, rotary.rope_type
        if rope_type not in STATIC_ROPE_TYPES or float(scaling) != 1.0:
            raise UnsupportedModelError(
                f"{name}: rope type '{rope_type}' (attention scaling {scaling}) is not supported by the streaming "
                f"cache (supported: {', '.join(STATIC_ROPE_TYPES)} with no attention scaling)"
            )
        if 2 * inv_freq.numel() != head_dim:
            raise UnsupportedModelError(f"{name}: partial rotary ({2 * inv_freq.numel()} of {head_dim} dims) "
                                        "is not supported by the streaming cache")
        ropes.append(Rope(inv_freq.detach().float().clone()))
    return ropes


def _position_ids(args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor | None:
    """The position ids the model used, if the attention layer passed them on to the cache."""
    for candidate in (*args, kwargs, kwargs.get("kwargs"), kwargs.get("cache_kwargs")):
        if isinstance(candidate, dict):
            position_ids = candidate.get("position_ids")
            if isinstance(position_ids, torch.Tensor):
                return position_ids
    return None


class StreamingLayer(DynamicLayer):
    """One layer: raw (un-rotated) keys and values of the sinks + recent window; rotated at use."""

    is_sliding = False
    is_croppable = False

    def __init__(self, sink_tokens: int, window: int, rope: Rope) -> None:
        super().__init__()
        self.sink_tokens = sink_tokens
        self.window = window
        self.capacity = sink_tokens + window
        self.rope = rope

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        stored, new = self.get_seq_length(), key_states.shape[-2]
        if stored + new > self.capacity:
            raise InputError(f"the streaming cache holds {stored} tokens and can take at most "
                             f"{self.capacity - stored} more in one forward pass (got {new}); feed the stream in "
                             "smaller pieces")
        position_ids = _position_ids(args, kwargs)
        expected = torch.arange(stored, stored + new, device=key_states.device)
        if position_ids is not None and not bool((position_ids.to(expected.device) == expected).all()):
            raise InputError("the streaming cache assigns positions itself (a token's index in the cache); "
                             "do not pass position_ids")
        cos, sin = self.rope.cos_sin(stored + new, key_states.device, key_states.dtype)
        # Undo the rotary the model applied at positions stored..stored+new-1, keep the raw keys.
        raw = rotate(key_states, cos[stored:], -sin[stored:])
        assert self.keys is not None and self.values is not None  # set by lazy_initialization
        self.keys = torch.cat([self.keys, raw], dim=-2)
        self.values = torch.cat([self.values, value_states], dim=-2)
        keys, values = rotate(self.keys, cos, sin), self.values  # every key at its index in the cache
        if self.keys.shape[-2] >= self.capacity:
            self._evict(self.capacity - 1)  # make room for the next token
        return keys, values

    def _evict(self, keep: int) -> None:
        """Keep the sinks and the most recent ``keep - sink_tokens`` tokens."""
        assert self.keys is not None and self.values is not None
        n = self.keys.shape[-2]
        recent = keep - self.sink_tokens
        index = torch.cat([torch.arange(self.sink_tokens), torch.arange(n - recent, n)]).to(self.keys.device)
        self.keys = self.keys.index_select(-2, index)
        self.values = self.values.index_select(-2, index)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_max_length(self) -> int:
        return self.capacity

    def crop(self, tokens_to_remove: int) -> None:
        raise InputError("a streaming cache cannot be cropped (evicted tokens are gone)")


class StreamingCache(Cache):
    """StreamingLLM: the first ``sink_tokens`` tokens + the ``window`` most recent (see the module docstring).

    Use it as the model's cache in a forward loop, without position ids (the cache assigns them)::

        cache = StreamingCache(model, sink_tokens=4, window=256)
        for token in stream:
            logits = model(input_ids=token.view(1, 1), cache=cache, use_cache=True).logits
    """

    def __init__(self, model: LoadedModel | Any, sink_tokens: int = 4, window: int = 256) -> None:
        if sink_tokens < 0 or window < 1:
            raise InputError(f"need sink_tokens >= 0 and window >= 1 (got {sink_tokens}, {window})")
        self.sink_tokens, self.window = int(sink_tokens), int(window)
        layers: list[Any] = [StreamingLayer(self.sink_tokens, self.window, rope) for rope in layer_ropes(model)]
        super().__init__(layers=layers)

    @property
    def capacity(self) -> int:
        return self.sink_tokens + self.window

    def __repr__(self) -> str:
        return f"StreamingCache(sink_tokens={self.sink_tokens}, window={self.window}, layers={len(self.layers)})"


def cache_nbytes(cache: Cache) -> int:
    """Bytes a cache holds: its own count where it keeps one (`kvcache.QuantisedCache.nbytes`: quantised tokens
    as packed payload and scales), else the bytes of its key and value tensors (any transformers `Cache`)."""
    own = getattr(cache, "nbytes", None)
    if callable(own):
        return int(own())
    total = 0
    for layer in cache.layers:
        for tensor in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(tensor, torch.Tensor):
                total += tensor.numel() * tensor.element_size()
    return total


def cache_argument(model: Any) -> str:
    """The keyword a model's forward takes its cache under (``cache`` from transformers 5.x on)."""
    parameters = inspect.signature(model.forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"

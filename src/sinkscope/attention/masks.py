"""The one parser of the attention masks transformers hands an attention function (shapes: see `capture`).

transformers builds masks through its mask interface; we register sdpa-style masks, so a layer receives a
boolean mask, or None where plain causal attention needs none (no padding, no window in reach). Models
that build their own masks may still pass an additive float mask; its finite values are kept as a bias.
"""

from __future__ import annotations

import torch


def parse_mask(attention_mask: torch.Tensor | None, key_length: int) -> tuple[torch.Tensor | None,
                                                                             torch.Tensor | None]:
    """(allowed, bias) from a layer's mask, cut to the call's ``key_length`` keys.

    ``allowed``: bool [B|1, 1|H, T, S] or None (plain causal); ``bias``: the additive float mask itself
    [B|1, 1|H, T, S], or None for boolean masks."""
    if attention_mask is None:
        return None, None
    attention_mask = attention_mask[..., :key_length]
    if attention_mask.dtype == torch.bool:
        return attention_mask, None
    return attention_mask > torch.finfo(attention_mask.dtype).min / 2, attention_mask


def dense_allowed(allowed: torch.Tensor | None, query_length: int, key_length: int, causal: bool,
                  device: torch.device) -> torch.Tensor:
    """``allowed`` as a tensor, bool [B|1, 1|H, T, S]. None stands for plain causal attention with the
    queries as the last T of the S keys, or for every key when there is one query or no causal mask."""
    if allowed is not None:
        return allowed
    if not causal or query_length == 1:
        return torch.ones(1, 1, query_length, key_length, dtype=torch.bool, device=device)
    queries = torch.arange(query_length, device=device)[:, None] + (key_length - query_length)
    return (queries >= torch.arange(key_length, device=device)[None, :])[None, None]


def additive_mask(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """bool ``allowed`` as the additive mask the CPU flash op takes: 0 where allowed, -inf elsewhere."""
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed, float("-inf"))

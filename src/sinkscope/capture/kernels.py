"""Attention kernels for the capture engine. Each returns the layer's output and the log of its softmax
normaliser (`lse`, including a learned sink logit if the layer has one), so probes can recover any single
attention weight as ``exp(score - lse)`` without the n x n matrix.

- `fused_attention`: PyTorch's fused CPU flash kernel, which returns the logsumexp it computes anyway.
  Without padding or a window it is one causal call; otherwise it runs over query chunks, each against
  only the keys that chunk can see (a band for sliding-window layers), so memory stays O(chunk x keys).
- `chunked_attention`: explicit logits per query chunk. Handles what the fused op cannot express
  (Gemma-2 soft-capping, additive position biases, non-CPU devices).
- `sigmoid_attention`: the sigmoid-attention lab variant (no normaliser), over query chunks.
- `eager_attention`: the full n x n softmax, written the way the models' own eager code is. The
  reference the other two are tested against; also the only kernel that exposes all weights.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

_flash_cpu = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu


@dataclass
class KernelOutput:
    output: torch.Tensor  # [B, H, T, Dv]
    lse: torch.Tensor  # [B, H, T] float32/64, -inf where a query sees no key and there is no sink
    weights: torch.Tensor | None = None  # [B, H, T, S], eager only


def repeat_kv(states: torch.Tensor, n_rep: int) -> torch.Tensor:
    """[B, KVH, S, D] -> [B, KVH * n_rep, S, D]: query head h reads kv head h // n_rep."""
    if n_rep == 1:
        return states
    b, kvh, s, d = states.shape
    return states[:, :, None].expand(b, kvh, n_rep, s, d).reshape(b, kvh * n_rep, s, d)


def _key_range(allowed: torch.Tensor) -> tuple[int, int]:
    """Smallest [lo, hi) covering every allowed key of a chunk (all keys if none is allowed)."""
    cols = allowed.reshape(-1, allowed.shape[-1]).any(0).nonzero()
    if cols.numel() == 0:
        return 0, allowed.shape[-1]
    return int(cols[0]), int(cols[-1]) + 1


def _add_sinks(lse: torch.Tensor, sinks: torch.Tensor | None) -> torch.Tensor:
    if sinks is None:
        return lse
    return torch.logaddexp(lse, sinks.to(lse.dtype)[None, :, None])


def fused_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    allowed: torch.Tensor | None,
    scaling: float,
    causal: bool,
    sinks: torch.Tensor | None = None,
    chunk_size: int = 1024,
    compute_dtype: torch.dtype | None = None,
) -> KernelOutput:
    """`allowed`: bool [B, 1|H, T, S] or None (then `causal` says whether the mask is causal or empty)."""
    out_dtype = query.dtype
    if compute_dtype is not None:
        query, key, value = query.to(compute_dtype), key.to(compute_dtype), value.to(compute_dtype)
    n_rep = query.shape[1] // key.shape[1]
    key, value = repeat_kv(key, n_rep), repeat_kv(value, n_rep)
    if allowed is None:
        output, lse = _flash_cpu(query, key, value, 0.0, causal and query.shape[2] > 1, scale=scaling)
    else:
        outputs, lses = [], []
        for start in range(0, query.shape[2], chunk_size):
            stop = min(start + chunk_size, query.shape[2])
            block = allowed[:, :, start:stop]
            lo, hi = _key_range(block)
            block = block[..., lo:hi]
            bias = torch.zeros(block.shape, dtype=query.dtype, device=query.device)
            bias.masked_fill_(~block, float("-inf"))
            out_c, lse_c = _flash_cpu(
                query[:, :, start:stop], key[:, :, lo:hi], value[:, :, lo:hi], 0.0, False,
                attn_mask=bias, scale=scaling,
            )
            # The kernel reports lse = 0 for a query that sees no key; the true normaliser is empty.
            lse_c = lse_c.masked_fill(~block.any(-1).expand_as(lse_c), float("-inf"))
            outputs.append(out_c)
            lses.append(lse_c)
        output, lse = torch.cat(outputs, 2), torch.cat(lses, 2)
    lse = lse.to(torch.float64 if compute_dtype == torch.float64 else torch.float32)
    total = _add_sinks(lse, sinks)
    if sinks is not None:
        # The sink takes its share of the normaliser: rescale the key-only output.
        output = output * torch.exp(lse - total).nan_to_num(0.0)[..., None].to(output.dtype)
    return KernelOutput(output.to(out_dtype), total)


def scores_block(
    query: torch.Tensor,
    key: torch.Tensor,
    scaling: float,
    softcap: float | None,
    bias: torch.Tensor | None,
    dtype: torch.dtype,
) -> torch.Tensor:
    """Attention logits as the model computes them: scale, soft-cap, then additive bias."""
    n_rep = query.shape[1] // key.shape[1]
    scores = torch.matmul(query.to(dtype), repeat_kv(key, n_rep).to(dtype).transpose(-1, -2)) * scaling
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if bias is not None:
        scores = scores + bias.to(dtype)
    return scores


def masked_score_blocks(
    query: torch.Tensor, key: torch.Tensor, allowed: torch.Tensor, scaling: float, softcap: float | None,
    bias: torch.Tensor | None, dtype: torch.dtype, chunk_size: int,
) -> Iterator[tuple[int, int, int, int, torch.Tensor]]:
    """(start, stop, lo, hi, scores) per query chunk [start, stop): the logits against the keys [lo, hi) that
    chunk can see, masked to -inf elsewhere. O(chunk x keys) memory."""
    for start in range(0, query.shape[2], chunk_size):
        stop = min(start + chunk_size, query.shape[2])
        block = allowed[:, :, start:stop]
        lo, hi = _key_range(block)
        bias_c = None if bias is None else bias[:, :, start:stop, lo:hi]
        scores = scores_block(query[:, :, start:stop], key[:, :, lo:hi], scaling, softcap, bias_c, dtype)
        yield start, stop, lo, hi, scores.masked_fill(~block[..., lo:hi], float("-inf"))


def chunked_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    allowed: torch.Tensor,
    scaling: float,
    softcap: float | None = None,
    bias: torch.Tensor | None = None,
    sinks: torch.Tensor | None = None,
    chunk_size: int = 1024,
    compute_dtype: torch.dtype = torch.float32,
) -> KernelOutput:
    """`allowed`: bool [B, 1|H, T, S]; `bias`: additive [B|1, H|1, T, S] or None."""
    n_rep = query.shape[1] // key.shape[1]
    outputs, lses = [], []
    for _, _, lo, hi, scores in masked_score_blocks(query, key, allowed, scaling, softcap, bias, compute_dtype,
                                                    chunk_size):
        lse = _add_sinks(torch.logsumexp(scores, -1), sinks)
        probs = torch.exp(scores - lse[..., None]).nan_to_num(0.0)
        outputs.append(torch.matmul(probs, repeat_kv(value[:, :, lo:hi], n_rep).to(compute_dtype)))
        lses.append(lse)
    return KernelOutput(torch.cat(outputs, 2).to(query.dtype), torch.cat(lses, 2))


def eager_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    allowed: torch.Tensor,
    scaling: float,
    softcap: float | None = None,
    bias: torch.Tensor | None = None,
    sinks: torch.Tensor | None = None,
    compute_dtype: torch.dtype = torch.float32,
) -> KernelOutput:
    """Full softmax over all keys (plus the sink column, dropped afterwards, as gpt-oss does)."""
    n_rep = query.shape[1] // key.shape[1]
    scores = scores_block(query, key, scaling, softcap, bias, compute_dtype)
    scores = scores.masked_fill(~allowed, float("-inf"))
    if sinks is not None:
        sink_column = sinks.to(compute_dtype).reshape(1, -1, 1, 1).expand(*scores.shape[:3], 1)
        scores = torch.cat([scores, sink_column], dim=-1)
    lse = torch.logsumexp(scores, -1)
    weights = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # a query that sees nothing gets no weight
    if sinks is not None:
        weights = weights[..., :-1]
    output = torch.matmul(weights, repeat_kv(value, n_rep).to(compute_dtype))
    return KernelOutput(output.to(query.dtype), lse, weights)


def entropy_fused(
    query: torch.Tensor, key: torch.Tensor, allowed: torch.Tensor | None, scaling: float, causal: bool,
    lse: torch.Tensor, sinks: torch.Tensor | None = None, chunk_size: int = 1024,
) -> torch.Tensor:
    """Row entropy of the attention distribution without the n x n matrix.

    With p_ij = exp(s_ij - lse_i) and s_ij = scale * q_i.k_j, the entropy is
    H_i = lse_i - scale * q_i . (sum_j p_ij k_j) - p_sink * sink; the weighted key sum is one more fused
    attention call with the keys as values. The learned sink (if any) counts as one more outcome.
    """
    keys_only = fused_attention(query, key, key, allowed, scaling, causal, None, chunk_size,
                                torch.float64 if lse.dtype == torch.float64 else None)
    # that call normalised over the keys only; rescale to the full (sink-including) normaliser
    share = torch.exp(keys_only.lse.to(lse.dtype) - lse).nan_to_num(0.0)
    weighted_keys = keys_only.output.to(lse.dtype) * share[..., None]
    entropy = lse - scaling * (query.to(lse.dtype) * weighted_keys).sum(-1)
    if sinks is not None:
        sink = sinks.to(lse.dtype)[None, :, None]
        entropy = entropy - torch.exp(sink - lse) * sink
    return torch.where(torch.isfinite(lse), entropy, torch.zeros((), dtype=lse.dtype))


def row_statistics_chunked(
    query: torch.Tensor, key: torch.Tensor, allowed: torch.Tensor, scaling: float, lse: torch.Tensor,
    softcap: float | None = None, bias: torch.Tensor | None = None, sinks: torch.Tensor | None = None,
    chunk_size: int = 1024,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(entropy, max weight over keys) per query from explicit logits, one query chunk at a time:
    O(chunk x keys) memory. Works for any logits (soft-capping, biases)."""
    entropies, maxima = [], []
    for start, stop, _, _, scores in masked_score_blocks(query, key, allowed, scaling, softcap, bias, lse.dtype,
                                                         chunk_size):
        log_p = scores - lse[:, :, start:stop, None]
        p = torch.exp(log_p)
        entropy = -(p * log_p).nan_to_num(0.0).sum(-1)
        if sinks is not None:
            log_sink = sinks.to(lse.dtype)[None, :, None] - lse[:, :, start:stop]
            entropy = entropy - (torch.exp(log_sink) * log_sink).nan_to_num(0.0)
        entropies.append(entropy)
        maxima.append(p.amax(-1).nan_to_num(0.0))
    return torch.cat(entropies, 2), torch.cat(maxima, 2)


def sigmoid_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    allowed: torch.Tensor,
    scaling: float,
    sigmoid_bias: float,
    chunk_size: int = 1024,
    compute_dtype: torch.dtype = torch.float32,
    keep_weights: bool = False,
) -> KernelOutput:
    """Sigmoid attention (a lab variant): p_ij = sigmoid(s_ij + bias) on allowed keys, no normalisation.
    There is no log-normaliser; ``lse`` is NaN so that anything relying on one fails loudly."""
    n_rep = query.shape[1] // key.shape[1]
    outputs, weights = [], []
    for _, _, lo, hi, scores in masked_score_blocks(query, key, allowed, scaling, None, None, compute_dtype,
                                                    chunk_size):
        probs = torch.sigmoid(scores + sigmoid_bias)  # masked logits are -inf: weight 0
        outputs.append(torch.matmul(probs, repeat_kv(value[:, :, lo:hi], n_rep).to(compute_dtype)))
        if keep_weights:
            weights.append(torch.nn.functional.pad(probs, (lo, key.shape[2] - hi)))
    lse = torch.full(query.shape[:3], float("nan"), dtype=compute_dtype, device=query.device)
    return KernelOutput(torch.cat(outputs, 2).to(query.dtype), lse, torch.cat(weights, 2) if keep_weights else None)

"""Attention kernels for the capture engine: one signature, one name -> kernel mapping, one dispatch.

Every kernel is ``kernel(inputs: AttentionInputs, options: KernelOptions) -> KernelOutput`` and returns
the layer's output and the log of its softmax normaliser (`lse`, a learned sink logit included), so any
single attention weight is ``exp(score - lse)`` without the n x n matrix. Shapes follow the conventions
in the `sinkscope.capture` docstring. All arithmetic runs in ``options.compute_dtype`` (float32 or
float64), whatever the model's dtype; only the output is cast back (to the model's dtype by default).

``KERNELS``:
- ``fused``: PyTorch's fused CPU flash kernel, which returns the logsumexp it computes anyway.
  Without padding or a window it is one causal call; otherwise it runs over query chunks, each against
  only the keys that chunk can see (a band for sliding-window layers), so memory stays O(chunk x keys).
- ``chunked``: explicit logits per query chunk. Handles what the fused op cannot express
  (Gemma-2 soft-capping, additive position biases, non-CPU devices).
- ``eager``: the full n x n softmax, written the way the models' own eager code is. The reference the
  others are tested against; also the only kernel that returns all weights.
- ``flex``: `torch.nn.attention.flex_attention` with the log-sum-exp it returns; masks, windows, padding,
  soft-capping and additive biases as its ``score_mod``, grouped K/V heads without expanding them. On CUDA
  it is compiled (a fused kernel); on CPU it runs flex's unfused reference, so the same logic is checked
  against eager in CI. ``auto`` picks it on CUDA.
- ``sigmoid``: sigmoid attention (a lab variant), p_ij = sigmoid(s_ij + b); no normaliser.
- ``softpick``: softpick (a lab variant), p_ij = relu(e^s_ij - 1) / sum_k |e^s_ik - 1|; rows sum to at most
  one. Its ``lse`` slot holds the log of that denominator, so a weight is still relu(e^s - 1) / e^lse.

`choose_kernel` picks the kernel for a call (the variant's own kernel, else what the engine's ``path``
asks for, else fused wherever it can express the layer); `run_kernel` runs one by name. The engine and
everything that re-runs a layer's attention (`AttentionCall.attend_with`, `weighted_sum`, ...) go
through these two.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, cast

import torch

from .masks import additive_mask, dense_allowed

_flash_cpu = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu


@dataclass(frozen=True)
class AttentionInputs:
    """One attention computation, as a kernel sees it."""

    query: torch.Tensor  # [B, H, T, D]
    key: torch.Tensor  # [B, KVH, S, D]
    value: torch.Tensor  # [B, KVH, S, Dv]
    allowed: torch.Tensor | None  # bool [B|1, 1|H, T, S]; None = plain causal (or every key, for one query)
    causal: bool
    scaling: float
    softcap: float | None = None
    bias: torch.Tensor | None = None  # additive logits [B|1, H|1, T, S]
    sinks: torch.Tensor | None = None  # per-head extra logit [H] in the normaliser
    logit_bias: float | None = None  # sigmoid attention: p_ij = sigmoid(s_ij + logit_bias)

    def dense_allowed(self) -> torch.Tensor:
        """`allowed` as a tensor, bool [B|1, 1|H, T, S]."""
        return dense_allowed(self.allowed, self.query.shape[2], self.key.shape[2], self.causal, self.query.device)


@dataclass(frozen=True)
class KernelOptions:
    compute_dtype: torch.dtype = torch.float32
    chunk_size: int = 1024
    keep_weights: bool = False  # also return the weights (eager always does; sigmoid on request)
    output_dtype: torch.dtype | None = None  # None = the query's dtype (what the model continues with)


@dataclass
class KernelOutput:
    output: torch.Tensor  # [B, H, T, Dv]
    lse: torch.Tensor  # [B, H, T] compute dtype; -inf where a query sees no key and there is no sink
    weights: torch.Tensor | None = None  # [B, H, T, S], eager (and sigmoid on request) only


Kernel = Callable[[AttentionInputs, KernelOptions], KernelOutput]


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


def keys_share(lse: torch.Tensor, sinks: torch.Tensor) -> torch.Tensor:
    """The keys' share of each row's normaliser when a per-head sink logit b_h [H] joins it:
    e^lse / (e^lse + e^b) = sigmoid(lse - b), [B, H, T] from the keys' log-normaliser ``lse`` (-inf: no key
    seen, share 0), in at least float32. A key-only softmax output times it is the output with the sink."""
    wide = torch.promote_types(lse.dtype, torch.float32)
    return torch.sigmoid(lse.to(wide) - sinks.to(wide)[None, :, None])


def softmax_weights(scores: torch.Tensor, allowed: torch.Tensor, sinks: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights [B, H, T, S], lse [B, H, T]): softmax over the allowed keys, a per-head sink logit [H] joining
    the normaliser as one more column that is dropped afterwards (as gpt-oss does). A query that sees no key
    (and has no sink) gets no weight and lse -inf."""
    scores = scores.masked_fill(~allowed, float("-inf"))
    if sinks is not None:
        column = sinks.to(scores.dtype).reshape(1, -1, 1, 1).expand(*scores.shape[:3], 1)
        scores = torch.cat([scores, column], dim=-1)
    weights = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    return (weights[..., :-1] if sinks is not None else weights), torch.logsumexp(scores, -1)


def _output_dtype(inputs: AttentionInputs, options: KernelOptions) -> torch.dtype:
    return options.output_dtype or inputs.query.dtype


def scores_block(query: torch.Tensor, key: torch.Tensor, scaling: float, softcap: float | None,
                 bias: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """Attention logits [B, H, T, S] as the model computes them: scale, soft-cap, then additive bias."""
    n_rep = query.shape[1] // key.shape[1]
    scores = torch.matmul(query.to(dtype), repeat_kv(key, n_rep).to(dtype).transpose(-1, -2)) * scaling
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if bias is not None:
        scores = scores + bias.to(dtype)
    return scores


def masked_score_blocks(inputs: AttentionInputs, dtype: torch.dtype,
                        chunk_size: int) -> Iterator[tuple[int, int, int, int, torch.Tensor]]:
    """(start, stop, lo, hi, scores) per query chunk [start, stop): the logits against the keys [lo, hi) that
    chunk can see, masked to -inf elsewhere. O(chunk x keys) memory."""
    allowed = inputs.dense_allowed()
    for start in range(0, inputs.query.shape[2], chunk_size):
        stop = min(start + chunk_size, inputs.query.shape[2])
        block = allowed[:, :, start:stop]
        lo, hi = _key_range(block)
        bias = None if inputs.bias is None else inputs.bias[:, :, start:stop, lo:hi]
        scores = scores_block(inputs.query[:, :, start:stop], inputs.key[:, :, lo:hi], inputs.scaling,
                              inputs.softcap, bias, dtype)
        yield start, stop, lo, hi, scores.masked_fill(~block[..., lo:hi], float("-inf"))


def fused_kernel(inputs: AttentionInputs, options: KernelOptions) -> KernelOutput:
    """Softmax attention through the CPU flash op (no soft-cap, no additive bias)."""
    dtype = options.compute_dtype
    query, key, value = inputs.query.to(dtype), inputs.key.to(dtype), inputs.value.to(dtype)
    width = value.shape[-1]
    if width < query.shape[-1]:  # the flash op wants values as wide as the keys: pad with zeros
        value = torch.nn.functional.pad(value, (0, query.shape[-1] - width))
    # K/V stay grouped (GQA): the op reads kv head h // n_rep itself, so they are never expanded.
    if inputs.allowed is None:
        output, lse = _flash_cpu(query, key, value, 0.0, inputs.causal and query.shape[2] > 1,
                                 scale=inputs.scaling)
    else:
        outputs, lses = [], []
        for start in range(0, query.shape[2], options.chunk_size):
            stop = min(start + options.chunk_size, query.shape[2])
            block = inputs.allowed[:, :, start:stop]
            lo, hi = _key_range(block)
            block = block[..., lo:hi]
            out_c, lse_c = _flash_cpu(query[:, :, start:stop], key[:, :, lo:hi], value[:, :, lo:hi], 0.0, False,
                                      attn_mask=additive_mask(block, dtype), scale=inputs.scaling)
            # The op reports lse = 0 for a query that sees no key; the true normaliser is empty.
            lse_c = lse_c.masked_fill(~block.any(-1).expand_as(lse_c), float("-inf"))
            outputs.append(out_c)
            lses.append(lse_c)
        output, lse = torch.cat(outputs, 2), torch.cat(lses, 2)
    lse = lse.to(dtype)
    if inputs.sinks is not None:  # the sink takes its share of the normaliser: rescale the key-only output
        output = output * keys_share(lse, inputs.sinks).to(output.dtype)[..., None]
    return KernelOutput(output[..., :width].to(_output_dtype(inputs, options)), _add_sinks(lse, inputs.sinks))


def chunked_kernel(inputs: AttentionInputs, options: KernelOptions) -> KernelOutput:
    """Softmax attention from explicit logits, one query chunk at a time: any logits (soft-cap, biases)."""
    dtype = options.compute_dtype
    n_rep = inputs.query.shape[1] // inputs.key.shape[1]
    outputs, lses = [], []
    for _, _, lo, hi, scores in masked_score_blocks(inputs, dtype, options.chunk_size):
        lse = _add_sinks(torch.logsumexp(scores, -1), inputs.sinks)
        probs = torch.exp(scores - lse[..., None]).nan_to_num(0.0)
        outputs.append(torch.matmul(probs, repeat_kv(inputs.value[:, :, lo:hi], n_rep).to(dtype)))
        lses.append(lse)
    return KernelOutput(torch.cat(outputs, 2).to(_output_dtype(inputs, options)), torch.cat(lses, 2))


def eager_kernel(inputs: AttentionInputs, options: KernelOptions) -> KernelOutput:
    """Full softmax over all keys (plus the sink column, dropped afterwards, as gpt-oss does)."""
    dtype = options.compute_dtype
    n_rep = inputs.query.shape[1] // inputs.key.shape[1]
    scores = scores_block(inputs.query, inputs.key, inputs.scaling, inputs.softcap, inputs.bias, dtype)
    weights, lse = softmax_weights(scores, inputs.dense_allowed(), inputs.sinks)
    output = torch.matmul(weights, repeat_kv(inputs.value, n_rep).to(dtype))
    return KernelOutput(output.to(_output_dtype(inputs, options)), lse, weights)


_compiled_flex: Callable[..., Any] | None = None


def _flex_attention() -> Callable[..., Any]:
    """flex_attention, compiled once for accelerators; the eager reference implementation on CPU."""
    global _compiled_flex
    from torch.nn.attention.flex_attention import flex_attention

    if _compiled_flex is None:
        _compiled_flex = torch.compile(flex_attention, dynamic=True)
    return _compiled_flex


def _score_mod(inputs: AttentionInputs, dtype: torch.dtype) -> Callable[..., torch.Tensor]:
    """The model's logit transform and mask as one flex ``score_mod``: soft-cap, additive bias, then -inf
    where a query may not see a key (causal with the queries last when there is no explicit mask)."""
    allowed, bias, softcap = inputs.allowed, inputs.bias, inputs.softcap
    bias = None if bias is None else bias.to(dtype)
    offset = inputs.key.shape[2] - inputs.query.shape[2]
    causal = inputs.causal and inputs.query.shape[2] > 1
    if allowed is not None:
        b_all, h_all = allowed.shape[0] > 1, allowed.shape[1] > 1
    if bias is not None:
        b_bias, h_bias = bias.shape[0] > 1, bias.shape[1] > 1

    def score_mod(score: torch.Tensor, b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor,
                  kv_idx: torch.Tensor) -> torch.Tensor:
        if softcap is not None:
            score = torch.tanh(score / softcap) * softcap
        if bias is not None:
            score = score + bias[b if b_bias else 0, h if h_bias else 0, q_idx, kv_idx]
        if allowed is not None:
            visible = allowed[b if b_all else 0, h if h_all else 0, q_idx, kv_idx]
        elif causal:
            visible = q_idx + offset >= kv_idx
        else:
            return score
        return torch.where(visible, score, torch.full_like(score, float("-inf")))

    return score_mod


def flex_kernel(inputs: AttentionInputs, options: KernelOptions) -> KernelOutput:
    """Softmax attention through flex_attention (any logits the model computes; grouped K/V heads)."""
    from torch.nn.attention.flex_attention import AuxRequest, flex_attention

    dtype = options.compute_dtype
    query, key, value = inputs.query.to(dtype), inputs.key.to(dtype), inputs.value.to(dtype)
    attend = _flex_attention() if query.device.type != "cpu" else cast(Callable[..., Any], flex_attention)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
        output, aux = attend(query, key, value, score_mod=_score_mod(inputs, dtype), scale=inputs.scaling,
                             enable_gqa=query.shape[1] != key.shape[1], return_aux=AuxRequest(lse=True))
    lse = aux.lse.to(dtype)
    seen = torch.isfinite(lse)
    output = torch.where(seen[..., None], output, torch.zeros((), dtype=output.dtype, device=output.device))
    total = _add_sinks(lse, inputs.sinks)
    if inputs.sinks is not None:
        output = output * torch.exp(lse - total).nan_to_num(0.0)[..., None]
    return KernelOutput(output.to(_output_dtype(inputs, options)), total)


def sigmoid_kernel(inputs: AttentionInputs, options: KernelOptions) -> KernelOutput:
    """Sigmoid attention: p_ij = sigmoid(s_ij + logit_bias) on allowed keys, no normalisation. There is no
    log-normaliser; ``lse`` is NaN so that anything relying on one fails loudly."""
    if inputs.logit_bias is None:
        raise ValueError("sigmoid attention needs a logit bias")
    dtype = options.compute_dtype
    n_rep = inputs.query.shape[1] // inputs.key.shape[1]
    outputs, weights = [], []
    for _, _, lo, hi, scores in masked_score_blocks(inputs, dtype, options.chunk_size):
        probs = torch.sigmoid(scores + inputs.logit_bias)  # masked logits are -inf: weight 0
        outputs.append(torch.matmul(probs, repeat_kv(inputs.value[:, :, lo:hi], n_rep).to(dtype)))
        if options.keep_weights:
            weights.append(torch.nn.functional.pad(probs, (lo, inputs.key.shape[2] - hi)))
    lse = torch.full(inputs.query.shape[:3], float("nan"), dtype=dtype, device=inputs.query.device)
    return KernelOutput(torch.cat(outputs, 2).to(_output_dtype(inputs, options)), lse,
                        torch.cat(weights, 2) if options.keep_weights else None)


SOFTPICK_EPS = 1e-6  # keeps the denominator of a row whose logits are all 0 away from zero


def softpick_terms(scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(numerators, |terms| summed, m): relu(e^s - 1) and sum_k |e^s_k - 1| scaled by e^-m (m = the row's
    largest logit, at least 0) so nothing overflows; masked logits (-inf) count for nothing."""
    m = scores.amax(-1, keepdim=True).clamp(min=0.0).nan_to_num(0.0)
    shifted = torch.exp(scores - m) - torch.exp(-m)  # (e^s - 1) e^-m; masked: -e^-m, excluded below
    seen = torch.isfinite(scores)
    shifted = torch.where(seen, shifted, torch.zeros((), dtype=shifted.dtype, device=shifted.device))
    return torch.relu(shifted), shifted.abs().sum(-1, keepdim=True) + SOFTPICK_EPS * torch.exp(-m), m


def softpick_kernel(inputs: AttentionInputs, options: KernelOptions) -> KernelOutput:
    """Softpick attention from explicit logits, one query chunk at a time (Zuhri et al. 2025)."""
    dtype = options.compute_dtype
    n_rep = inputs.query.shape[1] // inputs.key.shape[1]
    outputs, lses, weights = [], [], []
    for _, _, lo, hi, scores in masked_score_blocks(inputs, dtype, options.chunk_size):
        numerators, denominator, m = softpick_terms(scores)
        probs = numerators / denominator
        outputs.append(torch.matmul(probs, repeat_kv(inputs.value[:, :, lo:hi], n_rep).to(dtype)))
        lses.append((torch.log(denominator) + m)[..., 0])
        if options.keep_weights:
            weights.append(torch.nn.functional.pad(probs, (lo, inputs.key.shape[2] - hi)))
    return KernelOutput(torch.cat(outputs, 2).to(_output_dtype(inputs, options)), torch.cat(lses, 2),
                        torch.cat(weights, 2) if options.keep_weights else None)


KERNELS: dict[str, Kernel] = {
    "fused": fused_kernel,
    "chunked": chunked_kernel,
    "eager": eager_kernel,
    "flex": flex_kernel,
    "sigmoid": sigmoid_kernel,
    "softpick": softpick_kernel,
}
PATHS = ("auto", "fused", "chunked", "eager", "flex")  # what a CaptureEngine may be asked to use


def choose_kernel(inputs: AttentionInputs, path: str, required: str | None = None) -> str:
    """The kernel for one call: ``required`` (an attention variant's own kernel) if given; else the kernel
    ``path`` forces (chunked, eager); else (auto, fused) the fused one wherever it can express the layer."""
    if required is not None:
        return required
    if path not in PATHS:
        raise ValueError(f"path must be one of {PATHS}, not {path!r}")
    if path in ("chunked", "eager", "flex"):
        return path
    on_cpu = inputs.query.device.type == "cpu"
    if inputs.softcap is None and inputs.bias is None and on_cpu:
        return "fused"
    if not on_cpu and path == "auto":
        return "flex"  # compiled flex: fused on the GPU, any logits, lse included
    if path == "fused" and not on_cpu:
        warnings.warn("the fused kernel runs on CPU only; using the chunked kernel", stacklevel=3)
    return "chunked"


def run_kernel(name: str, inputs: AttentionInputs, options: KernelOptions) -> KernelOutput:
    """Run the kernel registered as ``name`` in `KERNELS`."""
    try:
        kernel = KERNELS[name]
    except KeyError:
        raise ValueError(f"unknown attention kernel {name!r}; known: {', '.join(KERNELS)}") from None
    return kernel(inputs, options)


def row_statistics(inputs: AttentionInputs, lse: torch.Tensor, chunk_size: int) -> tuple[torch.Tensor,
                                                                                          torch.Tensor]:
    """(entropy, max weight over keys) [B, H, T] per query from explicit logits in ``lse``'s dtype, one query
    chunk at a time: O(chunk x keys) memory. Any softmax logits (soft-capping, biases, a sink logit)."""
    entropies, maxima = [], []
    for start, stop, _, _, scores in masked_score_blocks(inputs, lse.dtype, chunk_size):
        log_p = scores - lse[:, :, start:stop, None]
        p = torch.exp(log_p)
        entropy = -(p * log_p).nan_to_num(0.0).sum(-1)
        if inputs.sinks is not None:
            log_sink = inputs.sinks.to(lse.dtype)[None, :, None] - lse[:, :, start:stop]
            entropy = entropy - (torch.exp(log_sink) * log_sink).nan_to_num(0.0)
        entropies.append(entropy)
        maxima.append(p.amax(-1).nan_to_num(0.0))
    return torch.cat(entropies, 2), torch.cat(maxima, 2)

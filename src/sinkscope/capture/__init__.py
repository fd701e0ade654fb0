"""Capturing what attention does: one engine (`CaptureEngine`), pluggable probes.

Modules, in dependency order: `engine` (the engine, `AttentionCall`, `Probe`; it calls the attention core of
`sinkscope.attention`: masks, kernels, variants, the registered attention function), `interventions` (what a
condition does to the attention on the first token), `cache` (the StreamingLLM cache), `kvcache` (quantised
and evicting caches, the presses), `probes` (what is recorded at every layer, the compressed caches' included).

Conventions (every module of this package, and every table built on it, uses these)
-----------------------------------------------------------------------------------
Sizes
  B    batch rows
  H    query heads;  KVH  key/value heads (KVH = H, or fewer with GQA: query head h reads kv head
       h // (H // KVH))
  T    queries in one attention call (the tokens of this forward; 1 per step when decoding with a cache)
  S    keys in one attention call (= T without a cache; cached + new with one; on a sliding-window layer
       with a cache, at most window - 1 + T)
  D    head dimension of queries and keys;  Dv  of values (= D in every supported model)
  L    attention layers (= transformer blocks)

Tensors of one call (as the layer hands them to its attention function: after rotary and q/k norms)
  query [B, H, T, D]     key [B, KVH, S, D]     value [B, KVH, S, Dv]
  output [B, H, T, Dv]   each head's attention output, before the output projection; in the model's dtype
  lse [B, H, T]          log of the softmax normaliser, the extra (sink) logit included; in the compute
                         dtype (float32/float64, whatever the model's dtype); -inf where a query sees no
                         key and there is no sink; NaN for sigmoid attention (it has no normaliser)
  weights [B, H, T, S]   attention probabilities (the sink's share excluded), eager kernel only
  allowed                bool [B|1, 1|H, T, S], True = the query may attend to the key; None = plain
                         causal attention with the queries as the last T of the S keys (or every key,
                         for one query)
  bias                   additive logits [B|1, H|1, T, S] (float masks, position biases), or None
  sinks                  per-head extra logit [H] in the normaliser (gpt-oss sinks; the lab's off-by-one
                         zero and learned sink), or None
  Masks from transformers are parsed once, by `masks.parse_mask`.

Positions
  A position is a column of the batch given to the engine (``input_ids[:, p]``; generated tokens continue
  the numbering). ``BatchInfo.first_positions[b]``: the position of row b's first real token (left
  padding moves it). In a call, key j holds position ``key_offset + j`` and query i position
  ``query_offset + i`` (the newest T positions). Find a token by its position (`AttentionCall.locate_key`), never by
  key index: once a sliding window has moved during cached generation, key 0 is not the first token.

Layers and depth
  ``layer``  an attention block, 0..L-1 (the module's ``layer_idx``): what probes' records are keyed by.
  ``depth``  a point of the residual stream, 0..L: 0 = the embeddings, d = the output of block d - 1,
             L = the stream before the final norm. ``engine.forward(..., residual=True).residual`` is
             [L + 1, B, T, d_model], indexed by depth.
"""

from ..attention.interface import IMPLEMENTATION, install, restore, sinkscope_attention, variant_of
from ..attention.kernels import KERNELS, AttentionInputs, KernelOptions, KernelOutput, choose_kernel, run_kernel
from ..attention.variants import VARIANT_NAMES, VARIANTS, AttentionVariant, module_variant, register_variant
from .engine import AttentionCall, BatchInfo, CaptureEngine, Probe, capture, final_norm
from .interventions import INTERVENTION_TYPES, SinkIntervention, make_intervention
from .probes import (
    AttentionEntropy,
    AttentionWeights,
    FirstTokenAttention,
    KeyAttention,
    RandomKeyKnockout,
    SinkKnockout,
    TextStartAttention,
    ValueNorms,
)

__all__ = [
    "IMPLEMENTATION", "KERNELS", "VARIANTS", "VARIANT_NAMES", "AttentionCall", "AttentionEntropy",
    "AttentionInputs", "AttentionVariant", "AttentionWeights", "BatchInfo", "CaptureEngine", "FirstTokenAttention",
    "KernelOptions", "KernelOutput", "KeyAttention", "Probe", "RandomKeyKnockout", "SinkKnockout", "ValueNorms",
    "TextStartAttention", "INTERVENTION_TYPES", "SinkIntervention", "make_intervention",
    "capture", "choose_kernel", "final_norm", "install", "module_variant", "register_variant", "restore", "run_kernel",
    "sinkscope_attention", "variant_of",
]

"""Probes: small objects the capture engine calls at every attention layer.

Records are per ``layer`` (attention block 0..L-1); shapes and positions follow the conventions in the
`sinkscope.capture` package docstring. Tokens are found by position (`AttentionCall.locate_key`), so the
probes stay right when a sliding window has moved during cached generation.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import torch
from transformers.cache_utils import Cache

from ..attention.kernels import row_statistics, run_kernel, scores_block
from ..conditions import Intervention
from .engine import AttentionCall, BatchInfo, CaptureEngine, Probe
from .interventions import RandomKey, SinkIntervention, make_intervention
from .kvcache import KVPRESS_SNAPKV_WINDOW, QueryRecord, compressed_layer


class FirstTokenAttention(Probe):
    """Per (layer, head, query): the attention on each row's first real token, in O(n) memory.

    Records, per layer, on CPU:
      ``attention``   float [B, H, T]  weight on the first token (position ``first_positions[b]``)
      ``visible``     bool  [B, 1|H, T] the query is a real token and may attend to the first token
                      (False where a sliding window no longer holds it)
      ``first_k``     float [B, H, T]  summed weight on the first ``first_k`` tokens (StreamingLLM's sinks)
      ``sink_logit``  float [B, H, T]  share taken by a learned sink logit (gpt-oss), absent otherwise
      ``gate``        float [B, H, T]  mean output gate of gated attention (a lab variant's or the model's own,
                      Qwen3-Next's), absent otherwise
    """

    def __init__(self, first_k: int = 4) -> None:
        if first_k < 1:
            raise ValueError("first_k must be >= 1")
        self.first_k = first_k
        self.records: dict[int, dict[str, torch.Tensor]] = {}
        self._batch: BatchInfo | None = None

    def start(self, batch: BatchInfo, engine: CaptureEngine) -> None:
        self.records = {}
        self._batch = batch

    def on_attention(self, call: AttentionCall) -> None:
        first = call.batch.first_positions
        attention = call.key_attention(first)
        mass = attention.clone()
        for offset in range(1, self.first_k):
            mass += call.key_attention(first + offset)
        query_valid = call.query_valid()[:, None, :]
        record = {
            "attention": attention.float().cpu(),
            "visible": (call.key_allowed(first, model_mask=True) & query_valid).cpu(),
            "first_k": mass.float().cpu(),
        }
        sink = call.sink_attention()
        if sink is not None:
            record["sink_logit"] = sink.float().cpu()
        gate = call.gate()
        if gate is not None:  # gated attention: the mean gate of each head's output, per query
            record["gate"] = gate.detach().float().mean(-1).cpu()
        self.records[call.layer] = record

    def layers(self) -> list[int]:
        """The recorded layers, in the order `per_prompt` stacks them (every layer but a hybrid model's
        linear-attention ones)."""
        return sorted(self.records)

    def per_prompt(self, row: int) -> dict[str, torch.Tensor]:
        """Stack the layers for one batch row, cut to its real tokens: [L, H, n] (visible: [L, 1|H, n]);
        row l of the stack is layer ``layers()[l]``."""
        assert self._batch is not None
        mask = self._batch.attention_mask[row].bool().cpu()
        start = int(self._batch.first_positions[row])
        length = int(mask.sum())
        layers = sorted(self.records)
        out = {}
        for name in self.records[layers[0]]:
            out[name] = torch.stack([self.records[layer][name][row] for layer in layers])[..., start:start + length]
        return out


class TextStartAttention(Probe):
    """Where the sink is: per (layer, head, query), the attention on each row's first token and on its first
    *text* token (``text_starts[b]`` positions after the first; 0 when nothing precedes the text), so "the
    sink is gone" and "the sink moved to the first text token" are measured, not assumed.

    Records, per layer, on CPU: ``first`` / ``text`` float [B, H, T] and ``first_visible`` / ``text_visible``
    bool [B, 1|H, T] (real queries that may attend to that key).
    """

    def __init__(self, text_starts: Sequence[int]) -> None:
        self.text_starts = [int(x) for x in text_starts]
        self.records: dict[int, dict[str, torch.Tensor]] = {}

    def start(self, batch: BatchInfo, engine: CaptureEngine) -> None:
        if len(self.text_starts) != batch.input_ids.shape[0]:
            raise ValueError("TextStartAttention needs one text start per batch row")
        self.records = {}

    def on_attention(self, call: AttentionCall) -> None:
        first = call.batch.first_positions
        text = first + torch.tensor(self.text_starts, device=first.device, dtype=first.dtype)
        query_valid = call.query_valid()[:, None, :]
        self.records[call.layer] = {
            "first": call.key_attention(first).float().cpu(),
            "text": call.key_attention(text).float().cpu(),
            "first_visible": (call.key_allowed(first, model_mask=True) & query_valid).cpu(),
            "text_visible": (call.key_allowed(text, model_mask=True) & query_valid).cpu(),
        }


class AttentionWeights(Probe):
    """Full attention weights per layer, ``records[layer]``: float [B, H, T, S] on CPU (learned-sink
    share excluded, as the model's own eager weights). Needs the eager kernel: O(n^2) memory, so it is
    for short inputs (path-sum bounds, attention maps)."""

    def __init__(self) -> None:
        self.records: dict[int, torch.Tensor] = {}

    def start(self, batch: BatchInfo, engine: CaptureEngine) -> None:
        if engine.path != "eager":
            raise ValueError("AttentionWeights needs CaptureEngine(..., path='eager')")
        self.records = {}

    def on_attention(self, call: AttentionCall) -> None:
        assert call.weights is not None
        self.records[call.layer] = call.weights.float().cpu()

    def stacked(self) -> torch.Tensor:
        """[L, B, H, T, S]."""
        return torch.stack([self.records[layer] for layer in sorted(self.records)])


class AttentionEntropy(Probe):
    """Per (layer, head, query): entropy of the attention distribution and (optionally) its max weight.

    ``records[layer]``: ``entropy`` and ``max_weight`` float [B, H, T]; with ``with_counts``, ``n_keys``
    long [B, 1|H, T], the keys each query may attend to (under the intervention in force: entropy's upper
    bound is log n_keys); with ``text_start`` k, ``entropy_text`` float [B, H, T], the entropy over the keys
    from k positions after the first token on, renormalised (the same keys with and without a prefix).
    On the fused path the entropy takes O(n) memory (one more attention call with the keys as values); the
    max weight needs a chunked pass over the logits, and the key counts a T x S mask, so ``with_max=False``
    and ``with_counts=False`` are the choice for very long inputs.
    """

    def __init__(self, with_max: bool = True, with_counts: bool = False, text_start: int | None = None) -> None:
        self.with_max = with_max
        self.with_counts = with_counts
        self.text_start = text_start
        self.records: dict[int, dict[str, torch.Tensor]] = {}

    def start(self, batch: BatchInfo, engine: CaptureEngine) -> None:
        self.records = {}

    def on_attention(self, call: AttentionCall) -> None:
        entropy, maximum = call.entropy_and_max(self.with_max)
        record = {"entropy": entropy.float().cpu()}
        if maximum is not None:
            record["max_weight"] = maximum.float().cpu()
        if self.with_counts:
            record["n_keys"] = call.dense_allowed().sum(-1).expand(call.query.shape[0], -1, -1).cpu()
        if self.text_start is not None:
            record["entropy_text"] = self._text_entropy(call).float().cpu()
        self.records[call.layer] = record

    def _text_entropy(self, call: AttentionCall) -> torch.Tensor:
        """float [B, H, T]: the entropy of each query's weights over the keys from ``text_start`` positions after
        the first token on, renormalised (a learned sink's share left out too): the softmax over those keys'
        logits, computed from them directly (stable where they hold a tiny share of the row); NaN where a
        query sees none of them."""
        b, _, t, _ = call.query.shape
        first = call.batch.first_positions.to(call.query.device)
        keys = call.key_positions
        prefix = (keys[None, :] >= first[:, None]) & (keys[None, :] < first[:, None] + int(self.text_start or 0))
        allowed = call.dense_allowed().expand(b, -1, t, -1) & ~prefix[:, None, None, :]
        inputs = replace(call.inputs, allowed=allowed, sinks=None)
        lse = run_kernel("chunked", inputs, replace(call.options, keep_weights=False)).lse
        entropy, _ = row_statistics(inputs, lse, call.options.chunk_size)
        return torch.where(torch.isfinite(lse), entropy, torch.nan)


class ValueNorms(Probe):
    """The no-op mechanism, per (layer, head): value-vector norms and what the first token contributes.

    ``records[layer]``:
      ``value_norm``   float [B, H, S]  ||v_j|| of every key token (v = W_V norm(h_j), per query head's kv head)
      ``first_share``  float [B, H, T]  a_i0 ||v_0|| / sum_j a_ij ||v_j||: the first token's share of the output
      ``output_norm``  float [B, H, T]  ||o_i||, the head's output before W_O
      ``first_attention`` float [B, H, T]  a_i0, to split queries into sinking and not
    """

    def __init__(self) -> None:
        self.records: dict[int, dict[str, torch.Tensor]] = {}

    def start(self, batch: BatchInfo, engine: CaptureEngine) -> None:
        self.records = {}

    def on_attention(self, call: AttentionCall) -> None:
        first = call.batch.first_positions
        norms = call.value.float().norm(dim=-1)  # [B, KVH, S]
        attention = call.key_attention(first)
        index, present = call.locate_key(first)
        first_norm = norms[torch.arange(norms.shape[0]), :, index] * present[:, None]  # [B, KVH]
        n_rep = call.n_heads // norms.shape[1]
        first_norm = first_norm.repeat_interleave(n_rep, dim=1)[..., None]
        total = call.weighted_sum(norms[..., None])[..., 0]
        share = torch.where(total > 0, attention * first_norm / total.clamp_min(1e-30), torch.zeros_like(total))
        self.records[call.layer] = {
            "value_norm": norms.repeat_interleave(n_rep, dim=1).cpu(),
            "first_share": share.float().cpu(),
            "output_norm": call.output.float().norm(dim=-1).cpu(),
            "first_attention": attention.float().cpu(),
        }


class SinkKnockout(Probe):
    """Intervention as a probe: remove each later query's attention to the first token and renormalise over
    the rest (`interventions.Knockout`, the mechanism of the ``knockout`` condition).

    ``heads``: None (every head of every layer) or ``{layer: None | [head, ...]}``; the selection may be
    changed between forwards. Exactly an explicit attention mask (tested against one; during cached
    generation too, where the first token is found by its position and a sliding window that no longer
    holds it leaves the layer alone). A learned sink logit (gpt-oss) keeps its place in the normaliser.
    Prefer ``engine.intervening("add+knockout@...")``; this probe serves per-layer head lists.
    """

    kind = "knockout"

    def __init__(self, heads: dict[int, list[int] | None] | None = None) -> None:
        self.heads = heads

    def _spec(self, layer: int) -> Intervention | None:
        if self.heads is None:
            return Intervention(self.kind)
        if layer not in self.heads:
            return None
        chosen = self.heads[layer]
        return Intervention(self.kind, layers=(layer,), heads=None if chosen is None else tuple(sorted(chosen)))

    def _intervention(self, spec: Intervention) -> SinkIntervention:
        return make_intervention(spec)

    def on_attention(self, call: AttentionCall) -> torch.Tensor | None:
        spec = self._spec(call.layer)
        if spec is None:
            return None
        return call.output if self._intervention(spec).apply(call) else None


class KeyAttention(Probe):
    """Per (layer, head, key): the attention every key receives, summed over the queries that may see it,
    in O(chunk x n) memory (Gu et al.'s alpha_k for every key k, not only the first).

    From the call's log-normaliser, each query block's weights p_ij = exp(s_ij - lse_i) (s_ij the logits as
    the model computes them: scale, soft-cap, additive bias; the layer's own mask; a learned sink's share
    stays in lse) are summed over the block's real queries, one block of ``chunk_size`` queries at a time;
    the n x n matrix never exists. For sigmoid attention p_ij = sigmoid(s_ij + b).

    Records, per layer, on CPU (key j of the call holds position ``key_offset + j``):
      ``received``  float [B, H, S]    sum over real queries i that may attend to key j of p_ij
      ``queries``   int   [B, 1|H, S]  how many real queries may attend to key j (its own query included)
    alpha_j = received_j / queries_j: the mean attention key j receives from the queries that can see it.
    A forward pass without a cache gives one call per layer (key j = position j); for generation, each
    step's call would add its own records, so use `CaptureEngine.forward`.
    """

    def __init__(self, chunk_size: int = 512) -> None:
        if chunk_size < 1:
            raise ValueError("chunk_size must be >= 1")
        self.chunk_size = chunk_size
        self.records: dict[int, dict[str, torch.Tensor]] = {}
        self._batch: BatchInfo | None = None

    def start(self, batch: BatchInfo, engine: CaptureEngine) -> None:
        self.records = {}
        self._batch = batch

    def _block_allowed(self, call: AttentionCall, start: int, stop: int, model_mask: bool = False) -> torch.Tensor:
        """bool [B|1, 1|H, stop - start, S]: the call's mask (the intervention's, or with ``model_mask`` the
        model's own) for queries [start, stop), built only for those rows when the call has none (plain causal)."""
        allowed = (call.model_inputs or call.inputs).allowed if model_mask else call.allowed
        if allowed is not None:
            return allowed[:, :, start:stop]
        t, s = call.query.shape[2], call.key.shape[2]
        keys = torch.arange(s, device=call.query.device)
        if not call.causal or t == 1:
            return torch.ones(1, 1, stop - start, s, dtype=torch.bool, device=keys.device)
        queries = torch.arange(start, stop, device=keys.device) + (s - t)
        return (queries[:, None] >= keys[None, :])[None, None]

    def on_attention(self, call: AttentionCall) -> None:
        inputs, dtype = call.inputs, call.options.compute_dtype
        b, h, t, _ = call.query.shape
        s = call.key.shape[2]
        real = call.query_valid()  # [B, T]
        received = torch.zeros(b, h, s, dtype=dtype, device=call.query.device)
        queries: torch.Tensor | None = None
        for start in range(0, t, self.chunk_size):
            stop = min(start + self.chunk_size, t)
            block = self._block_allowed(call, start, stop) & real[:, None, start:stop, None]
            # alpha's denominator: the queries that could see the key in the model (a knock-out zeroes the weight)
            seen = self._block_allowed(call, start, stop, model_mask=True) & real[:, None, start:stop, None]
            counts = seen.sum(2, dtype=torch.int64)  # [B, 1|H, S]
            queries = counts if queries is None else queries + counts
            cols = block.reshape(-1, s).any(0).nonzero()
            if cols.numel() == 0:
                continue
            lo, hi = int(cols[0]), int(cols[-1]) + 1
            bias = None if inputs.bias is None else inputs.bias[:, :, start:stop, lo:hi]
            scores = scores_block(inputs.query[:, :, start:stop], inputs.key[:, :, lo:hi], inputs.scaling,
                                  inputs.softcap, bias, dtype)  # [B, H, chunk, hi - lo]
            weights = call.variant.key_weight(scores, call.lse[:, :, start:stop, None].to(dtype), inputs.logit_bias)
            weights = torch.where(block[..., lo:hi], weights, torch.zeros((), dtype=dtype, device=weights.device))
            received[..., lo:hi] += weights.sum(2)
        assert queries is not None
        self.records[call.layer] = {"received": received.float().cpu(), "queries": queries.cpu()}

    def alpha(self, row: int) -> dict[str, torch.Tensor]:
        """One batch row, its real tokens only, the layers stacked: ``alpha`` float [L, H, n] (NaN where no
        query sees a key), ``received`` float [L, H, n], ``queries`` int [L, H, n]."""
        assert self._batch is not None
        start = int(self._batch.first_positions[row])
        length = int(self._batch.attention_mask[row].sum())
        layers = sorted(self.records)
        received = torch.stack([self.records[layer]["received"][row] for layer in layers])[..., start:start + length]
        queries = torch.stack([self.records[layer]["queries"][row].expand(received.shape[1], -1)
                               for layer in layers])[..., start:start + length]
        alpha = torch.where(queries > 0, received / queries.clamp_min(1), torch.full_like(received, float("nan")))
        return {"alpha": alpha, "received": received, "queries": queries}


class RandomKeyKnockout(SinkKnockout):
    """Control for `SinkKnockout` with the same budget (`interventions.RandomKey`, the ``random-key``
    condition): remove each later query's attention to *one key drawn at random* among the keys it may attend
    to other than the first token, and renormalise over the rest; seeded by ``seed``, the layer and the row's
    token ids. ``removed[layer]``: long [B, T], the key index each query lost (-1: none).
    """

    kind = "random-key"

    def __init__(self, heads: dict[int, list[int] | None] | None = None, seed: int = 0) -> None:
        super().__init__(heads)
        self.seed = int(seed)
        self.removed: dict[int, torch.Tensor] = {}

    def start(self, batch: BatchInfo, engine: CaptureEngine) -> None:
        self.removed = {}

    def _intervention(self, spec: Intervention) -> SinkIntervention:
        intervention = RandomKey(replace(spec, seed=self.seed))
        intervention.removed = self.removed
        return intervention


# -- compressed caches (`capture.kvcache`) ----------------------------------------------------------------
class LastQueries(Probe):
    """Per layer, the last ``n`` queries of each forward (for query-aware presses such as SnapKV, whose kvpress
    window is 64 queries)."""

    def __init__(self, n: int = KVPRESS_SNAPKV_WINDOW) -> None:
        self.n = n
        self.records: dict[int, QueryRecord] = {}

    def on_attention(self, call: AttentionCall) -> None:
        self.records[call.layer] = QueryRecord(call.query[:, :, -self.n:].detach().clone(), call.scaling,
                                               call.softcap)


class KeptSinkMass(Probe):
    """Per layer: the attention each query gives the key holding ``position`` (0 when the cache no longer
    holds it or the query may not see it), read through the engine from the compressed cache's
    ``read_positions`` (after per-head eviction the key sits at another index in each key/value head).

    ``records[layer]``: float [B, H, T] on CPU."""

    def __init__(self, cache: Cache, position: int = 0) -> None:
        self.cache = cache
        self.position = position
        self.records: dict[int, torch.Tensor] = {}

    def start(self, batch: BatchInfo, engine: CaptureEngine) -> None:
        self.records = {}

    def on_attention(self, call: AttentionCall) -> None:
        batch, kv_heads, held, _ = call.key.shape
        positions = compressed_layer(self.cache, call.layer).read_positions.to(call.key.device)
        hits = positions.expand(batch, kv_heads, held) == self.position
        index = hits.long().argmax(-1)  # [B, KVH]: where the position sits in each key/value head
        key = call.key.gather(2, index[..., None, None].expand(-1, -1, 1, call.key.shape[-1]))[:, :, 0]
        weight = call.variant.key_weight(call.scores_against(key), call.lse, call.inputs.logit_bias)
        group = call.n_heads // kv_heads
        present, index = (t.repeat_interleave(group, 1) for t in (hits.any(-1), index))  # per query head
        allowed = call.dense_allowed().expand(batch, call.n_heads, -1, -1)
        visible = allowed.gather(3, index[:, :, None, None].expand(-1, -1, allowed.shape[2], 1))[..., 0]
        weight = torch.where(visible & present[..., None], weight, torch.zeros((), dtype=weight.dtype))
        self.records[call.layer] = weight.float().cpu()

    def mean(self) -> float:
        """Mean over layers, heads and queries of the last forward."""
        return float(torch.stack([r.mean() for r in self.records.values()]).mean())

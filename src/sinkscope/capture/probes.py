"""Probes: small objects the capture engine calls at every attention layer.

Records are per ``layer`` (attention block 0..L-1); shapes and positions follow the conventions in the
`sinkscope.capture` package docstring. Tokens are found by position (`AttentionCall.locate_key`), so the
probes stay right when a sliding window has moved during cached generation.
"""

from __future__ import annotations

import hashlib

import torch

from .engine import AttentionCall, BatchInfo, CaptureEngine, Probe
from .kernels import scores_block


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
            "visible": (call.key_allowed(first) & query_valid).cpu(),
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

    ``records[layer]``: ``entropy`` and ``max_weight`` float [B, H, T]. On the fused path the entropy
    takes O(n) memory (one more attention call with the keys as values); the max weight needs a chunked
    pass over the logits, so ``with_max=False`` is the choice for very long inputs.
    """

    def __init__(self, with_max: bool = True) -> None:
        self.with_max = with_max
        self.records: dict[int, dict[str, torch.Tensor]] = {}

    def start(self, batch: BatchInfo, engine: CaptureEngine) -> None:
        self.records = {}

    def on_attention(self, call: AttentionCall) -> None:
        entropy, maximum = call.entropy_and_max(self.with_max)
        record = {"entropy": entropy.float().cpu()}
        if maximum is not None:
            record["max_weight"] = maximum.float().cpu()
        self.records[call.layer] = record


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
    """Intervention: remove each query's attention to the first token and renormalise over the rest.

    ``heads``: None (every head of every layer) or ``{layer: None | [head, ...]}``. The layer's attention
    is recomputed with the first key masked for every later query — exactly an explicit attention mask
    (tested against one; during cached generation too, where the first token is found by its position
    and a sliding window that no longer holds it leaves the layer alone). The first token's own query,
    which sees nothing else, is left as it is. A learned sink logit (gpt-oss) keeps its place in the
    normaliser.
    """

    def __init__(self, heads: dict[int, list[int] | None] | None = None) -> None:
        self.heads = heads

    def _selected(self, call: AttentionCall) -> torch.Tensor | None:
        if self.heads is None:
            return torch.ones(call.n_heads, dtype=torch.bool)
        if call.layer not in self.heads:
            return None
        chosen = self.heads[call.layer]
        mask = torch.zeros(call.n_heads, dtype=torch.bool)
        mask[list(range(call.n_heads)) if chosen is None else list(chosen)] = True
        return mask

    def on_attention(self, call: AttentionCall) -> torch.Tensor | None:
        selected = self._selected(call)
        if selected is None or not selected.any():
            return None
        first = call.batch.first_positions.to(call.query.device)
        index, present = call.locate_key(first)
        hide = (call.query_positions[None, :] > first[:, None]) & present[:, None]  # [B, T]
        if not bool(hide.any()):  # the first token has left every row's window (or only sees itself)
            return None
        allowed = call.dense_allowed().expand(call.query.shape[0], -1, -1, -1).clone()
        rows = torch.arange(allowed.shape[0], device=allowed.device)
        column = allowed[rows, :, :, index]  # [B, 1|H, T]
        allowed[rows, :, :, index] = column & ~hide[:, None, :]
        knocked = call.attend_with(allowed).output
        return torch.where(selected.to(call.output.device)[None, :, None, None], knocked, call.output)


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

    def _block_allowed(self, call: AttentionCall, start: int, stop: int) -> torch.Tensor:
        """bool [B|1, 1|H, stop - start, S]: the call's own mask for queries [start, stop), built only for
        those rows when the call has none (plain causal)."""
        if call.allowed is not None:
            return call.allowed[:, :, start:stop]
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
            counts = block.sum(2, dtype=torch.int64)  # [B, 1|H, S]
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
    """Control for `SinkKnockout` with the same budget: remove each query's attention to *one key drawn at
    random* among the keys it may attend to other than the first token, and renormalise over the rest.

    Like the knock-out it controls, it touches the queries after the first token (each sees at least
    itself besides it) in the selected heads; the drawn key is the same for every head of a layer, drawn
    anew for every layer. The draw is uniform per query, from a generator seeded with ``seed``, the layer
    and the row's token ids, so it does not depend on batching, resuming or what ran before.
    ``removed[layer]``: long [B, T], the key index each query lost (-1: none).
    """

    def __init__(self, heads: dict[int, list[int] | None] | None = None, seed: int = 0) -> None:
        super().__init__(heads)
        self.seed = int(seed)
        self.removed: dict[int, torch.Tensor] = {}

    def start(self, batch: BatchInfo, engine: CaptureEngine) -> None:
        self.removed = {}

    def _uniforms(self, call: AttentionCall) -> torch.Tensor:
        """float64 [B, T]: one uniform draw per (row, query position), fixed by seed, layer and the row's ids."""
        positions = call.query_positions.cpu()
        draws = []
        for ids in call.batch.input_ids.cpu():
            digest = hashlib.sha256(f"{self.seed}:{call.layer}:".encode() + ids.numpy().tobytes()).digest()
            generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)
            draws.append(torch.rand(int(positions.max()) + 1, generator=generator, dtype=torch.float64)[positions])
        return torch.stack(draws).to(call.query.device)

    def on_attention(self, call: AttentionCall) -> torch.Tensor | None:
        selected = self._selected(call)
        if selected is None or not selected.any():
            return None
        b = call.query.shape[0]
        first = call.batch.first_positions.to(call.query.device)
        allowed = call.dense_allowed().expand(b, -1, -1, -1)
        # candidates: the keys each query may see (the mask is the same for every head), the first one excluded
        candidates = allowed[:, 0] & (call.key_positions[None, None, :] != first[:, None, None])  # [B, T, S]
        count = candidates.sum(-1)  # [B, T]
        hide = (call.query_positions[None, :] > first[:, None]) & (count > 0)
        if not bool(hide.any()):
            return None
        rank = (self._uniforms(call) * count).floor().long().clamp(max=(count - 1).clamp_min(0))
        chosen = (candidates & (candidates.cumsum(-1, dtype=torch.int32) == (rank + 1)[..., None])).int().argmax(-1)
        self.removed[call.layer] = torch.where(hide, chosen, torch.full_like(chosen, -1)).cpu()
        drop = torch.zeros_like(candidates).scatter_(2, chosen[..., None], hide[..., None])
        knocked = call.attend_with(allowed & ~drop[:, None]).output
        return torch.where(selected.to(call.output.device)[None, :, None, None], knocked, call.output)

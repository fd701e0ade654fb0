"""Compressed KV caches on transformers' `Cache` API: simulated quantisation, and eviction presses.

`QuantisedCache(model, bits=4, axis="token", group_size=None, protect=4)` quantises every key and value
when it is written (`metrics.quantise.fake_quantise`: quantise, then dequantise; stored in the model's
dtype), except the protected tokens (the first ``protect`` positions, or a given set of positions: the
sinks), which are kept bit for bit. Attention always reads the cache, the tokens of the current forward
pass included, as a kernel reading a quantised paged cache does. Per-token scales (``axis="token"``)
depend on the token alone, so a chunked forward gives the same predictions as token-by-token decoding.
Per-channel scales (``axis="channel"``) run over blocks of positions ``[b G, (b + 1) G)`` (``G`` =
``group_size``; protected tokens in a block are left out of it): until a block's last position is
written its tokens are held (and read) at full precision, as KIVI's residual; the forward pass that
completes a block reads it quantised. ``bits=None`` (or 16) is the plain cache. `hold_quantised(prefilled)`
stores what a full-precision cache holds after a prefill, quantised as written: a prefill whose own attention
read its keys and values at full precision, as HF's QuantizedCache and vLLM's prefill kernels do, with every
later forward reading the quantised cache.

`EvictingCache(model)` holds everything until `compress(press, ratio, protect)` evicts, per key/value head,
from each full-attention layer all but ``press.n_kept(held, ratio)`` tokens (kvpress's count by default:
``max(1, int(held * (1 - ratio)))``), keeping the highest scores of a `Press` (kvpress-style: one small class
per policy, overriding `score`) and always the first ``protect`` positions. The presses named after a
published policy (``window`` = StreamingLLM, ``knorm``, ``snapkv``) follow NVIDIA kvpress 0.5.5; this
project's earlier definitions stay available as ``<name>_sinkscope`` (see docs/kv.md, "Faithfulness to
kvpress"). Tokens keep their original positions (rotary already applied), so the tokens fed afterwards
need explicit ``position_ids``. Sliding-window layers keep their own window and are not compressed (as
kvpress does for Gemma-3).

Every layer records ``read_positions`` (the position of each key the last forward read: long [S], or
[B, KVH, S] after per-head eviction), so `probes.KeptSinkMass` can measure, through the capture engine, the
attention the compressed cache still gives position 0. `nbytes()`: what each cache would hold — full
precision tokens at the model's dtype, quantised ones as packed payload plus per-group scales.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from transformers.cache_utils import Cache, DynamicLayer, DynamicSlidingWindowLayer, get_layer_types_and_kwargs

from ..errors import InputError, UnsupportedModelError
from ..metrics.quantise import check_quantiser, fake_quantise, quantised_bytes
from ..models.loader import LoadedModel, text_config
from .engine import BatchInfo, CaptureEngine, residual_stream

RAW = -1  # held at full precision for good (protected, or no quantisation)
RESIDUAL = -2  # held at full precision until its per-channel block is complete


@dataclass(frozen=True)
class QuantSpec:
    """How a cache quantises: ``bits`` None = not at all."""

    bits: int | None = None
    axis: str = "token"
    group_size: int | None = None

    def __post_init__(self) -> None:
        if self.bits is None:
            return
        check_quantiser(self.bits, self.axis, self.group_size)
        if self.axis == "channel" and self.group_size is None:
            raise InputError("per-channel quantisation needs a group size (tokens per block of scales)")


def protected_positions(protect: int | Iterable[int]) -> frozenset[int]:
    """The first ``protect`` positions, or the positions given."""
    if isinstance(protect, int):
        if protect < 0:
            raise InputError(f"protect must be >= 0 tokens (got {protect})")
        return frozenset(range(protect))
    chosen = frozenset(int(p) for p in protect)
    if any(p < 0 for p in chosen):
        raise InputError("protected positions must be >= 0")
    return chosen


class _Quantising:
    """What the full and sliding layers share: quantise on write, keep the positions and status of held tokens."""

    keys: Any
    values: Any

    def _setup(self, spec: QuantSpec, protect: frozenset[int]) -> None:
        self.spec = QuantSpec() if spec.bits in (None, 16) else spec
        self.protect = protect
        self.written = 0  # positions written so far
        self.positions = torch.empty(0, dtype=torch.long)  # of the held tokens: [S] (or [B, KVH, S], evicted)
        self.status = torch.empty(0, dtype=torch.long)  # [S]: RAW, RESIDUAL or the token's group id
        self.read_positions = self.positions
        self._pending: list[tuple[int, torch.Tensor, torch.Tensor]] = []  # residual (position, raw k, raw v)
        # per-token groups are numbered as written; per-channel blocks by position // group_size
        self._groups = 0

    def _is_protected(self, positions: torch.Tensor) -> torch.Tensor:
        if not self.protect:
            return torch.zeros(positions.shape, dtype=torch.bool)
        return torch.tensor([int(p) in self.protect for p in positions], dtype=torch.bool)

    def _write(self, key_states: torch.Tensor, value_states: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(keys, values, positions, status) of the held tokens followed by the new ones, quantised as written."""
        n = key_states.shape[-2]
        new_positions = torch.arange(self.written, self.written + n)
        status = torch.full((n,), RAW, dtype=torch.long)
        keys_new, values_new = key_states, value_states
        spec = self.spec
        if spec.bits is not None:
            quantised = (~self._is_protected(new_positions)).nonzero().flatten()
            if spec.axis == "token" and quantised.numel():
                keys_new, values_new = key_states.clone(), value_states.clone()
                keys_new[..., quantised, :] = fake_quantise(key_states[..., quantised, :], spec.bits, "token",
                                                            spec.group_size)
                values_new[..., quantised, :] = fake_quantise(value_states[..., quantised, :], spec.bits, "token",
                                                              spec.group_size)
                status[quantised] = torch.arange(self._groups, self._groups + quantised.numel())
                self._groups += quantised.numel()
            elif spec.axis == "channel":
                status[quantised] = RESIDUAL
                self._pending += [(int(new_positions[i]), key_states[..., i, :], value_states[..., i, :])
                                  for i in quantised.tolist()]
        held = self.positions.shape[-1]
        if held:
            positions = torch.cat([self.positions, new_positions.expand(*self.positions.shape[:-1], n)], -1)
            keys = torch.cat([self.keys, keys_new], dim=-2)
            values = torch.cat([self.values, values_new], dim=-2)
            status = torch.cat([self.status, status])
        else:
            positions, keys, values = new_positions, keys_new, values_new
        self.written += n
        if spec.bits is not None and spec.axis == "channel":
            keys, values, status = self._quantise_complete_blocks(keys, values, positions, status)
        return keys, values, positions, status

    def _quantise_complete_blocks(self, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor,
                                  status: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Quantise (per channel) the unprotected tokens of every block of positions ``[b G, (b + 1) G)`` whose
        last position has been written. Blocks are fixed by position, so protecting tokens changes which
        tokens a block quantises, never when it is quantised."""
        size = self.spec.group_size
        assert size is not None and self.spec.bits is not None
        complete = self.written // size  # blocks 0 .. complete-1 are fully written
        ready = [p for p in self._pending if p[0] // size < complete]
        if not ready:
            return keys, values, status
        self._pending = [p for p in self._pending if p[0] // size >= complete]
        keys, values, status = keys.clone(), values.clone(), status.clone()
        first = int(positions[0]) if positions.dim() == 1 else 0  # quantised caches hold consecutive positions
        blocks: dict[int, list[tuple[int, torch.Tensor, torch.Tensor]]] = {}
        for pending in ready:
            blocks.setdefault(pending[0] // size, []).append(pending)
        alike: dict[int, list[int]] = {}  # blocks holding the same number of tokens are quantised in one call
        for block_id in sorted(blocks):
            alike.setdefault(len(blocks[block_id]), []).append(block_id)
        for ids in alike.values():
            members = [p for block_id in ids for p in blocks[block_id]]  # block by block, in position order
            shape = (len(ids), len(blocks[ids[0]]))
            stacked = (torch.stack([k for _, k, _ in members], dim=-2), torch.stack([v for _, _, v in members], dim=-2))
            q_k, q_v = (fake_quantise(x.unflatten(-2, shape), self.spec.bits, "channel", None).flatten(-3, -2)
                        for x in stacked)
            index = torch.tensor([p[0] for p in members]) - first
            inside = (index >= 0) & (index < keys.shape[-2])  # a sliding window may have dropped some already
            keys[..., index[inside], :] = q_k[..., inside, :]
            values[..., index[inside], :] = q_v[..., inside, :]
            status[index[inside]] = index[inside].add(first) // size
        return keys, values, status

    def hold_quantised(self, source: _Quantising) -> None:
        """Hold what ``source`` (a full-precision layer of the same kind, nothing evicted) holds, quantised as if
        written in one piece: the state a prefill leaves when its attention read its own keys and values at full
        precision (HF's QuantizedCache, vLLM's prefill) and the cache stored them quantised. A sliding layer
        quantises the tokens it holds; a per-channel block its window has partly dropped is scaled over the
        tokens still held."""
        if source.keys is None or source.keys.dim() != 4:
            return
        if source.positions.dim() != 1 or source.spec.bits is not None:
            raise InputError("only a full-precision cache with nothing evicted can be stored quantised")
        self.lazy_initialization(source.keys, source.values)  # type: ignore[attr-defined]
        self.written = source.written - source.keys.shape[-2]  # the held tokens keep their positions
        keys, values, positions, status = self._write(source.keys, source.values)
        self.keys, self.values, self.positions, self.status = keys, values, positions, status
        self.read_positions = positions

    def nbytes(self) -> int:
        """Bytes this layer would hold: full-precision tokens at the model's dtype, quantised tokens packed with
        their scales (keys and values; every batch row and key/value head)."""
        if self.keys is None or self.keys.dim() != 4:
            return 0
        batch, heads, _, dim = self.keys.shape
        raw = int((self.status < 0).sum())
        total = raw * dim * self.keys.element_size()
        quantised = self.status[self.status >= 0]
        if quantised.numel():
            assert self.spec.bits is not None
            blocks = int(quantised.unique().numel())
            total += quantised_bytes(int(quantised.numel()), dim, self.spec.bits, self.spec.axis,
                                     self.spec.group_size, n_groups=blocks if self.spec.axis == "channel" else None)
        return int(2 * batch * heads * total)


class QuantisedLayer(_Quantising, DynamicLayer):
    """A full-attention layer of a `QuantisedCache`."""

    is_croppable = False

    def __init__(self, spec: QuantSpec, protect: frozenset[int]) -> None:
        DynamicLayer.__init__(self)
        self._setup(spec, protect)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        keys, values, positions, status = self._write(key_states, value_states)
        self.keys, self.values, self.positions, self.status = keys, values, positions, status
        self.read_positions = positions
        return keys, values

    def evict(self, keep: torch.Tensor) -> None:
        """Keep the held tokens at indices ``keep`` [B, KVH, S'] (sorted), per key/value head."""
        if self.spec.bits is not None:
            raise UnsupportedModelError("eviction is not combined with quantisation here")
        assert self.keys is not None and self.values is not None
        batch, heads, held, dim = self.keys.shape
        positions = self.positions if self.positions.dim() == 3 else self.positions.expand(batch, heads, held)
        gather = keep[..., None].expand(-1, -1, -1, dim).to(self.keys.device)
        self.keys = self.keys.gather(2, gather)
        self.values = self.values.gather(2, keep[..., None].expand(-1, -1, -1, self.values.shape[-1]))
        self.positions = positions.gather(2, keep)
        self.status = torch.full((keep.shape[-1],), RAW, dtype=torch.long)

    def crop(self, tokens_to_remove: int) -> None:
        raise InputError("a compressed cache cannot be cropped")


class QuantisedSlidingLayer(_Quantising, DynamicSlidingWindowLayer):
    """A sliding-window layer of a `QuantisedCache`: quantised as written, then only the window is kept."""

    is_croppable = False

    def __init__(self, sliding_window: int, spec: QuantSpec, protect: frozenset[int]) -> None:
        DynamicSlidingWindowLayer.__init__(self, sliding_window=sliding_window)
        self._setup(spec, protect)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        keys, values, positions, status = self._write(key_states, value_states)
        self.cumulative_length += key_states.shape[-2]
        keep = self.sliding_window - 1  # what the next token can still see
        self.keys, self.values = keys[..., -keep:, :], values[..., -keep:, :]
        self.positions, self.status = positions[-keep:], status[-keep:]
        self.read_positions = positions
        return keys, values

    def hold_quantised(self, source: _Quantising) -> None:
        super().hold_quantised(source)
        self.cumulative_length = source.written  # what the window's mask is computed from

    def crop(self, tokens_to_remove: int) -> None:
        raise InputError("a compressed cache cannot be cropped")


def _layers(model: LoadedModel | Any, spec: QuantSpec, protect: frozenset[int]) -> list[Any]:
    model = model.model if isinstance(model, LoadedModel) else model
    config = text_config(model)
    layer_types, kwargs = get_layer_types_and_kwargs(config)
    layers: list[Any] = []
    for layer_type, options in zip(layer_types, kwargs, strict=True):
        if layer_type == "full_attention":
            layers.append(QuantisedLayer(spec, protect))
        elif layer_type in ("sliding_attention", "chunked_attention"):
            layers.append(QuantisedSlidingLayer(int(options["sliding_window"]), spec, protect))
        else:
            raise UnsupportedModelError(f"{type(model).__name__}: layer type '{layer_type}' has no compressed cache")
    return layers


def compressed_layer(cache: Cache, index: int) -> _Quantising:
    """Layer ``index`` of a `QuantisedCache` or `EvictingCache`."""
    layer = cache.layers[index]
    if not isinstance(layer, _Quantising):
        raise TypeError(f"layer {index} of {type(cache).__name__} is not a compressed-cache layer")
    return layer


class QuantisedCache(Cache):
    """Keys and values quantised as written, protected tokens kept (see the module docstring)."""

    def __init__(self, model: LoadedModel | Any, bits: int | None = None, axis: str = "token",
                 group_size: int | None = None, protect: int | Iterable[int] = 0) -> None:
        self.spec = QuantSpec(None if bits in (None, 16) else bits, axis, group_size)
        self.protect = protected_positions(protect)
        super().__init__(layers=_layers(model, self.spec, self.protect))

    def hold_quantised(self, prefilled: QuantisedCache) -> None:
        """Hold what the full-precision cache ``prefilled`` holds, each layer quantised as written
        (`_Quantising.hold_quantised`): a prefill that read full precision, shared with the full cache."""
        if len(prefilled.layers) != len(self.layers):
            raise InputError("the prefilled cache belongs to another model")
        for index, (mine, theirs) in enumerate(zip(self.layers, prefilled.layers, strict=True)):
            if type(theirs) is not type(mine):
                raise InputError("the prefilled cache's layers are not this cache's kind")
            compressed_layer(self, index).hold_quantised(compressed_layer(prefilled, index))

    def nbytes(self, full_attention_only: bool = False) -> int:
        """Bytes the cache holds (every layer), or only its full-attention layers (what eviction compresses;
        a sliding-window layer is left alone)."""
        return sum(compressed_layer(self, i).nbytes() for i in range(len(self.layers))
                   if not full_attention_only or isinstance(self.layers[i], QuantisedLayer))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(bits={self.spec.bits}, axis={self.spec.axis}, protect={sorted(self.protect)})"


class EvictingCache(QuantisedCache):
    """A full-precision cache whose full-attention layers `compress` evicts from (see the module docstring)."""

    def __init__(self, model: LoadedModel | Any) -> None:
        super().__init__(model)

    def compress(self, press: Press, ratio: float, protect: int | Iterable[int] = 0,
                 queries: dict[int, QueryRecord] | None = None) -> None:
        """Keep ``press.n_kept(held, ratio)`` of each full-attention layer's tokens (per key/value head), those
        of highest ``press.score``, as kvpress's ScorerPress.compress does; ties go to the later position
        (kvpress leaves them to ``torch.topk``, whose choice among equal scores is unspecified). The protected
        positions (the first ``protect``, or the positions given: e.g. the sinks found in the context) are always
        kept, the budget growing to hold them if it is smaller (for ``window`` and the first k this is
        StreamingLLM's ``n_sink``; otherwise it is this project's extension)."""
        kept_always = protected_positions(protect)
        ratio = float(ratio)
        if not 0.0 <= ratio < 1.0:
            raise InputError(f"the compression ratio must lie in [0, 1) (got {ratio})")
        if ratio == 0.0:  # kvpress: a compression ratio of 0 leaves the cache as it is
            return
        for index, layer in enumerate(self.layers):
            if not isinstance(layer, QuantisedLayer) or layer.keys is None or layer.keys.dim() != 4:
                continue
            batch, heads, held, _ = layer.keys.shape
            positions = layer.positions if layer.positions.dim() == 3 else layer.positions.expand(batch, heads, held)
            protected = torch.isin(positions, torch.tensor(sorted(kept_always), dtype=positions.dtype,
                                                           device=positions.device))
            keep = max(press.n_kept(held, ratio), int(protected.sum(-1).max()) if kept_always else 0)
            if keep >= held:
                continue
            scores = press.score(layer.keys, layer.values, positions, (queries or {}).get(index)).float()
            scores = torch.where(protected, torch.full_like(scores, float("inf")), scores)
            layer.evict(top_indices(scores, keep))


def top_indices(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """The indices (ascending) of the ``keep`` highest scores along the last dimension; among equal scores the
    later index wins. kvpress calls ``scores.topk(n_kept)``: the same set wherever the kept set is decided by
    the scores, and a defined choice where it is not (e.g. SnapKV's window, all scored alike, larger than the
    budget)."""
    held = scores.shape[-1]
    order = scores.flip(-1).sort(dim=-1, descending=True, stable=True).indices[..., :keep]
    kept: torch.Tensor = (held - 1 - order).sort(dim=-1).values
    return kept


def kvpress_n_kept(held: int, ratio: float) -> int:
    """kvpress 0.5.5's count (``kvpress.utils.compute_n_kept``, called by ``ScorerPress.compress``):
    ``max(1, int(k_len * (1 - compression_ratio)))`` for a ratio below 1 (0.5.0-0.5.4: the same without the
    floor of 1). The same Python float expression, so the float rounding is kvpress's too: 129 tokens at 0.5
    keep 64, at 0.75 keep 32, and 20 tokens at 0.9 keep 1 (20 * 0.09999999999999998 = 1.9999999999999996)."""
    if ratio >= 1.0:
        return 0
    return max(1, int(held * (1 - ratio)))


def rounded_up_n_kept(held: int, ratio: float) -> int:
    """This project's earlier count (the ``*_sinkscope`` presses): evict ``int(held * ratio)``, keep the rest, so
    the kept count rounds up (129 tokens at 0.5: 65; at 0.75: 33)."""
    return held - int(held * ratio)


# -- presses -------------------------------------------------------------------------------------------
@dataclass
class QueryRecord:
    """The last queries of a prefill at one layer, with how the layer scores them."""

    query: torch.Tensor  # [B, H, w, D]
    scaling: float
    softcap: float | None


class Press:
    """An eviction policy: a score per held token and head (higher = kept), and how many tokens a ratio keeps
    (`n_kept`: kvpress's count unless a press says otherwise). Subclasses override `score`."""

    name: ClassVar[str] = ""
    needs_queries: ClassVar[bool] = False

    def n_kept(self, held: int, ratio: float) -> int:
        """Tokens kept of ``held`` at compression ratio ``ratio`` (before ``protect`` may raise it)."""
        return kvpress_n_kept(held, ratio)

    def score(self, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor,
              queries: QueryRecord | None) -> torch.Tensor:
        """[B, KVH, S] from keys/values [B, KVH, S, D] and their positions [B, KVH, S]."""
        raise NotImplementedError


class WindowPress(Press):
    """The most recent tokens; with ``protect`` k, kvpress's StreamingLLMPress with ``n_sink`` = k (sinks +
    recent window). StreamingLLMPress scores 0 the ``n_pruned = k_len - int(k_len * (1 - ratio))`` tokens after
    the sinks and 1 the rest, and keeps ``n_kept``: the sinks and the last ``n_kept - n_sink`` tokens, the set
    that scoring by position with the first k protected keeps. (Keys are not re-rotated, as in kvpress without
    its KeyRerotationPress.) `capture.cache.StreamingCache` is the other StreamingLLM, kept apart on purpose:
    a rolling cache that evicts at every step and re-assigns positions inside the cache (the paper's setting
    for unbounded streams), where this press compresses once after the prefill and keeps original positions."""

    name = "window"

    def score(self, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor,
              queries: QueryRecord | None) -> torch.Tensor:
        return positions.float()


class KnormPress(Press):
    """Keep the keys of smallest L2 norm (kvpress's KnormPress: low-norm keys draw high attention). kvpress 0.5.5
    scores ``-vector_norm(keys, dim=-1, dtype=promote_types(keys.dtype, float32))``, as here (0.5.0-0.5.4 took
    the norm in the keys' own dtype: the same for float32 caches). ``protect`` (the first tokens always kept) is
    this project's extension: kvpress's KnormPress has no sinks."""

    name = "knorm"

    def score(self, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor,
              queries: QueryRecord | None) -> torch.Tensor:
        norms: torch.Tensor = torch.linalg.vector_norm(keys, dim=-1,
                                                       dtype=torch.promote_types(keys.dtype, torch.float32))
        return -norms


KVPRESS_SNAPKV_WINDOW = 64  # kvpress SnapKVPress.window_size default


class SnapKVPress(Press):
    """SnapKV as kvpress 0.5.5's SnapKVPress (``compute_window_attention`` and ``score``): the last ``window``
    (64) queries of the prefill attend to every key, causally (logits over ``sqrt(head_dim)``, softmax in
    float32, no softcap, whatever scale the model itself uses); the weights on the keys *before* the window are
    averaged over those queries, smoothed by ``avg_pool1d(kernel, stride 1, padding kernel // 2)`` (zero
    padding counted), averaged over the query heads of each key/value head; the window's own keys are scored
    ``scores.max() + 1`` (over the whole layer), so it is kept whole whenever the budget holds it (kvpress
    0.5.0-0.5.3 scored it ``scores.max()``, a tie). Deliberate differences: a prefill of no more than ``window``
    tokens (kvpress asserts) shrinks the window to ``held - 1``; the queries are the model's own, recorded by
    `LastQueries` (kvpress recomputes them from the hidden states); ``protect`` is this project's extension.
    The earlier definition of this project is `SnapKVSinkscopePress` (``snapkv_sinkscope``)."""

    name = "snapkv"
    needs_queries = True

    def __init__(self, window: int = KVPRESS_SNAPKV_WINDOW, kernel: int = 5) -> None:
        self.window, self.kernel = window, kernel

    def score(self, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor,
              queries: QueryRecord | None) -> torch.Tensor:
        if queries is None:
            raise UnsupportedModelError("SnapKV needs the prefill's last queries")
        batch, kv_heads, held, head_dim = keys.shape
        window = min(self.window, held - 1)
        if window < 1:
            raise InputError("SnapKV needs at least two held tokens")
        if queries.query.shape[2] < window:
            raise InputError(f"SnapKV scores with the prefill's last {window} queries, but only "
                             f"{queries.query.shape[2]} were recorded (record them with LastQueries({self.window}))")
        query = queries.query[:, :, -window:].to(device=keys.device, dtype=keys.dtype)  # [B, H, w, D]
        group = query.shape[1] // kv_heads
        # kvpress SnapKVPress.compute_window_attention
        logits = torch.matmul(query, keys.repeat_interleave(group, 1).transpose(2, 3)) / math.sqrt(head_dim)
        mask = torch.triu(torch.full_like(logits, float("-inf")), diagonal=held - window + 1)
        weights = F.softmax(logits + mask, dim=-1, dtype=torch.float32).to(query.dtype)[..., :-window]
        # kvpress SnapKVPress.score
        scores = weights.mean(dim=-2)
        scores = F.avg_pool1d(scores, kernel_size=self.kernel, padding=self.kernel // 2, stride=1)
        scores = scores.view(batch, kv_heads, group, held - window).mean(2)
        padded: torch.Tensor = F.pad(scores, (0, window), value=scores.max().item() + 1)
        return padded


class ExpectedAttentionPress(Press):
    """Expected attention (Devoto et al. 2025, kvpress's ExpectedAttentionPress): future queries are modelled
    as a Gaussian with the mean and covariance of the prefill's last queries, so each key's expected logit
    weight is E[exp(s q.k)] = exp(s mu.k + s^2 k'Sigma k / 2); the scores, normalised over the held keys and
    averaged over the query heads of a key/value head, are weighted by the value norm (what the key would
    write). Unlike kvpress, the queries' rotary phase is not extrapolated to future positions."""

    name = "expected_attention"
    needs_queries = True

    def score(self, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor,
              queries: QueryRecord | None) -> torch.Tensor:
        if queries is None:
            raise UnsupportedModelError("expected attention needs the prefill's last queries")
        batch, kv_heads, held, _ = keys.shape
        query = queries.query.double()  # [B, H, w, D]
        group = query.shape[1] // kv_heads
        mean = query.mean(2)  # [B, H, D]
        centred = query - mean[:, :, None]
        covariance = centred.transpose(-1, -2) @ centred / max(query.shape[2] - 1, 1)  # [B, H, D, D]
        k = keys.double().repeat_interleave(group, 1)  # [B, H, S, D]
        s = queries.scaling
        log_weight = s * torch.einsum("bhd,bhsd->bhs", mean, k) + 0.5 * s**2 * torch.einsum(
            "bhsd,bhde,bhse->bhs", k, covariance, k)
        expected = log_weight.softmax(-1).view(batch, kv_heads, group, held).mean(2)  # [B, KVH, S]
        scored: torch.Tensor = (expected * values.double().norm(dim=-1)).float()
        return scored


# -- this project's earlier definitions, under their own names ---------------------------------------------
class _RoundedUp(Press):
    """The kept count rounded up (`rounded_up_n_kept`), as this project counted before following kvpress."""

    def n_kept(self, held: int, ratio: float) -> int:
        return rounded_up_n_kept(held, ratio)


class WindowSinkscopePress(_RoundedUp, WindowPress):
    """`WindowPress` with the kept count rounded up."""

    name = "window_sinkscope"


class KnormSinkscopePress(_RoundedUp, KnormPress):
    """`KnormPress` with the kept count rounded up."""

    name = "knorm_sinkscope"


class ExpectedAttentionSinkscopePress(_RoundedUp, ExpectedAttentionPress):
    """`ExpectedAttentionPress` with the kept count rounded up."""

    name = "expected_attention_sinkscope"


class SnapKVSinkscopePress(_RoundedUp):
    """This project's earlier SnapKV (not kvpress's): the attention the last ``window`` (32) recorded queries of
    the prefill give *every* key, the window's own included (logits at the model's scale and softcap; mean over
    those queries and the query heads of a key/value head), smoothed over ``kernel`` neighbours without
    counting the padding (``count_include_pad=False``); the window itself is always kept; the kept count rounds
    up. ``protect`` is this project's extension."""

    name = "snapkv_sinkscope"
    needs_queries = True

    def __init__(self, window: int = 32, kernel: int = 5) -> None:
        self.window, self.kernel = window, kernel

    def score(self, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor,
              queries: QueryRecord | None) -> torch.Tensor:
        if queries is None:
            raise UnsupportedModelError("SnapKV needs the prefill's last queries")
        batch, kv_heads, held, _ = keys.shape
        query = queries.query[:, :, -self.window:].float()  # [B, H, w, D]
        w = query.shape[2]
        group = query.shape[1] // kv_heads
        logits = torch.einsum("bhwd,bhsd->bhws", query, keys.float().repeat_interleave(group, 1)) * queries.scaling
        if queries.softcap is not None:
            logits = torch.tanh(logits / queries.softcap) * queries.softcap
        causal = torch.arange(held)[None, :] <= torch.arange(held - w, held)[:, None]  # [w, S]
        weights = logits.masked_fill(~causal, float("-inf")).softmax(-1)
        scores = weights.mean(2).view(batch, kv_heads, group, held).mean(2)  # [B, KVH, S]
        scores = F.avg_pool1d(scores, self.kernel, 1, self.kernel // 2, count_include_pad=False)
        recent = positions >= positions.amax(-1, keepdim=True) - w + 1
        kept: torch.Tensor = torch.where(recent, torch.full_like(scores, torch.finfo(scores.dtype).max), scores)
        return kept


PRESSES: dict[str, type[Press]] = {p.name: p for p in (
    WindowPress, KnormPress, SnapKVPress, ExpectedAttentionPress,
    WindowSinkscopePress, KnormSinkscopePress, SnapKVSinkscopePress, ExpectedAttentionSinkscopePress)}


def make_press(name: str) -> Press:
    if name not in PRESSES:
        raise InputError(f"unknown press '{name}' (choose from {', '.join(PRESSES)})")
    return PRESSES[name]()


def cached_forward(engine: CaptureEngine, cache: Cache, ids: torch.Tensor,
                   positions: Sequence[int] | torch.Tensor | None = None, residual: bool = False) -> Any:
    """One forward of ``ids`` [B, T] through ``cache`` with the engine's probes attached (the base model: no
    LM head). ``positions``: the tokens' positions (needed once a cache has evicted; default: the cache's
    length onwards). ``residual``: add ``output.residual`` as `CaptureEngine.forward` does."""
    model = engine.model
    device = next(model.parameters()).device
    ids = ids.to(device)
    mask = torch.ones_like(ids)
    engine.batch = BatchInfo(ids, mask, torch.zeros(ids.shape[0], dtype=torch.long, device=device))
    for probe in engine.probes:
        probe.start(engine.batch, engine)
    inputs: dict[str, Any] = {"input_ids": ids, "use_cache": True, "cache": cache}
    if positions is not None:
        inputs["position_ids"] = torch.as_tensor(positions, device=device).view(1, -1).expand(ids.shape[0], -1)
    model.eval()
    with residual_stream(model, inputs) if residual else contextlib.nullcontext() as stream:
        with torch.inference_mode():
            output = model.base_model(**inputs)
    if stream is not None:
        output.residual = stream.of(output)
    for probe in engine.probes:
        probe.finish()
    return output

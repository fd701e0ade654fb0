"""The quantiser and the compressed caches against independent references.

References: a naive loop over groups (and a case worked out by hand) for the quantiser; transformers' own
`DynamicCache` for the unquantised cache and for what protected tokens hold; token-by-token decoding for
chunked per-token quantisation; bytes counted by hand; a full forward with a mask hiding the evicted tokens
for eviction; transformers' eager attention weights for the sink mass the engine reads from the cache; and for
the presses named after a published policy, the positions NVIDIA kvpress 0.5.5 keeps, worked out by hand in
plain Python/numpy loops from kvpress's definitions (ScorerPress / compute_n_kept, KnormPress,
StreamingLLMPress, SnapKVPress).
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from transformers import DynamicCache

import helpers
from helpers import eager_twin, tiny_model
from sinkscope.capture import CaptureEngine, SinkKnockout
from sinkscope.capture.cache import cache_nbytes
from sinkscope.capture.kvcache import (
    EvictingCache,
    KnormPress,
    QuantisedCache,
    QueryRecord,
    SnapKVPress,
    WindowPress,
    cached_forward,
    make_press,
)
from sinkscope.capture.probes import KeptSinkMass, LastQueries
from sinkscope.errors import InputError
from sinkscope.metrics.quantise import fake_quantise, quantised_bytes

FAMILIES = ["llama", "gemma3_text"]  # gemma3: two sliding-window layers (window 6) and one full layer


def tokens(n: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, helpers.VOCAB, (1, n), generator=torch.Generator().manual_seed(seed))


def logits_through(model, cache, ids, chunks):
    out, start = [], 0
    with torch.inference_mode():
        for size in chunks:
            out.append(model(input_ids=ids[:, start:start + size], cache=cache, use_cache=True).logits)
            start += size
    return torch.cat(out, 1)


def naive_quantise(x: torch.Tensor, bits: int, axis: str, group: int) -> torch.Tensor:
    """One group at a time, in float64 Python loops."""
    out = x.double().clone()
    levels = 2 ** bits - 1
    *lead, s, d = x.shape
    for index in torch.cartesian_prod(*[torch.arange(n) for n in lead]) if lead else [()]:
        index = tuple(index.tolist()) if lead else ()
        m = x[index].double()
        spans = ([(t, slice(c, c + group)) for t in range(s) for c in range(0, d, group)] if axis == "token"
                 else [(slice(t, t + group), c) for c in range(d) for t in range(0, s, group)])
        for rows, cols in spans:
            block = m[rows, cols]
            low, high = float(block.min()), float(block.max())
            scale = (high - low) / levels
            q = [min(max(round((v - low) / scale), 0), levels) if scale > 0 else 0 for v in block.flatten().tolist()]
            restored = torch.tensor(q, dtype=torch.float64).view(block.shape) * scale + low
            out[index][rows, cols] = restored
    return out.to(x.dtype)


def test_quantiser_by_hand():
    x = torch.tensor([[0.0, 1.0, 2.0, 3.0], [-1.0, -1.0, -1.0, -1.0]])
    # token 0: range 0..3, 2 bits -> scale 1: exact. token 1: constant: exact.
    assert torch.equal(fake_quantise(x, 2, "token"), x)
    y = torch.tensor([[0.0, 0.4, 1.0]])  # 1 bit would not do; 2 bits: scale 1/3, 0.4 -> round(1.2)=1 -> 1/3
    torch.testing.assert_close(fake_quantise(y, 2, "token"), torch.tensor([[0.0, 1 / 3, 1.0]]))
    # per channel over the two tokens of column 1: {1, -1}, 2 bits: scale 2/3, exact at the ends
    assert torch.equal(fake_quantise(x, 2, "channel"), x)


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("axis,group", [("token", 4), ("token", 8), ("channel", 2), ("channel", 6)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantiser_against_a_naive_loop(bits, axis, group, dtype):
    x = (torch.randn(2, 3, 6, 8, generator=torch.Generator().manual_seed(bits)) * 3).to(dtype)
    got = fake_quantise(x, bits, axis, group)
    expected = naive_quantise(x.float(), bits, axis, group).to(dtype)
    assert got.dtype == dtype
    # float32 arithmetic vs float64: a value on a rounding boundary may land one level apart, nowhere else
    step = (x.float().amax() - x.float().amin()) / (2 ** bits - 1)
    difference = (got.float() - expected.float()).abs()
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2 * float(x.float().abs().max())
    assert ((difference <= tolerance) | (difference <= float(step) * 1.001)).all()
    assert (difference <= tolerance).float().mean() > 0.99


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("bits", [None, 16])
def test_full_precision_equals_the_plain_cache_exactly(family, bits):
    model = tiny_model(family)
    ids = tokens(16)
    expected = logits_through(model, DynamicCache(config=model.config), ids, (7, 1, 8))
    got = logits_through(model, QuantisedCache(model, bits=bits, protect=2), ids, (7, 1, 8))
    assert torch.equal(got, expected)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("axis,group", [("token", None), ("token", 4), ("channel", 4)])
def test_protected_tokens_are_untouched_bit_for_bit(family, axis, group):
    model = tiny_model(family)
    ids = tokens(5)  # shorter than gemma3's window: every layer still holds every token
    plain, quantised = DynamicCache(config=model.config), QuantisedCache(model, 2, axis, group, protect=[0, 2])
    logits_through(model, plain, ids[:, :1], (1,))
    logits_through(model, quantised, ids[:, :1], (1,))
    # layer 0 sees the same inputs in both caches: its protected tokens must be stored exactly, the rest not
    logits_through(model, plain, ids[:, 1:], (4,))
    logits_through(model, quantised, ids[:, 1:], (4,))
    for name in ("keys", "values"):
        reference, held = getattr(plain.layers[0], name), getattr(quantised.layers[0], name)
        assert torch.equal(held[..., [0, 2], :], reference[..., [0, 2], :])
        assert (held[..., [1, 3], :] != reference[..., [1, 3], :]).any()
        if axis == "channel":  # block 0 (positions 0-3) is complete; position 4 waits for block 1 at full precision
            assert torch.equal(held[..., 4, :], reference[..., 4, :])


@pytest.mark.parametrize("family", FAMILIES)
def test_per_token_quantisation_is_the_same_in_chunks_and_token_by_token(family):
    model = tiny_model(family)
    ids = tokens(14)
    chunked = logits_through(model, QuantisedCache(model, 4, protect=1), ids, (9, 5))
    stepped = logits_through(model, QuantisedCache(model, 4, protect=1), ids, (1,) * 14)
    unquantised = logits_through(model, DynamicCache(config=model.config), ids, (14,))
    torch.testing.assert_close(chunked, stepped, atol=1e-4, rtol=1e-4)
    assert (chunked - unquantised).abs().max() > 1e-2  # and quantisation did change something


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("axis,group", [("token", 4), ("channel", 4)])
def test_a_full_precision_prefill_stored_quantised_by_hand(family, axis, group):
    model = tiny_model(family)
    ids, protect, n = tokens(14), (0, 5), 14
    plain = DynamicCache(config=model.config)  # transformers' own: what the prefill wrote, at full precision
    logits_through(model, plain, ids, (n,))
    prefilled = EvictingCache(model)
    logits_through(model, prefilled, ids, (n,))
    stored = QuantisedCache(model, 2, axis, group, protect=protect)
    stored.hold_quantised(prefilled)
    for index, layer in enumerate(stored.layers):
        for name in ("keys", "values"):
            raw = getattr(plain.layers[index], name)  # the held tokens (a sliding layer: its last window - 1)
            positions = range(n - raw.shape[-2], n)
            expected = raw.clone()
            if axis == "token":
                for i, position in enumerate(positions):
                    if position not in protect:
                        expected[..., i:i + 1, :] = fake_quantise(raw[..., i:i + 1, :], 2, "token", group)
            else:  # blocks of positions 0-3, 4-7, 8-11 are complete (over the tokens held); 12 and 13 wait
                for block in range(n // group):
                    chosen = [i for i, p in enumerate(positions) if p // group == block and p not in protect]
                    if chosen:
                        expected[..., chosen, :] = fake_quantise(raw[..., chosen, :], 2, "channel", None)
            assert torch.equal(getattr(layer, name), expected), (index, name)
    # it carries on as the prefilled cache would (the next tokens at their own positions, a sliding layer's mask
    # from its length): with every token protected, the new ones too, it is the prefilled cache
    kept = QuantisedCache(model, 2, axis, group, protect=range(n + 3))
    kept.hold_quantised(prefilled)
    more = tokens(3, seed=2)
    assert torch.equal(logits_through(model, kept, more, (2, 1)), logits_through(model, plain, more, (2, 1)))
    assert kept.get_seq_length() == n + 3


def test_only_a_full_precision_cache_with_nothing_evicted_can_be_stored_quantised():
    model = tiny_model("llama")
    prefilled = EvictingCache(model)
    logits_through(model, prefilled, tokens(12), (12,))
    prefilled.compress(WindowPress(), 0.5)
    with pytest.raises(InputError):
        QuantisedCache(model, 2, "token", 4).hold_quantised(prefilled)


def test_bytes_by_hand():
    model = tiny_model("llama")  # 3 layers, 2 kv heads, head dim 8, float32
    per_head_and_tensor = {
        # 10 tokens, 2 protected: 2 x 8 x 4 raw bytes; 8 tokens x 8 channels x 4 bits = 32 bytes + 8 scales x 4
        ("token", None, 10): 64 + 32 + 32,
        # blocks of positions 0-3, 4-7 complete: their 6 unprotected tokens quantised (payload 24 bytes, 2 blocks
        # x 8 channels x 4 bytes of scales); 2 protected + positions 8, 9 (block 2, not complete) at full precision
        ("channel", 4, 10): 4 * 8 * 4 + 24 + 2 * 8 * 4,
        # 9 tokens: the same 2 blocks; position 8 waits
        ("channel", 4, 9): 3 * 8 * 4 + 24 + 2 * 8 * 4,
        # 12 tokens: 3 blocks, 10 tokens quantised (40 bytes), only the 2 protected at full precision
        ("channel", 4, 12): 2 * 8 * 4 + 40 + 3 * 8 * 4,
    }
    for (axis, group, n), expected in per_head_and_tensor.items():
        cache = QuantisedCache(model, 4, axis, group, protect=2)
        logits_through(model, cache, tokens(n), (n,))
        assert cache.nbytes() == expected * 2 * 2 * 3  # keys and values, 2 kv heads, 3 layers
    plain = QuantisedCache(model)
    logits_through(model, plain, tokens(10), (10,))
    assert plain.nbytes() == sum(t.numel() * t.element_size() for layer in plain.layers
                                 for t in (layer.keys, layer.values))
    assert quantised_bytes(8, 8, 4, "token", None) == 64


def test_bad_settings_are_refused():
    model = tiny_model("llama")
    for bad in (dict(bits=3), dict(bits=4, axis="row"), dict(bits=4, axis="channel"), dict(bits=4, protect=-1)):
        with pytest.raises(InputError):
            QuantisedCache(model, **bad)
    with pytest.raises(InputError):
        EvictingCache(model).compress(WindowPress(), 1.0)


def test_window_eviction_equals_masking_the_evicted_tokens():
    model = tiny_model("llama")
    ids = tokens(16)
    context, keep_first = 10, 2
    cache = EvictingCache(model)
    with CaptureEngine(model, []) as engine:
        cached_forward(engine, cache, ids[:, :context])
        cache.compress(WindowPress(), 0.5, protect=keep_first)  # keeps 0, 1 and the 3 most recent: 7, 8, 9
        hidden = cached_forward(engine, cache, ids[:, context:], positions=range(context, 16)).last_hidden_state
    kept = [0, 1, 7, 8, 9]
    allowed = torch.tril(torch.ones(16, 16, dtype=torch.bool))
    allowed[context:, :context] = False
    allowed[context:, kept] = True
    twin = eager_twin(model)
    with torch.inference_mode():
        additive = torch.where(allowed, 0.0, float("-inf"))[None, None]  # a 4-d mask is taken as additive
        reference = twin.model(input_ids=ids, attention_mask=additive).last_hidden_state
    torch.testing.assert_close(hidden, reference[:, context:], atol=1e-5, rtol=1e-5)
    assert cache.layers[0].positions[0, 0].tolist() == kept + list(range(context, 16))


@pytest.mark.parametrize("press", ["window", "knorm", "snapkv", "expected_attention", "window_sinkscope",
                                   "knorm_sinkscope", "snapkv_sinkscope", "expected_attention_sinkscope"])
def test_presses_keep_the_protected_tokens_and_the_ratio(press):
    model = tiny_model("gemma3_text")
    ids = tokens(12)
    cache, probe = EvictingCache(model), LastQueries()
    with CaptureEngine(model, [probe]) as engine:
        cached_forward(engine, cache, ids)
    cache.compress(make_press(press), 0.5, protect=1, queries=probe.records)
    full = cache.layers[2]  # the full-attention layer is compressed; sliding layers keep their window
    assert full.keys.shape[2] == 6 and bool((full.positions[..., 0] == 0).all())
    assert cache.layers[0].keys.shape[2] == 5


@pytest.mark.parametrize("family", FAMILIES)
def test_sink_mass_read_from_the_cache_equals_eager_weights(family):
    model = tiny_model(family)
    ids = tokens(12)
    cache = QuantisedCache(model)
    probe = KeptSinkMass(cache)
    with CaptureEngine(model, [probe]) as engine:
        cached_forward(engine, cache, ids[:, :8])
        cached_forward(engine, cache, ids[:, 8:])
    twin = eager_twin(model)
    with torch.inference_mode():
        attentions = twin(input_ids=ids, output_attentions=True).attentions
    for layer, weights in enumerate(attentions):
        torch.testing.assert_close(probe.records[layer], weights[:, :, 8:, 0].float(), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_the_knockout_probe_runs_through_a_compressed_cache(family):
    """With nothing quantised, knocking out the sink through the cache = the engine's own knocked-out forward."""
    model = tiny_model(family)
    ids = tokens(12)
    with CaptureEngine(model, [SinkKnockout(None)]) as engine:
        reference = engine.forward(ids).last_hidden_state
        cache = QuantisedCache(model)
        first = cached_forward(engine, cache, ids[:, :7]).last_hidden_state
        rest = cached_forward(engine, cache, ids[:, 7:]).last_hidden_state
    torch.testing.assert_close(torch.cat([first, rest], 1), reference, atol=1e-5, rtol=1e-5)
    assert copy.deepcopy(cache).nbytes() == cache.nbytes()


@pytest.mark.parametrize("family", FAMILIES)
def test_cache_bytes_are_the_tensors_of_a_plain_cache_and_the_packed_count_of_a_quantised_one(family):
    model = tiny_model(family)
    plain, quantised = QuantisedCache(model), QuantisedCache(model, bits=4, axis="token", group_size=4)
    with CaptureEngine(model, []) as engine:
        for cache in (plain, quantised):
            cached_forward(engine, cache, tokens(12))
    held = sum(t.numel() * t.element_size() for layer in plain.layers for t in (layer.keys, layer.values))
    assert cache_nbytes(plain) == held  # the sliding layers hold their window only
    assert cache_nbytes(quantised) == quantised.nbytes() < held


def test_expected_attention_with_one_repeated_query_is_its_attention_times_the_value_norm():
    """With every recent query equal, the Gaussian has no spread: the expected weight is the attention that
    query gives each key (by hand: softmax of its logits), times the key's value norm."""
    from sinkscope.capture.kvcache import ExpectedAttentionPress, QueryRecord

    g = torch.Generator().manual_seed(0)
    keys, values = torch.randn(1, 2, 7, 8, generator=g), torch.randn(1, 2, 7, 8, generator=g)
    one = torch.randn(1, 4, 1, 8, generator=g)
    record = QueryRecord(one.expand(1, 4, 5, 8).clone(), 0.3, None)
    scores = ExpectedAttentionPress().score(keys, values, torch.arange(7).expand(1, 2, 7), record)
    attention = torch.einsum("bhd,bhsd->bhs", one[:, :, 0], keys.repeat_interleave(2, 1)).mul(0.3).softmax(-1)
    expected = attention.view(1, 2, 2, 7).mean(2) * values.norm(dim=-1)
    torch.testing.assert_close(scores, expected, atol=1e-6, rtol=1e-5)


# -- the kept sets of kvpress 0.5.5, worked out by hand -----------------------------------------------------
# kvpress's count (kvpress.utils.compute_n_kept): max(1, int(k_len * (1 - compression_ratio))) in Python floats,
# written out here as numbers. The old count here, k_len - int(k_len * ratio), differs on every odd case.
KVPRESS_KEPT = {
    (129, 0.5): 64,  # 129 * 0.5 = 64.5 -> 64 (rounded up it would be 65)
    (129, 0.75): 32,  # 129 * 0.25 = 32.25 -> 32 (not 33)
    (129, 0.25): 96,  # 129 * 0.75 = 96.75 -> 96 (not 97)
    (128, 0.5): 64,
    (21, 0.5): 10,  # 10.5 -> 10 (not 11)
    (20, 0.9): 1,  # 20 * (1 - 0.9) = 20 * 0.09999999999999998 = 1.9999999999999996 in floats -> 1 (not 2)
    (30, 0.9): 2,  # 2.999999999999999 -> 2 (not 3)
}


def evict(keys: torch.Tensor, press, ratio: float, protect: int = 0, query: torch.Tensor | None = None):
    """The positions each key/value head of an `EvictingCache` layer keeps after ``compress``, the layer holding
    exactly ``keys`` [1, KVH, S, D] (written through the cache API; the model only gives the cache its layout)."""
    cache = EvictingCache(tiny_model("llama"))
    cache.layers[0].update(keys, torch.zeros_like(keys))
    # the model's scale is given as 1/sqrt(head_dim), what kvpress divides the window logits by
    queries = None if query is None else {0: QueryRecord(query, keys.shape[-1] ** -0.5, None)}
    cache.compress(press, ratio, protect=protect, queries=queries)
    return [sorted(head) for head in cache.layers[0].positions[0].tolist()]


def distinct_norm_keys(held: int, heads: int = 2, dim: int = 8, seed: int = 0) -> torch.Tensor:
    """Keys whose norms are a shuffled 1 + j / held (j = 0 .. held-1) per head, in random directions: distinct by
    1/held, far above float32 rounding (~1e-7), so the norm order cannot depend on how the norm is computed."""
    g = torch.Generator().manual_seed(seed)
    direction = torch.randn(1, heads, held, dim, generator=g, dtype=torch.float64)
    direction /= direction.norm(dim=-1, keepdim=True)
    norms = torch.stack([1 + torch.randperm(held, generator=g).double() / held for _ in range(heads)])
    return (direction * norms[None, :, :, None]).float()


@pytest.mark.parametrize("held,ratio", list(KVPRESS_KEPT))
@pytest.mark.parametrize("protect", [0, 4])
def test_knorm_keeps_what_kvpress_keeps(held, ratio, protect):
    keys = distinct_norm_keys(held)
    expected = []
    for head in keys[0].double().numpy():
        norms = [math.sqrt(sum(x * x for x in key)) for key in head]
        # kvpress: score -norm, keep the n_kept highest. protect (this project's extension) keeps the first
        # positions first and fills the rest of the budget, which it may enlarge, by norm
        budget = max(KVPRESS_KEPT[held, ratio], min(protect, held))
        sinks = list(range(min(protect, held)))
        rest = sorted((j for j in range(held) if j >= protect), key=lambda j: norms[j])
        expected.append(sorted(sinks + rest[:budget - len(sinks)]))
    assert evict(keys, KnormPress(), ratio, protect) == expected


@pytest.mark.parametrize("held,ratio", list(KVPRESS_KEPT))
@pytest.mark.parametrize("n_sink", [0, 1, 4])
def test_window_keeps_what_kvpress_streaming_llm_keeps(held, ratio, n_sink):
    keys = torch.randn(1, 2, held, 8, generator=torch.Generator().manual_seed(held))
    n_kept = KVPRESS_KEPT[held, ratio]
    # kvpress StreamingLLMPress.score: ones, zeros on [n_sink, n_sink + n_pruned) with
    # n_pruned = k_len - int(k_len * (1 - ratio)); ScorerPress keeps the n_kept highest: exactly the ones
    n_pruned = held - int(held * (1 - ratio))
    scores = [1] * held
    for j in range(n_sink, min(n_sink + n_pruned, held)):
        scores[j] = 0
    kept = [j for j in range(held) if scores[j] == 1]
    if n_kept >= n_sink:
        assert len(kept) == n_kept  # as many ones as the budget: no tie decides which
    else:  # fewer kept than sinks: kvpress keeps topk's pick of n_kept sinks; protect here keeps them all
        assert kept == list(range(n_sink))
    assert evict(keys, WindowPress(), ratio, protect=n_sink) == [kept, kept]


def kvpress_snapkv_scores(query: np.ndarray, keys: np.ndarray, window: int, kernel: int = 5) -> np.ndarray:
    """kvpress SnapKVPress.score with compute_window_attention, in float64 loops: query [H, >=window, D],
    keys [KVH, S, D] -> scores [KVH, S]."""
    heads, kv_heads, (_, held, dim) = query.shape[0], keys.shape[0], keys.shape
    group, before = heads // kv_heads, held - window
    q = query[:, -window:]
    attention = np.zeros((heads, before))  # mean over the window queries of their weight on each earlier key
    for h in range(heads):
        k = keys[h // group]
        for i in range(window):
            visible = before + i + 1  # query i sits at position before + i and sees keys 0 .. before + i
            logits = [float(q[h, i] @ k[j]) / math.sqrt(dim) for j in range(visible)]
            top = max(logits)
            weights = [math.exp(v - top) for v in logits]
            total = sum(weights)
            for j in range(before):
                attention[h, j] += weights[j] / total / window
    pooled = np.zeros((heads, before))  # avg_pool1d(kernel, stride 1, padding kernel // 2), padding counted
    for h in range(heads):
        for j in range(before):
            pooled[h, j] = sum(attention[h, t] for t in range(j - kernel // 2, j + kernel // 2 + 1)
                               if 0 <= t < before) / kernel
    per_kv = np.array([pooled[g * group:(g + 1) * group].mean(0) for g in range(kv_heads)])
    return np.concatenate([per_kv, np.full((kv_heads, window), per_kv.max() + 1)], axis=1)


def kept_by_score(scores: np.ndarray, n_kept: int) -> list[int]:
    """The n_kept highest; among equal scores the later position (this project's rule, see top_indices)."""
    order = sorted(range(len(scores)), key=lambda j: (-scores[j], -j))
    return sorted(order[:n_kept])


def snapkv_inputs(held: int, window: int, seed: int = 0):
    """Queries [1, 4, window, 8] and keys [1, 2, held, 8] (2 query heads per key/value head) with an attention
    pattern that separates kvpress's pooling from the old one: every query looks along one direction, the
    first two window keys lie far along it, and a few earlier keys somewhat."""
    g = torch.Generator().manual_seed(seed)
    direction = torch.zeros(8)
    direction[0] = 3.0
    query = direction + 0.3 * torch.randn(1, 4, window, 8, generator=g)
    along = torch.rand(1, 2, held, generator=g)
    along[..., held - window:held - window + 2] = 4.0
    along[..., [3, held // 3, held // 2]] = 2.0
    keys = along[..., None] * direction / 3.0 + 0.3 * torch.randn(1, 2, held, 8, generator=g)
    return query, keys


@pytest.mark.parametrize("held,window,ratio", [(21, 8, 0.5), (20, 8, 0.5), (40, 8, 0.6), (129, 64, 0.25),
                                              (129, 64, 0.5), (129, 64, 0.75)])
def test_snapkv_keeps_what_kvpress_keeps(held, window, ratio):
    query, keys = snapkv_inputs(held, window)
    n_kept = KVPRESS_KEPT.get((held, ratio), int(held * (1 - ratio)))  # 40 * (1 - 0.6) = 16.000000000000004 -> 16
    scores = kvpress_snapkv_scores(query[0].double().numpy(), keys[0].double().numpy(), window)
    expected = []
    for head in scores:
        if n_kept > window:  # the window (scored max + 1) and the best earlier keys
            earlier = sorted(head[:held - window], reverse=True)
            # float32 here vs float64 in the reference: ~1e-6 relative at most; a relative gap of 1e-4 at the
            # budget's edge means rounding cannot change which earlier keys are kept
            assert earlier[n_kept - window - 1] - earlier[n_kept - window] > 1e-4 * earlier[n_kept - window]
        expected.append(kept_by_score(head, n_kept))
    got = evict(keys, SnapKVPress(window), ratio, query=query)
    assert got == expected
    if n_kept <= window:  # kvpress keeps some n_kept of its window (topk's unspecified pick among its ties);
        assert all(head == list(range(held - n_kept, held)) for head in got)  # here: the most recent


def test_snapkv_scores_equal_kvpress_scores():
    """The scores themselves, against the float64 loops (the window's max + 1 included). kvpress divides the
    logits by sqrt(head_dim) whatever scale and softcap the model uses: the record's are ignored."""
    query, keys = snapkv_inputs(21, 8, seed=3)
    record = QueryRecord(query, 0.123, 5.0)
    scores = SnapKVPress(8).score(keys, keys, torch.arange(21).expand(1, 2, 21), record)
    expected = torch.from_numpy(kvpress_snapkv_scores(query[0].double().numpy(), keys[0].double().numpy(), 8))
    # float32 arithmetic against float64 loops: agreement to a few float32 ulps of weights below 1
    torch.testing.assert_close(scores[0].double(), expected, atol=1e-6, rtol=1e-5)


def test_snapkv_needs_its_window_of_queries_and_shrinks_it_for_a_short_prefill():
    query, keys = snapkv_inputs(40, 8)
    with pytest.raises(InputError, match="last 16 queries"):  # kvpress scores with all 16 window queries
        evict(keys, SnapKVPress(16), 0.5, query=query)
    short_query, short_keys = snapkv_inputs(10, 9)  # kvpress refuses 10 tokens with a window of 64: here 9
    scores = SnapKVPress().score(short_keys, short_keys, torch.arange(10).expand(1, 2, 10),
                                 QueryRecord(short_query, 1.0, None))
    expected = kvpress_snapkv_scores(short_query[0].double().numpy(), short_keys[0].double().numpy(), 9)
    # float32 against float64 loops, as above
    torch.testing.assert_close(scores[0].double(), torch.from_numpy(expected), atol=1e-6, rtol=1e-5)


def test_protect_beyond_the_budget_keeps_every_protected_token():
    keys = distinct_norm_keys(12)
    # kvpress would keep int(12 * 0.25) = 3; the 4 protected positions are all kept (this project's extension)
    assert evict(keys, KnormPress(), 0.75, protect=4) == [[0, 1, 2, 3]] * 2


@pytest.mark.parametrize("held,ratio,rounded_up", [(129, 0.5, 65), (129, 0.75, 33), (20, 0.9, 2)])
def test_the_earlier_definitions_stay_available_under_their_own_names(held, ratio, rounded_up):
    keys = distinct_norm_keys(held)
    for name in ("window_sinkscope", "knorm_sinkscope"):  # this project's count: evict int(held * ratio)
        assert [len(head) for head in evict(keys, make_press(name), ratio)] == [rounded_up] * 2
    # the earlier SnapKV: its 32-query window always kept, the rest by its own pooling, the count rounded up
    window = min(32, held)  # LastQueries records at most the tokens there are
    query, _ = snapkv_inputs(held, window)
    kept = evict(keys, make_press("snapkv_sinkscope"), ratio, query=query)
    assert all(len(head) == rounded_up for head in kept)
    assert all(set(range(held - min(window, rounded_up), held)) <= set(head) for head in kept)

"""Every probe against transformers' own eager weights of a twin model with the same weights.

Oracle: ``output_attentions=True`` of the eager twin (weights W [B, H, T, S]) and, for the value norms, the
twin's own ``v_proj`` outputs. Compared on real queries of a batch with left and right padding, longer than
the sliding window and than the probes' chunk size. Tolerances: both sides are float32 softmax weights over
at most 20 keys, which agree to ~1e-6 each; sums and entropies over a row get 1e-5 and 1e-4 (the entropy's
log p term amplifies the error of the smallest weights).
"""

from __future__ import annotations

import pytest
import torch

from helpers import CHUNK, eager_twin, padded_batch, positions, tiny_model
from sinkscope.capture import (
    AttentionEntropy,
    AttentionWeights,
    KeyAttention,
    SinkKnockout,
    TextStartAttention,
    ValueNorms,
    capture,
)

TEXT_START = 2
# families with plain causal, sliding-window and soft-capped attention and GPT-2's fused projections
PLAIN = ["llama", "gemma2", "gemma3_text", "gpt2"]


def eager_weights(model, ids, mask, values: bool = False):
    """The twin's attention weights per layer [B, H, T, S] and (``values``) its value vectors [B, KVH, S, D]."""
    twin = eager_twin(model)
    captured: dict[int, torch.Tensor] = {}
    hooks = []
    if values:
        for layer, block in enumerate(twin.model.layers):
            attention = block.self_attn
            hooks.append(attention.v_proj.register_forward_hook(
                lambda _m, _i, out, layer=layer, d=attention.head_dim: captured.__setitem__(
                    layer, out.view(*out.shape[:2], -1, d).transpose(1, 2))))
    try:
        with torch.no_grad():
            out = twin(input_ids=ids, attention_mask=mask, position_ids=positions(mask), output_attentions=True)
    finally:
        for hook in hooks:
            hook.remove()
    return list(out.attentions), captured


def real_queries(mask: torch.Tensor) -> torch.Tensor:
    """bool [B, 1, T, 1]."""
    return mask.bool()[:, None, :, None]


def gathered(weights: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """[B, H, T]: each row's weight on key ``keys[b]``."""
    return torch.stack([weights[b, :, :, int(k)] for b, k in enumerate(keys)])


def entropy(p: torch.Tensor) -> torch.Tensor:
    return -torch.where(p > 0, p * p.log(), torch.zeros_like(p)).sum(-1)


def probed(family: str, probe, values: bool = False):
    """Run ``probe`` on a padded batch through the engine of a tiny ``family`` model: (ids, mask, the eager
    twin's weights per layer, its values per layer when ``values``)."""
    model = tiny_model(family)
    ids, mask = padded_batch()
    with capture(model, [probe], chunk_size=CHUNK) as engine:
        engine.forward(ids, mask)
    weights, captured = eager_weights(model, ids, mask, values)
    return ids, mask, weights, captured


@pytest.mark.parametrize("family", PLAIN)
def test_text_start_attention_is_the_weight_on_the_first_and_the_first_text_token(family):
    probe = TextStartAttention([TEXT_START] * padded_batch()[0].shape[0])
    ids, mask, weights_by_layer, _ = probed(family, probe)
    first = mask.argmax(-1)
    real = real_queries(mask)[..., 0]
    for layer, weights in enumerate(weights_by_layer):
        record = probe.records[layer]
        for name, key in (("first", first), ("text", first + TEXT_START)):
            reference = gathered(weights, key)
            assert ((record[name] - reference).abs() * real).max() <= 1e-5, (family, layer, name)
            # visible: a real query that the model lets see the key (the window may have passed it)
            seen = torch.stack([torch.arange(ids.shape[1]) >= k for k in key])[:, None] & mask.bool()[:, None]
            assert ((record[f"{name}_visible"] & seen) == record[f"{name}_visible"]).all()
            assert (reference[~record[f"{name}_visible"].expand_as(reference) & real.expand_as(reference)]
                    == 0).all()


@pytest.mark.parametrize("family", PLAIN)
def test_attention_entropy_max_counts_and_text_entropy_follow_the_weights(family):
    probe = AttentionEntropy(with_max=True, with_counts=True, text_start=TEXT_START)
    ids, mask, weights_by_layer, _ = probed(family, probe)
    first = mask.argmax(-1)
    real = real_queries(mask)[..., 0]
    for layer, weights in enumerate(weights_by_layer):
        record = probe.records[layer]
        assert ((record["entropy"] - entropy(weights)).abs() * real).max() <= 1e-4, (family, layer)
        assert ((record["max_weight"] - weights.amax(-1)).abs() * real).max() <= 1e-5
        counts = (weights > 0).sum(-1)  # every key a query may see has a positive weight here
        assert ((record["n_keys"].expand_as(counts) - counts) * real).abs().max() == 0
        before = torch.arange(ids.shape[1])[None, :] < (first + TEXT_START)[:, None]  # [B, S]: the prefix keys
        text = weights.masked_fill(before[:, None, None, :], 0.0)
        mass = text.sum(-1, keepdim=True)
        reference = torch.where(mass[..., 0] > 0, entropy(text / mass.clamp_min(1e-30)), torch.nan)
        sees = real & torch.isfinite(reference)
        assert sees.any()
        assert (record["entropy_text"] - reference)[sees].abs().max() <= 1e-4
        assert torch.isnan(record["entropy_text"][real & ~torch.isfinite(reference)]).all()


@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
def test_value_norms_first_share_and_output_norm_follow_the_values(family):
    probe = ValueNorms()
    ids, mask, weights_by_layer, values_by_layer = probed(family, probe, values=True)
    first = mask.argmax(-1)
    real = real_queries(mask)[..., 0]
    real_keys = mask.bool()[:, None, :]
    for layer, weights in enumerate(weights_by_layer):
        values = values_by_layer[layer]
        n_rep = weights.shape[1] // values.shape[1]
        values = values.repeat_interleave(n_rep, 1)  # [B, H, S, D]
        norms = values.norm(dim=-1)
        record = probe.records[layer]
        scale = norms.max()
        assert ((record["value_norm"] - norms).abs() * real_keys).max() <= 1e-5 * scale, (family, layer)
        total = (weights * norms[:, :, None, :]).sum(-1)
        share = gathered(weights, first) * gathered(norms[:, :, None, :].expand_as(weights), first) / total
        assert ((record["first_share"] - share).abs() * real).max() <= 1e-5
        output = torch.matmul(weights, values).norm(dim=-1)
        assert ((record["output_norm"] - output).abs() * real).max() <= 1e-5 * scale
        assert ((record["first_attention"] - gathered(weights, first)).abs() * real).max() <= 1e-5


@pytest.mark.parametrize("family", [*PLAIN, "gpt_oss"])
def test_key_attention_sums_each_keys_weights_over_the_real_queries(family):
    probe = KeyAttention(chunk_size=CHUNK)
    ids, mask, weights_by_layer, _ = probed(family, probe)
    real = real_queries(mask)
    for layer, weights in enumerate(weights_by_layer):
        record = probe.records[layer]
        received = (weights * real).sum(2)  # [B, H, S]
        assert (record["received"] - received).abs().max() <= 1e-5, (family, layer)
        queries = ((weights > 0) & real).sum(2)  # per head: the queries the model lets see each key
        assert (record["queries"].expand_as(queries) == queries).all()


def test_attention_weights_probe_equals_transformers_eager_weights():
    model = tiny_model("gpt_oss")
    ids, mask = padded_batch()
    probe = AttentionWeights()
    with capture(model, [probe], path="eager") as engine:
        engine.forward(ids, mask)
    reference = eager_weights(model, ids, mask)[0]
    real = real_queries(mask)
    for layer, weights in enumerate(reference):
        assert ((probe.records[layer] - weights).abs() * real).max() <= 1e-5
    with pytest.raises(ValueError, match="eager"), capture(model, [AttentionWeights()]) as engine:
        engine.forward(ids, mask)


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2", "phi3"])
def test_knockout_of_all_heads_equals_an_explicit_attention_mask(family):
    model = tiny_model(family)
    ids, mask = padded_batch()
    t = ids.shape[1]
    first = mask.argmax(-1)
    allowed = torch.ones(t, t, dtype=torch.bool).tril()[None, None].repeat(ids.shape[0], 1, 1, 1)
    allowed &= mask.bool()[:, None, None, :]
    for row in range(ids.shape[0]):
        allowed[row, 0, first[row] + 1:, first[row]] = False  # every later query loses the first key
        for query in range(t):
            allowed[row, 0, query, query] |= not bool(allowed[row, 0, query].any())  # padding rows: no NaN
    with torch.no_grad():
        reference = model(input_ids=ids, attention_mask=allowed, position_ids=positions(mask)).logits
        plain = model(input_ids=ids, attention_mask=mask, position_ids=positions(mask)).logits
    with capture(model, [SinkKnockout()]) as engine:
        knocked = engine.forward(ids, mask, logits=True).logits
    real = mask.bool()
    scale = reference[real].abs().max()
    assert (knocked - reference)[real].abs().max() <= 1e-5 * scale
    assert (plain - reference)[real].abs().max() > 1e-3 * scale  # the knock-out changes something
    # one head knocked out (layer 0, head 1) is neither the plain run nor every head knocked out
    with capture(model, [SinkKnockout({0: [1]})]) as engine:
        partial = engine.forward(ids, mask, logits=True).logits
    assert (partial - plain)[real].abs().max() > 1e-3 * scale and (partial - knocked)[real].abs().max() > 1e-3 * scale

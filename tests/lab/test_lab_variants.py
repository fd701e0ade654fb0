"""Lab attention variants: the formulas, the trained model's own forward, and what the engine measures."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sinkscope import load
from sinkscope.attention.variants import VARIANT_NAMES, VARIANTS
from sinkscope.capture import CaptureEngine
from sinkscope.experiments.scan import scan
from sinkscope.lab.models import ModelSpec, build_model
from sinkscope.metrics.sink import first_token_alpha

VOCAB, CONTEXT = 40, 32


def lab_model(variant: str, seed: int = 0):
    model = build_model(ModelSpec(hidden_size=32, layers=2, heads=4, kv_heads=2, attention=variant), VOCAB, CONTEXT,
                        0, 1, seed)
    with torch.no_grad():  # sharper attention than the default init, and sink logits away from zero
        for name, param in model.named_parameters():
            if param.dim() >= 2:
                param.normal_(0.0, 0.3)
            elif name.endswith("sink_logits"):
                param.normal_(0.0, 1.5)
    return model.eval()


def random_scores(seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    scores = torch.randn(2, 3, 5, 5, generator=generator, dtype=torch.float64) * 2
    allowed = torch.tril(torch.ones(5, 5, dtype=torch.bool))[None, None]
    return scores, allowed


def test_off_by_one_is_softmax_with_an_extra_zero_logit():
    scores, allowed = random_scores()
    weights = VARIANTS["off_by_one"].weights(scores, allowed, torch.zeros(3, dtype=torch.float64))
    # by hand: exp(s_ij) / (1 + sum_k exp(s_ik)) over the allowed keys
    exp = torch.exp(scores) * allowed
    expected = exp / (1 + exp.sum(-1, keepdim=True))
    torch.testing.assert_close(weights, expected)
    # and as softmax over [scores, 0], the zero column dropped
    padded = torch.cat([scores.masked_fill(~allowed, float("-inf")), torch.zeros(2, 3, 5, 1, dtype=torch.float64)],
                       -1)
    torch.testing.assert_close(weights, torch.softmax(padded, -1)[..., :-1])


def test_rows_sum_to_one_only_where_they_should():
    scores, allowed = random_scores(1)
    sinks = torch.tensor([-1.0, 0.5, 2.0], dtype=torch.float64)
    softmax = VARIANTS["softmax"].weights(scores, allowed)
    torch.testing.assert_close(softmax.sum(-1), torch.ones(2, 3, 5, dtype=torch.float64))
    learned = VARIANTS["learned_sink"].weights(scores, allowed, sinks)
    sink_share = 1 - learned.sum(-1)  # what the sink logit takes: exp(b) / (exp(b) + sum exp(s))
    expected_share = torch.exp(sinks)[None, :, None] / (
        torch.exp(sinks)[None, :, None] + (torch.exp(scores) * allowed).sum(-1))
    torch.testing.assert_close(sink_share, expected_share)
    assert bool((learned.sum(-1) < 1).all())
    sigmoid = VARIANTS["sigmoid"].weights(scores, allowed, logit_bias=-1.0)
    torch.testing.assert_close(sigmoid, torch.sigmoid(scores - 1.0) * allowed)
    assert not torch.allclose(sigmoid.sum(-1), torch.ones(2, 3, 5, dtype=torch.float64))


@pytest.mark.parametrize("variant", VARIANT_NAMES)
def test_engine_computes_what_the_model_computes(variant):
    model = lab_model(variant)
    ids = torch.randint(2, VOCAB, (2, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        reference = model(input_ids=ids).logits
    for path in ("auto", "chunked", "eager"):
        with CaptureEngine(model, [], path=path, chunk_size=5) as engine:
            logits = engine.forward(ids, logits=True).logits
        torch.testing.assert_close(logits, reference, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("variant", VARIANT_NAMES)
def test_sink_metric_treats_each_variant_correctly(variant):
    """scan's alpha (and the sink logit's share) against the model's own attention weights."""
    model = lab_model(variant, seed=1)
    ids = torch.randint(2, VOCAB, (3, 10), generator=torch.Generator().manual_seed(4))
    ids[:, 0] = 0
    if variant == "softmax":  # SDPA hides the weights: transformers' own eager attention is the reference
        model.set_attn_implementation("eager")
    with torch.no_grad():
        attentions = model(input_ids=ids, output_attentions=True).attentions  # per layer [B, H, T, T]
    weights = torch.stack(attentions, 1).double().numpy()  # [B, L, H, T, T]
    result = scan(model, input_ids=ids.tolist(), max_tokens=None, progress=False)
    np.testing.assert_allclose(result.alpha, first_token_alpha(weights), atol=1e-5)
    mass = result.sink_logit_mass
    if variant in ("off_by_one", "learned_sink"):
        expected = (1 - weights.sum(-1)).mean(-1)  # mean over queries of the share the sink logit takes
        np.testing.assert_allclose(mass, expected, atol=1e-5)
        assert mass.min() > 0
    else:
        assert mass is None


@pytest.mark.parametrize("variant", VARIANT_NAMES)
def test_saved_lab_model_loads_with_its_variant(tmp_path, variant):
    model = lab_model(variant, seed=2)
    model.save_pretrained(tmp_path)
    loaded = load(str(tmp_path))
    ids = torch.randint(2, VOCAB, (1, 9), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(input_ids=ids).logits, model(input_ids=ids).logits)
    assert loaded.model.config.sinkscope_attention == variant


@pytest.mark.parametrize("variant", ["learned_sink", "off_by_one", "sigmoid"])
def test_variant_gradients_match_finite_differences(variant):
    """gradcheck (float64 finite differences) of the registered attention function, inputs and sink logits."""
    from types import SimpleNamespace

    from sinkscope.attention.interface import sinkscope_attention

    generator = torch.Generator().manual_seed(7)
    query = torch.randn(1, 4, 6, 8, dtype=torch.float64, generator=generator, requires_grad=True)
    key = torch.randn(1, 2, 6, 8, dtype=torch.float64, generator=generator, requires_grad=True)
    value = torch.randn(1, 2, 6, 8, dtype=torch.float64, generator=generator, requires_grad=True)
    sinks = torch.randn(4, dtype=torch.float64, generator=generator, requires_grad=variant == "learned_sink")

    def attend(q, k, v, s):
        module = SimpleNamespace(attention_variant=variant, training=False,
                                 sink_logits=s if variant != "off_by_one" else torch.zeros_like(s),
                                 sigmoid_bias=-1.5)
        return sinkscope_attention(module, q, k, v, None, scaling=0.35)[0]

    assert torch.autograd.gradcheck(attend, (query, key, value, sinks))


def test_training_moves_learned_sink_logits():
    model = lab_model("learned_sink", seed=3).train()
    ids = torch.randint(2, VOCAB, (2, 8), generator=torch.Generator().manual_seed(6))
    logits = model(input_ids=ids).logits
    torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten()).backward()
    grads = [layer.self_attn.sink_logits.grad for layer in model.model.layers]
    assert all(g is not None and g.abs().max() > 0 for g in grads)

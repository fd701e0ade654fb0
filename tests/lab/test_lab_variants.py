"""Lab attention variants in a model: its own forward, what the engine measures, saving and training (the formulas
themselves: tests/attention/test_variants.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sinkscope import load
from sinkscope.attention.variants import VARIANT_NAMES
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


def test_training_moves_learned_sink_logits():
    model = lab_model("learned_sink", seed=3).train()
    ids = torch.randint(2, VOCAB, (2, 8), generator=torch.Generator().manual_seed(6))
    logits = model(input_ids=ids).logits
    torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten()).backward()
    grads = [layer.self_attn.sink_logits.grad for layer in model.model.layers]
    assert all(g is not None and g.abs().max() > 0 for g in grads)

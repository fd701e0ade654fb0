"""The attention variants (`attention/variants.py`): each formula by hand (off-by-one, learned sink, sigmoid,
softpick), gradients of the registered attention function by float64 finite differences, and the gate the
engine reports against the gate computed outside it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sinkscope.attention.kernels import KERNELS, AttentionInputs, KernelOptions
from sinkscope.attention.variants import GATE_MODULE, VARIANTS
from sinkscope.capture import CaptureEngine, FirstTokenAttention
from sinkscope.experiments.scan import scan
from sinkscope.lab.models import ModelSpec, build_model

VOCAB, CONTEXT = 40, 32


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
    assert (sigmoid.sum(-1) - 1).abs().max() > 0.1  # sigmoid rows are not normalised: far from one, not rounding


def test_softpick_by_hand_and_rows_sum_to_at_most_one():
    scores = torch.tensor([[[[0.5, -1.0, 2.0, 0.0], [3.0, 1.0, -0.5, 0.2]]]], dtype=torch.float64)
    allowed = torch.tensor([[[[True, True, True, False], [True, True, True, True]]]])
    weights = VARIANTS["softpick"].weights(scores, allowed)
    for row in range(2):
        s = scores[0, 0, row][allowed[0, 0, row]]
        expected = torch.relu(torch.exp(s) - 1) / (torch.exp(s) - 1).abs().sum()  # Zuhri et al. eq. 1
        torch.testing.assert_close(weights[0, 0, row][allowed[0, 0, row]], expected, atol=1e-6, rtol=1e-6)
    assert weights[0, 0, 0, 3] == 0  # a masked key takes nothing and counts for nothing
    assert bool((weights.sum(-1) <= 1 + 1e-12).all())
    # all logits <= 0: the head puts weight nowhere, which softmax cannot do
    assert VARIANTS["softpick"].weights(-scores.abs(), allowed).sum() == 0
    # large logits do not overflow
    assert torch.isfinite(VARIANTS["softpick"].weights(scores * 400, allowed)).all()


def test_softpick_kernel_and_its_lse_give_each_weight():
    g = torch.Generator().manual_seed(0)
    query, key, value = (torch.randn(1, 4, 7, 8, generator=g, dtype=torch.float64),
                         torch.randn(1, 2, 7, 8, generator=g, dtype=torch.float64),
                         torch.randn(1, 2, 7, 8, generator=g, dtype=torch.float64))
    inputs = AttentionInputs(query, key, value, None, True, 0.5)
    out = KERNELS["softpick"](inputs, KernelOptions(torch.float64, chunk_size=3, keep_weights=True))
    scores = query @ key.repeat_interleave(2, 1).transpose(-1, -2) * 0.5
    weights = VARIANTS["softpick"].weights(scores, inputs.dense_allowed())
    torch.testing.assert_close(out.weights, weights)
    torch.testing.assert_close(out.output, weights @ value.repeat_interleave(2, 1))
    from_lse = VARIANTS["softpick"].key_weight(scores[..., 0], out.lse, None)
    torch.testing.assert_close(from_lse * inputs.dense_allowed()[..., 0], weights[..., 0])


def lab_model(variant: str, seed: int = 0):
    torch.manual_seed(seed)
    model = build_model(ModelSpec(hidden_size=32, layers=2, heads=4, kv_heads=2, attention=variant), VOCAB, CONTEXT,
                        0, 1, seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() >= 2:
                param.normal_(0.0, 0.3)
    return model.eval()


@pytest.mark.parametrize("variant", ["softpick", "gated_headwise", "gated_elementwise"])
def test_softpick_and_gate_gradients_match_finite_differences(variant):
    """gradcheck (float64 finite differences) of the registered attention function: queries, keys, values and,
    for gated variants, the layer input the gate reads and the gate's weights."""
    from types import SimpleNamespace

    from sinkscope.attention.interface import sinkscope_attention

    g = torch.Generator().manual_seed(7)
    query = torch.randn(1, 4, 6, 8, dtype=torch.float64, generator=g, requires_grad=True)
    key = torch.randn(1, 2, 6, 8, dtype=torch.float64, generator=g, requires_grad=True)
    value = torch.randn(1, 2, 6, 8, dtype=torch.float64, generator=g, requires_grad=True)
    hidden = torch.randn(1, 6, 12, dtype=torch.float64, generator=g, requires_grad=True)
    width = 8 if variant == "gated_elementwise" else 1
    gate = torch.nn.Linear(12, 4 * width, dtype=torch.float64)

    def attend(q, k, v, h, w):
        module = SimpleNamespace(attention_variant=variant, training=False, gate_shape=(4, width), _gate_input=h)
        setattr(module, GATE_MODULE, lambda x: torch.nn.functional.linear(x, w, gate.bias))
        return sinkscope_attention(module, q, k, v, None, scaling=0.35)[0]

    weight = gate.weight.detach().clone().requires_grad_(True)
    assert torch.autograd.gradcheck(attend, (query, key, value, hidden, weight))


@pytest.mark.parametrize("variant", ["learned_sink", "off_by_one", "sigmoid"])
def test_sink_and_sigmoid_gradients_match_finite_differences(variant):
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


def test_the_engine_reports_the_gate_computed_outside_it():
    model = lab_model("gated_headwise", seed=2)
    ids = torch.randint(2, VOCAB, (2, 9), generator=torch.Generator().manual_seed(3))
    seen = {}

    def keep(module, args, kwargs):
        seen[module] = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]

    hooks = [layer.self_attn.register_forward_pre_hook(keep, with_kwargs=True) for layer in model.model.layers]
    probe = FirstTokenAttention()
    with CaptureEngine(model, [probe]) as engine:
        engine.forward(ids)
    for hook in hooks:
        hook.remove()
    for layer, block in enumerate(model.model.layers):
        module = block.self_attn
        with torch.no_grad():
            expected = torch.sigmoid(getattr(module, GATE_MODULE)(seen[module]))  # [B, T, H]
        torch.testing.assert_close(probe.records[layer]["gate"], expected.transpose(1, 2))
    result = scan(model, input_ids=ids.tolist(), max_tokens=None, progress=False)
    gate_mean = result.frame["gate_mean"].to_numpy()
    assert np.isfinite(gate_mean).all() and ((gate_mean > 0) & (gate_mean < 1)).all()
    plain = scan(lab_model("softmax"), input_ids=ids.tolist(), max_tokens=None, progress=False)
    assert np.isnan(plain.frame["gate_mean"]).all()

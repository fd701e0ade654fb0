"""The lab's softmax-family variants through the fused SDPA op (`attention.interface.sdpa_attention`) against
their explicit weights formula (`AttentionVariant.weights`): outputs and every gradient, sink logits
included, for causal, masked (intra-document, padded), cached (fewer queries than keys) and GQA calls."""

from __future__ import annotations

import pytest
import torch

from sinkscope.attention.interface import sdpa_attention
from sinkscope.attention.kernels import repeat_kv
from sinkscope.attention.masks import dense_allowed
from sinkscope.attention.variants import VARIANTS


def reference(query, key, value, allowed, causal, scaling, sinks, variant):
    t, s = query.shape[2], key.shape[2]
    n_rep = query.shape[1] // key.shape[1]
    scores = torch.matmul(query, repeat_kv(key, n_rep).transpose(-1, -2)) * scaling
    weights = VARIANTS[variant].weights(scores, dense_allowed(allowed, t, s, causal, query.device), sinks)
    return torch.matmul(weights, repeat_kv(value, n_rep))


def case(seed, heads=4, kv_heads=4, t=9, s=9, d=8, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, heads, t, d, generator=g, dtype=dtype).requires_grad_()
    k = torch.randn(2, kv_heads, s, d, generator=g, dtype=dtype).requires_grad_()
    v = torch.randn(2, kv_heads, s, d, generator=g, dtype=dtype).requires_grad_()
    sinks = (2 * torch.randn(heads, generator=g, dtype=dtype)).requires_grad_()
    return q, k, v, sinks


def intra_doc(t):
    doc = torch.tensor([0] * (t // 2) + [1] * (t - t // 2))
    causal = torch.arange(t)[:, None] >= torch.arange(t)[None, :]
    return (causal & (doc[:, None] == doc[None, :]))[None, None]


def padded(t):
    allowed = (torch.arange(t)[:, None] >= torch.arange(t)[None, :]).repeat(2, 1, 1, 1)
    allowed[1, :, :, :3] = False  # three pad tokens on the left of the second row
    allowed[1, :, :3, :] = False  # the pad queries see nothing
    return allowed


MASKS = {"causal": lambda t, s: None, "intra_doc": lambda t, s: intra_doc(t), "padded": lambda t, s: padded(t)}


def compare(variant, mask_name, heads=4, kv_heads=4, t=9, s=9, dtype=torch.float64, atol=1e-10, through_lse=None):
    q, k, v, sinks = case(0, heads, kv_heads, t, s, dtype=dtype)
    if variant == "off_by_one":
        sinks = torch.zeros(heads, dtype=dtype)
    elif variant == "softmax":
        sinks = None
    allowed = MASKS[mask_name](t, s)
    scaling = q.shape[-1] ** -0.5
    tensors = [x for x in (q, k, v, sinks) if x is not None and x.requires_grad]
    fast = sdpa_attention(q, k, v, allowed, None, True, scaling, sinks, through_lse=through_lse)
    expected = reference(q.double(), k.double(), v.double(), allowed, True, scaling,
                         None if sinks is None else sinks.double(), "softmax" if sinks is None else variant)
    torch.testing.assert_close(fast.double(), expected, atol=atol, rtol=atol)
    upstream = torch.randn(fast.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    got = torch.autograd.grad((fast.double() * upstream).sum(), tensors)
    want = torch.autograd.grad((expected * upstream).sum(), tensors)
    for name, a, b in zip(("query", "key", "value", "sinks"), got, want, strict=False):
        torch.testing.assert_close(a.double(), b.double(), atol=atol * 10, rtol=atol * 10, msg=f"d/d{name}")


# Both routes of a sink: its share from the flash op's log-sum-exp (CPU), and the sink as an extra key (elsewhere).
ROUTES = pytest.mark.parametrize("through_lse", [True, False], ids=["lse", "extra_key"])


@ROUTES
@pytest.mark.parametrize("variant", ["softmax", "off_by_one", "learned_sink"])
@pytest.mark.parametrize("mask_name", list(MASKS))
def test_sdpa_matches_the_formula_in_float64(variant, mask_name, through_lse):
    compare(variant, mask_name, through_lse=through_lse)


@ROUTES
@pytest.mark.parametrize("variant", ["off_by_one", "learned_sink"])
def test_grouped_kv_heads(variant, through_lse):
    compare(variant, "causal", heads=4, kv_heads=2, through_lse=through_lse)
    compare(variant, "intra_doc", heads=4, kv_heads=1, through_lse=through_lse)


@ROUTES
@pytest.mark.parametrize("variant", ["softmax", "learned_sink"])
def test_fewer_queries_than_keys_is_causal_with_the_queries_last(variant, through_lse):
    compare(variant, "causal", t=3, s=9, through_lse=through_lse)
    compare(variant, "padded", t=9, s=9, through_lse=through_lse)


@ROUTES
@pytest.mark.parametrize(("dtype", "atol"), [(torch.float32, 2e-5), (torch.bfloat16, 3e-2), (torch.float16, 4e-3)])
def test_low_precision_against_the_float64_formula(dtype, atol, through_lse):
    compare("learned_sink", "causal", dtype=dtype, atol=atol, through_lse=through_lse)
    compare("learned_sink", "padded", dtype=dtype, atol=atol, through_lse=through_lse)
    compare("off_by_one", "intra_doc", dtype=dtype, atol=atol, through_lse=through_lse)


def test_the_cpu_route_is_the_lse_one():
    """On CPU a learned sink is computed through `_SinkThroughLse` (the fast route the lab trains with)."""
    q, k, v, sinks = case(0, dtype=torch.float32)
    out = sdpa_attention(q, k, v, None, None, True, q.shape[-1] ** -0.5, sinks)
    assert "SinkThroughLse" in type(out.grad_fn).__name__


def test_a_sink_logit_moves_weight_off_the_keys():
    """Hand case: one query, two keys with equal logits and values 1, 3; a sink logit log 2 takes half."""
    q = torch.zeros(1, 1, 1, 2)
    k = torch.zeros(1, 1, 2, 2)
    v = torch.tensor([[[[1.0, 0.0], [3.0, 0.0]]]])
    out = sdpa_attention(q, k, v, None, None, True, 1.0, torch.tensor([torch.log(torch.tensor(2.0))]))
    torch.testing.assert_close(out[0, 0, 0], torch.tensor([1.0, 0.0]))  # (1 + 3) / (1 + 1 + 2)


@pytest.mark.parametrize("variant", ["off_by_one", "learned_sink", "gated_headwise", "gated_elementwise"])
def test_lab_model_trains_the_same_through_sdpa_and_the_formula(variant, monkeypatch):
    """A lab model's loss and parameter gradients with the SDPA path equal those of the explicit path."""
    from sinkscope.attention import interface as attention
    from sinkscope.lab.models import ModelSpec, build_model

    model = build_model(ModelSpec(hidden_size=32, layers=2, heads=4, attention=variant), 50, 16, 0, 1, seed=0)
    model = model.double()
    for name, p in model.named_parameters():
        if name.endswith("sink_logits"):
            with torch.no_grad():
                p.copy_(torch.linspace(-1.0, 2.0, p.numel()))
    ids = torch.randint(2, 50, (2, 16), generator=torch.Generator().manual_seed(0))

    def loss_and_grads():
        model.zero_grad()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    fast_loss, fast = loss_and_grads()
    monkeypatch.setattr(attention, "sdpa_attention", _formula_attention)
    slow_loss, slow = loss_and_grads()
    torch.testing.assert_close(fast_loss, slow_loss, atol=1e-10, rtol=1e-10)
    assert fast.keys() == slow.keys() and any("sink_logits" in n or "gate" in n for n in fast)
    for name in fast:
        torch.testing.assert_close(fast[name], slow[name], atol=1e-9, rtol=1e-7, msg=name)


def _formula_attention(query, key, value, allowed, bias, causal, scaling, sinks=None, dropout=0.0,
                       through_lse=None):
    return reference(query, key, value, allowed, causal, scaling, sinks,
                     "softmax" if sinks is None else "learned_sink")

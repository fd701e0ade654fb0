"""One attention function, one kernel dispatch, variants through their interface, and the layering.

- every kernel in `KERNELS` (one signature) against the variants' reference weights formula;
- the engine and every re-run of a layer's attention (knock-out, weighted sums, entropy) go through the
  one mapping;
- a variant registered from outside reaches the engine (and the plain forward) through `AttentionVariant`
  alone;
- lab models and the engine share the one registered function; an engine captures only its own model;
- nothing below the lab imports it.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import tiny_model
from sinkscope.attention import kernels as kernel_module
from sinkscope.attention.interface import register
from sinkscope.attention.variants import VARIANTS
from sinkscope.capture import (
    IMPLEMENTATION,
    KERNELS,
    AttentionEntropy,
    AttentionInputs,
    AttentionVariant,
    CaptureEngine,
    FirstTokenAttention,
    KernelOptions,
    SinkKnockout,
    ValueNorms,
    choose_kernel,
    run_kernel,
    sinkscope_attention,
)

SRC = Path(__file__).resolve().parents[2] / "src" / "sinkscope"


def random_inputs(seed: int = 0, *, sinks: bool = True, window: int | None = 4) -> AttentionInputs:
    g = torch.Generator().manual_seed(seed)
    b, h, kvh, t, d = 2, 4, 2, 9, 8
    query = torch.randn(b, h, t, d, generator=g, dtype=torch.float64) * 2
    key = torch.randn(b, kvh, t, d, generator=g, dtype=torch.float64)
    value = torch.randn(b, kvh, t, d, generator=g, dtype=torch.float64)
    q, k = torch.arange(t)[:, None], torch.arange(t)[None, :]
    allowed = (k <= q) & (q - k < (window or t))
    allowed = allowed[None, None].repeat(b, 1, 1, 1)
    allowed[1, :, :, :2] = False  # row 1 left-padded by two
    allowed[1, :, :2, :2] = torch.eye(2, dtype=torch.bool)  # (padding queries see themselves: no empty rows)
    return AttentionInputs(query, key, value, allowed, True, 0.4,
                           sinks=torch.randn(h, generator=g, dtype=torch.float64) if sinks else None)


@pytest.mark.parametrize("sinks", [False, True])
def test_every_softmax_kernel_equals_the_variant_formula(sinks):
    inputs = random_inputs(sinks=sinks)
    scores = inputs.query @ inputs.key.repeat_interleave(2, 1).transpose(-1, -2) * inputs.scaling
    # the reference, written out here: softmax over the allowed keys and the sink logit (its column dropped)
    logits = scores.masked_fill(~inputs.dense_allowed(), float("-inf"))
    if sinks:
        logits = torch.cat([logits, inputs.sinks.reshape(1, -1, 1, 1).expand(*logits.shape[:3], 1)], -1)
    weights = torch.softmax(logits, -1)[..., :scores.shape[-1]]
    # float64, the same softmax over the same logits: equal up to a few ulps of a weight <= 1
    torch.testing.assert_close(VARIANTS["learned_sink" if sinks else "softmax"].weights(
        scores, inputs.dense_allowed(), inputs.sinks), weights, rtol=0, atol=1e-14)
    expected = weights @ inputs.value.repeat_interleave(2, 1)
    options = KernelOptions(torch.float64, chunk_size=4)
    for name in ("fused", "chunked", "eager", "flex"):
        result = KERNELS[name](inputs, options)
        torch.testing.assert_close(result.output, expected, msg=name)
        # exp(score - lse) is each weight: the normaliser includes the sink
        torch.testing.assert_close(torch.exp(scores - result.lse[..., None]) * inputs.dense_allowed(), weights)
    sigmoid = run_kernel("sigmoid", AttentionInputs(inputs.query, inputs.key, inputs.value, inputs.allowed, True,
                                                    inputs.scaling, logit_bias=-1.0), options)
    reference = VARIANTS["sigmoid"].weights(scores, inputs.dense_allowed(), logit_bias=-1.0)
    torch.testing.assert_close(sigmoid.output, reference @ inputs.value.repeat_interleave(2, 1))
    with pytest.raises(ValueError, match="unknown attention kernel"):
        run_kernel("flash9", inputs, options)


def test_choose_kernel_is_a_lookup_in_the_order_documented():
    plain = random_inputs(sinks=False)
    capped = AttentionInputs(plain.query, plain.key, plain.value, None, True, 0.4, softcap=5.0)
    biased = AttentionInputs(plain.query, plain.key, plain.value, None, True, 0.4, bias=torch.zeros(1, 1, 9, 9))
    assert choose_kernel(plain, "auto") == "fused" and choose_kernel(plain, "fused") == "fused"
    assert choose_kernel(capped, "auto") == "chunked" and choose_kernel(biased, "fused") == "chunked"
    assert choose_kernel(plain, "chunked") == "chunked" and choose_kernel(plain, "eager") == "eager"
    assert choose_kernel(plain, "eager", required="sigmoid") == "sigmoid"
    assert choose_kernel(capped, "flex") == "flex"
    with pytest.raises(ValueError, match="path"):
        choose_kernel(plain, "flash9")


@pytest.mark.parametrize("family,kernel", [("llama", "fused"), ("gemma2", "chunked")])
def test_engine_and_every_rerun_go_through_the_one_mapping(monkeypatch, family, kernel):
    calls: list[str] = []
    for name, function in list(KERNELS.items()):
        monkeypatch.setitem(kernel_module.KERNELS, name,
                            lambda inputs, options, name=name, function=function: calls.append(name)
                            or function(inputs, options))
    model = tiny_model(family)
    ids = torch.randint(3, 90, (1, 8), generator=torch.Generator().manual_seed(1))
    with CaptureEngine(model, [SinkKnockout(), ValueNorms(), AttentionEntropy(with_max=False)]) as engine:
        engine.forward(ids)
    # per layer: the layer itself, the knock-out's re-run, the value-norm weighted sum; the linear-memory
    # entropy is one more weighted sum on the fused path (the chunked path reads the logits directly)
    per_layer = 4 if kernel == "fused" else 3
    assert calls == [kernel] * per_layer * 3


class FixedSink(AttentionVariant):
    """A variant from outside the package: softmax with a constant extra logit of 1 in every head."""

    name = "fixed_sink_test"

    def extra_logit(self, module):
        return torch.ones(module.config.num_attention_heads)


def test_a_registered_variant_reaches_plain_forward_and_engine_through_its_interface(monkeypatch):
    monkeypatch.setitem(VARIANTS, FixedSink.name, FixedSink())
    model = tiny_model("llama")
    register()
    for layer in model.model.layers:
        layer.self_attn.attention_variant = FixedSink.name
    model.set_attn_implementation(IMPLEMENTATION)
    ids = torch.randint(3, 90, (2, 10), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        plain = model(input_ids=ids, output_attentions=True)
    sink_share = [1 - weights.sum(-1) for weights in plain.attentions]  # what the extra logit takes
    assert min(share.min() for share in sink_share) > 0 and max(share.max() for share in sink_share) > 0.1
    for path in ("auto", "chunked", "eager", "flex"):
        probe = FirstTokenAttention()
        with CaptureEngine(model, [probe], path=path, chunk_size=4) as engine:
            logits = engine.forward(ids, logits=True).logits
        torch.testing.assert_close(logits, plain.logits, atol=1e-5, rtol=1e-5)
        for layer, share in enumerate(sink_share):
            torch.testing.assert_close(probe.records[layer]["sink_logit"], share, atol=1e-5, rtol=0)
            torch.testing.assert_close(probe.records[layer]["attention"], plain.attentions[layer][..., 0],
                                       atol=1e-5, rtol=0)


def test_lab_models_and_the_engine_share_one_function_and_engines_capture_only_their_model():
    from transformers import AttentionInterface

    from sinkscope.lab.models import ModelSpec, build_model

    lab = build_model(ModelSpec(hidden_size=32, layers=2, heads=4, attention="learned_sink"), 40, 16, 0, 1, 0).eval()
    assert lab.config._attn_implementation == IMPLEMENTATION
    assert AttentionInterface()[IMPLEMENTATION] is sinkscope_attention
    assert not any(name.startswith("sinkscope") and name != IMPLEMENTATION for name in AttentionInterface())
    ids = torch.randint(2, 40, (1, 7), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        before = lab(input_ids=ids).logits
    other = tiny_model("llama")
    with CaptureEngine(other, [FirstTokenAttention()]) as engine:
        engine.forward(torch.randint(3, 90, (1, 5)))
        seen = engine.calls_seen
        with torch.no_grad():
            during = lab(input_ids=ids).logits  # the lab model is not this engine's: computed plainly
        assert engine.calls_seen == seen
    assert torch.equal(before, during)


def _imported_modules(path: Path) -> set[str]:
    """Absolute names of the sinkscope modules a file imports (relative imports resolved)."""
    package = ".".join(("sinkscope", *path.relative_to(SRC).with_suffix("").parts))
    if path.name == "__init__.py":
        package = package.removesuffix(".__init__") + ".__init__"
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: -node.level]
                names.add(".".join(base + ([node.module] if node.module else [])))
            elif node.module:
                names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return {name for name in names if name == "sinkscope" or name.startswith("sinkscope.")}


@pytest.mark.parametrize("package", ["capture", "models", "metrics", "data", "experiments", "report"])
def test_nothing_below_the_lab_imports_it(package):
    for path in sorted((SRC / package).rglob("*.py")):
        lab = {name for name in _imported_modules(path) if name.startswith("sinkscope.lab")}
        assert not lab, f"{path.relative_to(SRC)} imports {sorted(lab)}"


def test_loading_a_saved_lab_model_does_not_import_the_lab(tmp_path):
    from sinkscope.lab.models import ModelSpec, build_model

    build_model(ModelSpec(hidden_size=32, layers=2, heads=4, attention="learned_sink"), 40, 16, 0, 1, 0) \
        .save_pretrained(tmp_path)
    code = ("import sys, sinkscope; model = sinkscope.load(sys.argv[1]).model; "
            "assert model.config.sinkscope_attention == 'learned_sink'; "
            "print(sorted(m for m in sys.modules if m.startswith('sinkscope.lab')))")
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True,
                          env={**__import__("os").environ, "PYTHONPATH": str(SRC.parent)}, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]"


def test_auto_picks_flex_off_the_cpu():
    """On an accelerator, auto takes compiled flex (any logits, lse included); chunked stays on request."""
    query = torch.empty(1, 4, 3, 8, device="meta")
    key = value = torch.empty(1, 2, 3, 8, device="meta")
    inputs = AttentionInputs(query, key, value, None, True, 0.3, softcap=5.0)
    assert choose_kernel(inputs, "auto") == "flex"
    assert choose_kernel(inputs, "chunked") == "chunked"
    with pytest.warns(UserWarning, match="CPU only"):
        assert choose_kernel(inputs, "fused") == "chunked"

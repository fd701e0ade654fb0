"""A model's own output gate (Qwen3-Next: a hybrid of linear-attention and gated softmax-attention layers) on a
tiny random model: the engine captures the softmax layers only, leaves the model's output unchanged (the
model applies its gate itself), and reports α against eager attention and the gate against the one
transformers' code computes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from helpers import COMMON, eager_twin
from sinkscope.capture import CaptureEngine, FirstTokenAttention
from sinkscope.experiments.scan import scan

LAYER_TYPES = ["linear_attention", "full_attention", "linear_attention", "full_attention"]


def tiny_qwen3_next(seed: int = 0):
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    config = AutoConfig.for_model(
        "qwen3_next", **{**COMMON, "num_hidden_layers": 4}, head_dim=8, layer_types=LAYER_TYPES,
        linear_key_head_dim=8, linear_value_head_dim=8, linear_num_key_heads=2, linear_num_value_heads=4,
        num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, shared_expert_intermediate_size=16,
    )
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() >= 2 and "linear_attn" not in name:
                param.normal_(0.0, 0.25)  # sharper attention than the default init gives
    return model.eval()


@pytest.fixture(scope="module")
def model():
    return tiny_qwen3_next()


IDS = torch.randint(3, COMMON["vocab_size"], (2, 11), generator=torch.Generator().manual_seed(5))


def test_the_engine_sees_the_softmax_layers_and_changes_nothing(model):
    with torch.no_grad():
        plain = model(input_ids=IDS).logits
    probe = FirstTokenAttention()
    with CaptureEngine(model, [probe]) as engine:
        captured = engine.forward(IDS, logits=True).logits
    assert probe.layers() == [1, 3]
    torch.testing.assert_close(captured, plain, atol=1e-5, rtol=1e-5)  # the gate is applied once, by the model
    twin = eager_twin(model)
    with torch.no_grad():
        weights = twin(input_ids=IDS, output_attentions=True).attentions
    assert len(weights) == 2  # transformers returns the softmax layers' weights only, in order
    for layer, layer_weights in zip(probe.layers(), weights, strict=True):
        reference = layer_weights[..., 0]  # [B, H, T] weight on the first token
        torch.testing.assert_close(probe.records[layer]["attention"], reference, atol=1e-5, rtol=1e-5)


def test_the_gate_reported_is_the_models_own(model):
    seen = {}

    def keep(module, args, kwargs):
        seen[module.layer_idx] = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]

    hooks = [layer.self_attn.register_forward_pre_hook(keep, with_kwargs=True)
             for layer in model.model.layers if hasattr(layer, "self_attn")]
    probe = FirstTokenAttention()
    try:
        with CaptureEngine(model, [probe]) as engine:
            engine.forward(IDS)
    finally:
        for hook in hooks:
            hook.remove()
    for layer in probe.layers():
        module = model.model.layers[layer].self_attn
        with torch.no_grad():  # as transformers' Qwen3NextAttention.forward splits its query projection
            projected = module.q_proj(seen[layer]).view(*IDS.shape, -1, module.head_dim * 2)
            _, gate = torch.chunk(projected, 2, dim=-1)
        expected = torch.sigmoid(gate).mean(-1).transpose(1, 2)  # [B, H, T]
        torch.testing.assert_close(probe.records[layer]["gate"], expected)
        assert not hasattr(module, "_sinkscope_gate_projection") or module._sinkscope_gate_projection is None
    assert not any(hook for hook in model.model.layers[1].self_attn.q_proj._forward_hooks.values())


def test_scan_reports_alpha_and_the_gate_per_softmax_layer(model):
    result = scan(model, input_ids=IDS.tolist(), max_tokens=None, progress=False)
    frame = result.frame
    assert sorted(frame["layer"].unique()) == [1, 3]
    assert set(frame["layer_type"]) == {"full_attention"}
    gate = frame["gate_mean"].to_numpy()
    assert np.isfinite(gate).all() and ((gate > 0) & (gate < 1)).all()
    positions = scan(model, input_ids=IDS.tolist(), max_tokens=None, progress=False, per_position=True)
    assert sorted(positions.tables["positions"]["layer"].unique()) == [1, 3]


def test_the_terminal_table_lists_the_softmax_layers_with_their_gate(model):
    from rich.console import Console

    from sinkscope.report.tables.measure import layer_table

    result = scan(model, input_ids=IDS.tolist(), max_tokens=None, progress=False)
    console = Console(record=True, width=200)
    console.print(layer_table([("model", result)], [0.3]))
    text = console.export_text()
    assert "gate" in text
    rows = {cells[0]: cells for line in text.splitlines() if line.count("│") > 2
            for cells in [[c.strip() for c in line.split("│")[1:-1]]]}
    assert [name for name in rows if name.isdigit()] == ["1", "3"]
    gates = result.gate_mean.mean(axis=(0, 2))  # per measured layer: layers 1 and 3
    assert rows["3"][-1] == f"{gates[1]:.3f}" and rows["1"][-1] == f"{gates[0]:.3f}"


def test_other_measurements_name_the_softmax_layers_by_their_index(model):
    """noop and matrix-entropy stack the measured layers; their rows carry the model's layer index, with the
    values scan measures for that layer."""
    import sinkscope as ss
    from helpers import SENTENCES, word_tokenizer
    from sinkscope.experiments.matrix_entropy import matrix_entropy_by_depth
    from sinkscope.experiments.noop import noop

    loaded = ss.load(model, tokenizer=word_tokenizer())
    texts = SENTENCES[:2]
    scanned = scan(loaded, texts, bos="add", max_tokens=None, progress=False)
    noop_frame = noop(loaded, texts, bos=["add"], progress=False).to_frame()
    assert sorted(noop_frame["layer"].unique()) == [1, 3]
    merged = noop_frame.merge(scanned.frame, on=["prompt", "layer", "head"], suffixes=("", "_scan"))
    assert len(merged) == len(noop_frame)
    np.testing.assert_allclose(merged["alpha"], merged["alpha_scan"], atol=1e-6)
    rates = matrix_entropy_by_depth(loaded, texts, max_tokens=None, progress=False).tables["sink_rate"]
    assert sorted(rates["layer"].unique()) == [1, 3]

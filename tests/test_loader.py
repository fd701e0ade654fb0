"""Loading from local directories (the hub code path), GGUF files and live objects; clear errors."""

from __future__ import annotations

import pytest
import torch

import sinkscope as ss
from helpers import tiny_model
from sinkscope.errors import ModelLoadError, UnsupportedModelError


def test_local_directory_loads_with_tokenizer_and_info(model_dir):
    lm = ss.load(str(model_dir))
    assert lm.info.source == "local"
    assert (lm.info.n_layers, lm.info.n_heads, lm.info.n_kv_heads, lm.info.head_dim) == (3, 4, 2, 8)
    assert lm.info.bos_token == "<s>" and lm.info.bos_token_id == 1
    assert lm.tokenizer is not None and not lm.model.training
    reference = tiny_model("llama")
    ids = torch.tensor([[1, 5, 6, 7]])
    with torch.no_grad():
        torch.testing.assert_close(lm.model(ids).logits, reference(ids).logits)


def test_dtype_option(model_dir):
    assert ss.load(str(model_dir), dtype="bfloat16").info.dtype == "bfloat16"
    with pytest.raises(ModelLoadError, match="unknown dtype"):
        ss.load(str(model_dir), dtype="float8")


def test_live_model_and_loaded_model_pass_through():
    model = tiny_model("qwen2")
    lm = ss.load(model)
    assert lm.info.source == "live" and lm.tokenizer is None and lm.model is model
    assert ss.load(lm) is lm


@pytest.mark.parametrize("ref,match", [
    ("./does/not/exist", "no such file or directory"),
    ("/tmp/definitely-missing-model.gguf", "no such file"),
    ("not-a-model-name", "not a bundled model"),
])
def test_missing_sources_give_clear_errors(ref, match):
    with pytest.raises(ModelLoadError, match=match):
        ss.load(ref)


def test_hub_id_that_cannot_be_fetched_is_a_clear_error():
    with pytest.raises(ModelLoadError, match="cannot load 'sinkscope-test/absent-model'"):
        ss.load("sinkscope-test/absent-model")


def test_corrupt_and_non_gguf_files(tmp_path):
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"GGUF" + bytes(range(200)))
    with pytest.raises(ModelLoadError, match="truncated or corrupt"):
        ss.load(str(junk))
    fake = tmp_path / "fake.gguf"
    fake.write_text("hello")
    with pytest.raises(ModelLoadError, match="not a GGUF file"):
        ss.load(str(fake))
    empty_dir = tmp_path / "empty"
    empty_dir.mkdir()
    with pytest.raises(ModelLoadError, match="not a model directory"):
        ss.load(str(empty_dir))


def test_directory_with_corrupt_weights(tmp_path, model_dir):
    broken = tmp_path / "broken"
    broken.mkdir()
    for item in model_dir.iterdir():
        (broken / item.name).write_bytes(item.read_bytes())
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ModelLoadError, match="cannot load"):
        ss.load(str(broken))


def test_remote_code_is_never_trusted_by_default(tmp_path, model_dir, monkeypatch):
    import transformers

    seen = {}
    original = transformers.AutoModelForCausalLM.from_pretrained

    def spy(*args, **kwargs):
        seen["trust_remote_code"] = kwargs.get("trust_remote_code")
        return original(*args, **kwargs)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", spy)
    ss.load(str(model_dir))
    assert seen["trust_remote_code"] is False


def test_architecture_without_attention_is_refused():
    from transformers import AutoConfig, AutoModelForCausalLM

    mamba = AutoModelForCausalLM.from_config(AutoConfig.for_model("mamba", vocab_size=64, hidden_size=32,
                                                                   num_hidden_layers=2))
    with pytest.raises(UnsupportedModelError, match="no softmax attention"):
        ss.load(mamba)

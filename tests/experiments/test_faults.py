"""Faults: `kill -9` of a real `sinkscope` process at chosen points, then `--resume`; and determinism.

Where a kill lands is chosen without any timing: with ``SINKSCOPE_TEST_STALL="batches N"`` the run
says so on stderr and blocks once it has written N batch markers (`sinkscope.faults`);
the test reads that line, sends SIGKILL, and continues the run with ``--resume`` — first in another process
that is killed again further on, then to the end. The finished tables must equal, exactly, those of an
uninterrupted run: no row lost, none twice.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import sinkscope as ss
from helpers import SENTENCES, TEXT, invoke, passkey_tokenizer, stalled, tiny_model, word_tokenizer

SOURCE = Path(ss.__file__).resolve().parents[1]  # the src directory the tests import sinkscope from


def killed_at(args: list[str], batches: int) -> None:
    """Run ``sinkscope *args`` in a new process, stalled after ``batches`` batch markers, and SIGKILL it there."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SOURCE), *filter(None, [os.environ.get("PYTHONPATH")])])}
    with stalled([sys.executable, "-m", "sinkscope.cli", *args, "--quiet"], env, f"batches {batches}") as process:
        pass
    assert process.returncode == -signal.SIGKILL


def markers(out: Path) -> int:
    return len(list((out / "parts").glob("batch-*.done")))


def tables(out: Path) -> dict[str, pd.DataFrame]:
    return {p.stem: pd.read_parquet(p) for p in sorted(out.glob("*.parquet"))}


def numbers(out: Path) -> dict:
    summary = json.loads((out / "summary.json").read_text())
    summary.pop("provenance")  # seconds and the command line differ between runs
    return summary


@pytest.fixture(scope="module")
def passkey_model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llama-passkey")
    tiny_model("llama").save_pretrained(path)
    passkey_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "t.txt"
    path.write_text(TEXT, encoding="utf-8")
    return path


def command(name: str, model_dir: Path, text_file: Path, prompts: Path) -> tuple[list[str], list[str], int]:
    """(arguments, the columns naming one row, number of batches) of each command under test."""
    if name == "ablate":
        return (["ablate", "--model", str(model_dir), "--text", str(text_file), "--window", "16",
                 "--max-windows", "3", "--batch-size", "1", "--bos", "add", "--bos", "strip"],
                ["condition", "window", "bucket"], 6)
    if name == "knockout":  # all heads, 3 layers and their 4 heads, then the random-key control: all, each layer
        return (["knockout", "--model", str(model_dir), "--text", str(text_file), "--window", "12",
                 "--max-windows", "2"], ["scope", "target", "layer", "head"], 1 + 3 * (1 + 4) + (1 + 3))
    if name == "passkey":
        return (["passkey", "--model", str(model_dir), "--length", "120", "--depth", "0.5", "--trials", "2",
                 "--bos", "add", "--bos", "strip", "--max-new-tokens", "2"], ["bos", "length", "depth", "trial"], 4)
    return (["scan", "--model", str(model_dir), "--prompts", str(prompts), "--bos", "add", "--batch-size", "1"],
            ["prompt", "layer", "head"], len(SENTENCES))


@pytest.mark.parametrize(("name", "kills"), [
    ("ablate", [1, 2]), ("knockout", [2, 7]), ("passkey", [2]), ("scan", [0])])
def test_kill_9_then_resume_equals_an_uninterrupted_run(tmp_path, model_dir, passkey_model_dir, text_file,
                                                        prompt_file, name, kills):
    """``kills``: batches each process writes before it is killed (a second kill hits a resumed run)."""
    args, key, n_batches = command(name, passkey_model_dir if name == "passkey" else model_dir, text_file,
                                   prompt_file)
    whole = tmp_path / "whole"
    assert invoke(*args, "--out", str(whole), "--quiet").exit_code == 0
    out = tmp_path / "killed"
    for index, batches in enumerate(kills):
        killed_at([*args, "--out", str(out), *(["--resume"] if index else [])], batches)
        assert markers(out) == sum(kills[:index + 1]) and not (out / "summary.json").exists()
    resumed = invoke(*args, "--out", str(out), "--resume", "--quiet")
    assert resumed.exit_code == 0, resumed.output
    assert markers(out) == n_batches
    expected, got = tables(whole), tables(out)
    assert list(got) == list(expected)
    for table, frame in expected.items():
        if name == "passkey":  # wall-clock seconds per prompt are the one column that may differ
            frame, got[table] = (frame.drop(columns="seconds", errors="ignore"),
                                 got[table].drop(columns="seconds", errors="ignore"))
        pd.testing.assert_frame_equal(got[table], frame, check_exact=True)
    main = got[next(iter(got))]
    assert not main.duplicated(key).any()
    assert numbers(out) == numbers(whole)


def test_ablate_twice_on_cpu_gives_identical_numbers():
    runs = [ss.ablate(ss.load(tiny_model("llama"), tokenizer=word_tokenizer()), TEXT, window=20, max_windows=2,
                      per_token=True, progress=False) for _ in range(2)]
    for table in ("ablate", "tokens"):
        pd.testing.assert_frame_equal(runs[0].to_frame(table), runs[1].to_frame(table), check_exact=True)
    first, second = ({k: v for k, v in r.summary.items() if k != "provenance"} for r in runs)
    assert first == second


def test_scan_twice_on_cpu_gives_identical_numbers():
    runs = [ss.scan(ss.load(tiny_model("gemma3_text"), tokenizer=word_tokenizer()), SENTENCES, batch_size=4,
                    progress=False) for _ in range(2)]
    np.testing.assert_array_equal(runs[0].alpha, runs[1].alpha)
    pd.testing.assert_frame_equal(runs[0].to_frame("per_layer"), runs[1].to_frame("per_layer"), check_exact=True)

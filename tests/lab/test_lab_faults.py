"""`sinkscope train` and `sweep` under faults: real `kill -9` at chosen points, then the same command with
`--resume` gives what an uninterrupted run gives (weights, optimizer state, every table: no lost or
duplicated rows); the same command twice gives the same numbers; bad input is one line and exit code 2.

Kills land at points named through ``SINKSCOPE_TEST_STALL`` (`sinkscope.faults`): the
process says it has reached the point and blocks; the test reads that line, then kills. No timing anywhere.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from helpers import run_to_end, stalled
from sinkscope.cli import app
from sinkscope.faults import STALL_ENV
from sinkscope.lab.train import LabRunError, train

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
ENV.pop(STALL_ENV, None)

# 8 updates; evaluation every 2, checkpoints at 3 and 6 (and at the end)
TINY = {
    "name": "tiny", "seed": 5, "context_length": 16, "tokens_per_step": 128, "steps": 8,
    "data": {"vocab": 16, "triggers": 2, "doc_min": 6, "doc_max": 24},
    "model": {"hidden_size": 16, "layers": 2, "heads": 2},
    "optimizer": {"lr": 1e-2, "warmup_steps": 2},
    "tracking": {"every": 2, "probe_count": 3, "probe_length": 8, "checkpoint_every": 3, "validation_windows": 2},
}
SWEEP = {"base": {k: v for k, v in TINY.items() if k != "name"} | {"steps": 4},
         "grids": [{"group": "g", "model.attention": ["softmax", "off_by_one", "sigmoid"]}]}
LOGS = ("log.jsonl", "eval.jsonl", "sinks.jsonl")


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "sinkscope.cli", *args]


def kill_at(point: str, command: list[str]) -> None:
    with stalled(command, ENV, point) as process:
        pass
    assert process.returncode == -signal.SIGKILL


def run_ok(command: list[str]) -> subprocess.CompletedProcess:
    finished = run_to_end(command, ENV, timeout=900)
    assert finished.returncode == 0, finished.stderr[-3000:]
    return finished


def rows(out: Path, name: str) -> list[dict]:
    """A log's rows without the wall-clock throughput (the one thing that may differ between runs)."""
    return [{k: v for k, v in json.loads(line).items() if k != "tokens_per_s"}
            for line in (out / name).read_text().splitlines()]


def assert_same_run(a: Path, b: Path) -> None:
    for name in ("model.safetensors", "optimizer.safetensors"):
        left, right = load_file(str(a / "checkpoint" / name)), load_file(str(b / "checkpoint" / name))
        assert left.keys() == right.keys(), name
        for key in left:
            assert torch.equal(left[key], right[key]), f"{name}: {key}"
    for name in LOGS:
        assert rows(a, name) == rows(b, name), name
    assert json.loads((a / "checkpoint/trainer_state.json").read_text()) == \
        json.loads((b / "checkpoint/trainer_state.json").read_text())
    pd.testing.assert_frame_equal(pd.read_csv(a / "sinks.csv"), pd.read_csv(b / "sinks.csv"))


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[Path, Path]:
    """(config file, an uninterrupted `sinkscope train` of it)."""
    root = tmp_path_factory.mktemp("reference")
    config = root / "tiny.json"
    config.write_text(json.dumps(TINY))
    run_ok(cli("train", str(config), "--out", str(root / "whole"), "--quiet"))
    return config, root / "whole"


def test_the_same_train_command_twice_gives_identical_numbers(reference, tmp_path):
    config, whole = reference
    run_ok(cli("train", str(config), "--out", str(tmp_path / "again"), "--quiet"))  # the same command again
    assert_same_run(whole, tmp_path / "again")


def test_resume_where_there_is_nothing_to_resume_starts_the_run(reference, tmp_path):
    """A retry loop's first attempt (or a kill before the run's first write) has nothing to continue: the
    run starts, and equals the run the plain command trains."""
    config, whole = reference
    (tmp_path / "empty").mkdir()
    run_ok(cli("train", str(config), "--out", str(tmp_path / "empty"), "--resume", "--quiet"))
    assert_same_run(whole, tmp_path / "empty")


@pytest.mark.slow
@pytest.mark.parametrize("point", [
    "step 0",  # after the first evaluation, before any update or checkpoint
    "step 4",  # between checkpoints: logged rows 4 are past the checkpoint of 3
    "step 6",  # just after the checkpoint of 6
    "checkpoint 6",  # between the two renames that swap in the checkpoint of 6
    "step 8",  # the last update logged and evaluated, the final checkpoint not yet written
])
def test_train_killed_then_resumed_matches_an_uninterrupted_run(reference, tmp_path, point):
    config, whole = reference
    out = tmp_path / "killed"
    kill_at(point, cli("train", str(config), "--out", str(out), "--quiet"))
    run_ok(cli("train", str(config), "--out", str(out), "--resume", "--quiet"))
    assert_same_run(whole, out)
    assert not any(p.name.startswith(".checkpoint") for p in out.iterdir())  # no staging or old copy left


@pytest.fixture(scope="module")
def reference_sweep(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("reference-sweep")
    config = root / "sweep.json"
    config.write_text(json.dumps(SWEEP))
    run_ok(cli("sweep", str(config), "--out", str(root / "whole"), "--jobs", "1", "--quiet"))
    return config, root / "whole"


@pytest.mark.slow
@pytest.mark.parametrize(("point", "jobs"), [
    ("step 2", "1"),  # inside the first run (a worker process), between checkpoints
    ("run 1", "1"),  # one run finished and the outputs written; the next one started in its worker
    ("run 2", "2"),  # two workers: the third run somewhere in its training when the kill lands
])
def test_sweep_killed_then_resumed_matches_an_uninterrupted_sweep(reference_sweep, tmp_path, point, jobs):
    config, whole = reference_sweep
    out = tmp_path / "killed"
    kill_at(point, cli("sweep", str(config), "--out", str(out), "--jobs", jobs, "--quiet"))
    run_ok(cli("sweep", str(config), "--out", str(out), "--resume", "--jobs", jobs, "--quiet"))
    pd.testing.assert_frame_equal(pd.read_csv(whole / "summary.csv"), pd.read_csv(out / "summary.csv"))
    pd.testing.assert_frame_equal(pd.read_parquet(whole / "sinks.parquet"), pd.read_parquet(out / "sinks.parquet"))
    runs = sorted(p.name for p in whole.iterdir() if p.is_dir())
    assert runs == sorted(p.name for p in out.iterdir() if p.is_dir()) and len(runs) == 3
    for name in runs:
        assert_same_run(whole / name, out / name)


def _error(result) -> str:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    return lines[0]


@pytest.mark.parametrize(("args", "says"), [
    (["train", "no-such-preset"], "no such preset"),
    (["sweep", "no-such-preset"], "no such preset"),
    (["train", "tiny", "--set", "steps=0"], "steps must be >= 1"),
    (["train", "tiny", "--set", "model.heads=3"], "not divisible by heads"),
    (["train", "tiny", "--set", "optimizer.lr=fast"], "'lr' must be float"),
    (["train", "tiny", "--set", "nonsense=1"], "unknown setting"),
    (["train", "tiny", "--set", "steps"], "--set expects key=value"),
    (["sweep", "cpu-demo", "--jobs", "0"], "--jobs and --threads must be >= 1"),
    (["sweep", "cpu-demo", "--threads", "0"], "--jobs and --threads must be >= 1"),
    (["sweep", "cpu-demo", "--only", "nothing"], "no run or group"),
])
def test_bad_settings_are_one_line_and_exit_2(args, says, tmp_path):
    result = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "out"), "--quiet"])
    assert says in _error(result)
    assert not (tmp_path / "out").exists()  # nothing written for a command that cannot start


@pytest.mark.parametrize("command", ["train", "sweep"])
def test_bad_run_directories_are_one_line_and_exit_2(command, tmp_path):
    config = tmp_path / "config.json"
    config.write_text(json.dumps(TINY if command == "train" else SWEEP))
    runner = CliRunner()
    a_file = tmp_path / "a-file"
    a_file.write_text("not a directory")
    assert "is a file" in _error(runner.invoke(app, [command, str(config), "--out", str(a_file), "--quiet"]))
    unwritable = _error(runner.invoke(app, [command, str(config), "--out", str(a_file / "run"), "--quiet"]))
    assert "cannot create" in unwritable and "--out" in unwritable
    assert a_file.read_text() == "not a directory"


@pytest.mark.slow
def test_a_run_being_trained_is_locked_against_a_second_process(reference, tmp_path):
    """A `--resume` while the first process still trains is refused (their writes would interleave); once
    that process is killed the lock is gone with it and the resume finishes the run exactly."""
    config, whole = reference
    out = tmp_path / "busy"
    with stalled(cli("train", str(config), "--out", str(out), "--quiet"), ENV, "step 4"):
        with pytest.raises(LabRunError, match="being trained by another process"):
            train(json.loads(config.read_text()), out, resume=True, progress=False)
        assert rows(out, "log.jsonl")[-1]["step"] == 4  # the refused resume truncated nothing
    run_ok(cli("train", str(config), "--out", str(out), "--resume", "--quiet"))
    assert_same_run(whole, out)


def test_sweep_tables_only_needs_a_sweep(tmp_path):
    config = tmp_path / "sweep.json"
    config.write_text(json.dumps(SWEEP))
    result = CliRunner().invoke(app, ["sweep", str(config), "--out", str(tmp_path / "none"), "--tables-only"])
    assert "holds no sweep" in _error(result)

"""Several processes (torchrun, gloo on CPU) give the single-process result row for row, and resume per shard
after a kill."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pandas as pd
import pytest

from helpers import SENTENCES, run_to_end, stalled

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="process groups tested on Linux")


def _env(**extra: str) -> dict[str, str]:
    src = str(Path(__file__).resolve().parents[2] / "src")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(PYTHONPATH=src + os.pathsep + env.get("PYTHONPATH", ""), OMP_NUM_THREADS="1", **extra)
    return env


def _command(processes: int, *args: str) -> list[str]:
    if processes == 1:
        return [sys.executable, "-m", "sinkscope.cli", *args]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
            "-m", "sinkscope.cli", *args]


def _scan_args(model_dir: Path, prompts: Path, out: Path) -> list[str]:
    return ["scan", "--model", str(model_dir), "--prompts", str(prompts), "--bos", "add", "--batch-size", "2",
            "--out", str(out), "--quiet"]


@pytest.fixture(scope="module")
def prompts(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("distributed") / "prompts.txt"
    path.write_text("\n".join(SENTENCES * 2) + "\n")  # enough batches for both processes
    return path


@pytest.fixture(scope="module")
def reference(model_dir, prompts, tmp_path_factory) -> Path:
    """The single-process run both tests compare with."""
    out = tmp_path_factory.mktemp("distributed") / "one"
    done = run_to_end(_command(1, *_scan_args(model_dir, prompts, out)), _env())
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def _tables(out: Path) -> tuple[pd.DataFrame, dict]:
    summary = json.loads((out / "summary.json").read_text())
    for key in ("provenance",):
        summary.pop(key)
    return pd.read_parquet(out / "alpha.parquet"), summary


def test_two_processes_give_the_single_process_result(model_dir, prompts, reference, tmp_path):
    one, two = reference, tmp_path / "two"
    done = run_to_end(_command(2, *_scan_args(model_dir, prompts, two)), _env())
    assert done.returncode == 0, done.stderr[-3000:]
    (alpha_one, summary_one), (alpha_two, summary_two) = _tables(one), _tables(two)
    pd.testing.assert_frame_equal(alpha_one, alpha_two)
    assert summary_one == summary_two
    assert json.loads((two / "summary.json").read_text())["provenance"]["processes"] == 2
    # both processes wrote their own batches
    assert len(list((two / "parts").glob("batch-*.done"))) == len(list((one / "parts").glob("batch-*.done"))) > 2


def test_a_killed_two_process_run_resumes_per_shard(model_dir, prompts, reference, tmp_path):
    out = tmp_path / "killed"
    # every process stops for ever after writing one batch; then the launcher and both workers are killed
    with stalled(_command(2, *_scan_args(model_dir, prompts, out)), _env(), "batches 1", processes=2) as launch:
        assert len(launch.stalled_pids) == 2
    assert len(list((out / "parts").glob("batch-*.done"))) == 2  # one finished batch per shard
    done = run_to_end(_command(2, *_scan_args(model_dir, prompts, out), "--resume"), _env())
    assert done.returncode == 0, done.stderr[-3000:]
    (alpha_ref, summary_ref), (alpha_out, summary_out) = _tables(reference), _tables(out)
    pd.testing.assert_frame_equal(alpha_ref, alpha_out)
    assert summary_ref == summary_out

"""Atomic writes: a full or failing file system is one clear error, and leaves no half-written file."""

import errno
import os

import pandas as pd
import pytest

from sinkscope import rundir
from sinkscope.errors import InputError


def test_full_disk_is_an_input_error_and_keeps_the_old_file(tmp_path, monkeypatch):
    target = tmp_path / "table.parquet"
    rundir.write_table(target, pd.DataFrame({"a": [1]}))

    def full(*_args, **_kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(rundir.os, "replace", full)
    with pytest.raises(InputError, match="cannot write .*table.parquet: No space left on device"):
        rundir.write_table(target, pd.DataFrame({"a": [2]}))
    monkeypatch.undo()
    assert pd.read_parquet(target)["a"].tolist() == [1]  # the earlier result is kept
    assert sorted(p.name for p in tmp_path.iterdir()) == ["table.parquet"]  # no temporary left behind


def test_a_failing_writer_leaves_nothing(tmp_path):
    target = tmp_path / "figure.png"
    with pytest.raises(RuntimeError), rundir.atomic_path(target) as temp:
        open(temp, "wb").write(b"half")
        raise RuntimeError("writer failed")
    assert list(tmp_path.iterdir()) == []

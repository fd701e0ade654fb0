"""The test helpers that start and kill processes: they must not depend on how the processes' output lands."""

import os
import sys

import psutil

from helpers import stalled

# two processes that share one stderr pipe can run their stall lines together (one process's message before the
# other's newline); this launcher says both stalls on one line, for two children of its own that wait for ever
RUN_TOGETHER = """
import subprocess, sys, time
children = [subprocess.Popen([sys.executable, "-c", "import time; time.sleep(3600)"]) for _ in range(2)]
sys.stderr.write("".join(f"sinkscope: stalled at batches 1 (TEST; pid {c.pid})" for c in children) + "\\n")
sys.stderr.flush()
time.sleep(3600)
"""


def test_stalls_said_on_one_line_are_all_counted_and_every_process_is_killed():
    with stalled([sys.executable, "-c", RUN_TOGETHER], dict(os.environ), "batches 1", processes=2,
                 timeout=120) as launch:
        pids = launch.stalled_pids
        assert len(set(pids)) == 2
        assert all(psutil.pid_exists(pid) for pid in pids)
    assert launch.poll() is not None
    gone = [not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE for pid in pids]
    assert all(gone)

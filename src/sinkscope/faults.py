"""Fault injection for tests, so a kill lands at a chosen point without any timing.

With ``SINKSCOPE_TEST_STALL=<point>`` in the environment, the process that reaches that point says so on
stderr (``sinkscope: stalled at <point> (...; pid N)``) and blocks for ever; the test waits for the line, kills
the process (SIGKILL) and resumes. Points: ``batches N`` (an experiment writing to ``--out`` has written N batch
markers; ``batches 0``: before its first batch), ``step N`` (a training run has logged, tracked and, if due,
checkpointed update N; ``step 0``: after the first evaluation), ``checkpoint N`` (in the middle of swapping in
the checkpoint of step N), ``run N`` (a sweep, once N of its runs have finished). Unset, as always outside tests,
`stall_at` does nothing.
"""

from __future__ import annotations

import os
import sys
import threading

STALL_ENV = "SINKSCOPE_TEST_STALL"


def stall_at(point: str) -> None:
    """Block for ever (saying so on stderr) when the environment names ``point``; otherwise return at once."""
    if os.environ.get(STALL_ENV, "").strip() != point:
        return
    # one write of the whole line: processes sharing a stderr pipe (torchrun's workers) must not interleave
    # a message with another's newline, which print's two writes allow
    sys.stderr.flush()
    os.write(sys.stderr.fileno(), f"sinkscope: stalled at {point} ({STALL_ENV}; pid {os.getpid()})\n".encode())
    threading.Event().wait()

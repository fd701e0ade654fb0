"""Time of a `sinkscope kv --grid` run on one model, against its budget.

Budgets (2 CPU cores): the ``docs`` grid (the docs' tables: 2048-token prefills, 16 windows, 40 retrieval
prompts, 25 caches) <= 60 minutes per bundled model; ``quick`` <= 5 minutes. The run goes into ``--out`` with
``--resume``: where it continues an interrupted run, the wall time covers only this invocation, and the
measuring time (summed from the seconds each cache's batch recorded, whichever invocation measured it) the
whole grid; model loading and prompt building are in the wall time only.

    python benchmarks/kv_grid.py --model smollm2-135m --grid docs --out runs/kv-docs-smollm2-135m
    python benchmarks/record.py --as kv_grid-smollm2-135m kv_grid --model smollm2-135m --grid docs \\
        --out runs/kv-docs-smollm2-135m

The machine's load is printed beside the numbers: on a shared machine wall-clock seconds overstate the cost,
so the process's CPU seconds are shown too.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

from sinkscope.rundir import RunDir

BUDGETS = {"quick": 5 * 60, "docs": 60 * 60, "long": None}


def done_batches(out: Path) -> int:
    return len(list((out / "parts").glob("batch-*.done"))) if (out / "parts").is_dir() else 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="gemma3-270m")
    parser.add_argument("--grid", default="docs", choices=sorted(BUDGETS))
    parser.add_argument("--out", type=Path, help="run directory (default runs/kv-<grid>-<model>)")
    args = parser.parse_args()
    out = args.out or Path(f"runs/kv-{args.grid}-{args.model}")
    before = done_batches(out)
    load = os.getloadavg()[0]
    command = [sys.executable, "-m", "sinkscope.cli", "kv", "--model", args.model, "--grid", args.grid,
               "--out", str(out), "--resume", "--quiet"]
    started = time.time()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    wall = time.time() - started
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = usage.ru_utime + usage.ru_stime
    summary = json.loads((out / "summary.json").read_text())
    total = done_batches(out)
    seconds = RunDir(out).batch_seconds()
    measured = sum(s for s in seconds.values() if s is not None)
    unknown = sum(s is None for s in seconds.values())
    print(f"kv --grid {args.grid} on {args.model}: {total} caches, {summary['n_windows']} windows of "
          f"{summary['context']} prefilled tokens, {summary['n_retrieval_prompts']} retrieval prompts of "
          f"{summary['retrieval_length']} tokens")
    budget = BUDGETS[args.grid]
    ratio = f"   budget {budget} s   ratio {wall / budget:.2f}" if budget else ""
    print(f"{'wall seconds':<14}{wall:>10.1f}{ratio}")
    ratio = f"   budget {budget} s   ratio {measured / budget:.2f}" if budget else ""
    print(f"{'measuring':<14}{measured:>10.1f}{ratio}   (every cache, summed over resumes)"
          + (f"; {unknown} caches without a recorded time" if unknown else ""))
    print(f"{'CPU seconds':<14}{cpu:>10.1f}   / 2 cores = {cpu / 2:.1f} s")
    print(f"load average {load:.1f} at the start, {os.getloadavg()[0]:.1f} at the end, on {os.cpu_count()} cores")
    if before:
        print(f"note: resumed: {before} of {total} caches were measured before this run; the time covers the rest")


if __name__ == "__main__":
    main()

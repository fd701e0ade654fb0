"""Time budget of `sinkscope paper`: each section's seconds, and the total against its budget.

Budgets (2 CPU cores): ``--quick`` on Gemma-3-270M <= 5 minutes; the full plan on both bundled models with
``--lab RUN_DIR`` (the lab excluded) <= 45 minutes; both from nothing (the cpu-paper sweep included) <= 55
minutes. The full plan runs every with/without-<bos> claim, the dose-response (add+scale:λ, zero-value) and
the band knock-outs with their random-key controls on at least 10 units each.

    python benchmarks/paper_budget.py --quick                       # runs the quick plan into runs/budget-quick
    python benchmarks/paper_budget.py --both --lab runs/lab/cpu-paper  # both models, the sweep reused
    python benchmarks/paper_budget.py --from runs/demo               # reads a finished run's paper.json

The machine's load is printed beside the numbers: on a shared machine wall-clock seconds overstate the
cost, so the process's CPU seconds are shown too (they are what the budget assumes two cores deliver).
A run that reused cached sections is reported as such (its time is not the budget's).
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

BUDGETS = {"quick": 5 * 60, "both-with-lab": 45 * 60, "both-from-nothing": 55 * 60}


def run_plan(args: argparse.Namespace) -> tuple[Path, str, float, float]:
    """Run `sinkscope paper` as a child process; (out, budget name, wall seconds, CPU seconds)."""
    models = ["gemma3-270m", "smollm2-135m"] if args.both else ["gemma3-270m"]
    budget = "quick" if args.quick else ("both-with-lab" if args.lab else "both-from-nothing")
    out = Path(args.out or f"runs/budget-{budget}")
    command = [sys.executable, "-m", "sinkscope.cli", "paper", "--out", str(out), "--quiet"]
    for model in models:
        command += ["--model", model]
    if args.quick:
        command.append("--quick")
    if args.lab:
        command += ["--lab", str(args.lab)]
    started = time.time()
    subprocess.run(command, check=True)
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return out, budget, time.time() - started, usage.ru_utime + usage.ru_stime


def report(out: Path, budget: str, wall: float | None, cpu: float | None) -> None:
    manifest = json.loads((out / "paper.json").read_text())
    statuses = [o["status"] for m in manifest["models"] for o in m["experiments"].values()]
    print(f"plan {manifest['plan']['name']}, models {', '.join(m['name'] for m in manifest['models'])}")
    print(f"{'section':<14}{'seconds':>10}")
    for section, seconds in manifest["section_seconds"].items():
        print(f"{section:<14}{seconds:>10.1f}")
    # a finished run read back: the sum of what each section took when it was measured (reused sections count
    # with their own recorded time, not the seconds spent reading them back)
    total = wall if wall is not None else sum(manifest["section_seconds"].values())
    limit = BUDGETS[budget]
    print(f"{'total (wall)':<14}{total:>10.1f}   budget {budget} {limit} s   ratio {total / limit:.2f}")
    if budget != "quick":  # the lab is budgeted apart: the plan's own sections against 45 minutes
        sections = manifest["section_seconds"]
        plan_only = sum(v for k, v in sections.items() if k != "fig5")
        if wall is not None:
            plan_only = wall - sections.get("fig5", 0.0)
        limit_plan = BUDGETS["both-with-lab"]
        print(f"{'without lab':<14}{plan_only:>10.1f}   budget both-with-lab {limit_plan} s   ratio "
              f"{plan_only / limit_plan:.2f}")
    if cpu is not None:
        print(f"{'CPU seconds':<14}{cpu:>10.1f}   / 2 cores = {cpu / 2:.1f} s   ratio {cpu / 2 / limit:.2f}")
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    reused = sum(s == "reused" for s in statuses)
    if reused:
        print(f"note: {reused} of {len(statuses)} experiments were reused from the cache")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="the quick plan on Gemma-3-270M")
    parser.add_argument("--both", action="store_true", help="both bundled models")
    parser.add_argument("--lab", type=Path, help="a finished sweep directory to reuse")
    parser.add_argument("--out", help="run directory (default runs/budget-<budget>)")
    parser.add_argument("--from", dest="source", type=Path, help="read a finished run instead of running one")
    parser.add_argument("--budget", choices=sorted(BUDGETS), help="budget to compare a --from run against")
    args = parser.parse_args()
    if args.source is not None:
        manifest = json.loads((args.source / "paper.json").read_text())
        guess = "quick" if manifest["plan"]["name"] == "quick" else (
            "both-with-lab" if manifest["lab"]["status"] == "given" else "both-from-nothing")
        report(args.source, args.budget or guess, None, None)
        return
    out, budget, wall, cpu = run_plan(args)
    report(out, budget, wall, cpu)


if __name__ == "__main__":
    main()

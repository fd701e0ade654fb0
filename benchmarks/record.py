"""Run a benchmark script and record what it printed for the docs: ``docs/generated/bench-<name>.md`` holds the
command, the machine's load when it started and the script's output verbatim (so the numbers in the docs
are the ones a command wrote).

    python benchmarks/record.py train_throughput --contexts 64,256
    python benchmarks/record.py --as paper_budget-full paper_budget --from runs/paper   # another page name
"""

from __future__ import annotations

import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> None:
    page = None
    if len(sys.argv) > 2 and sys.argv[1] == "--as":  # record under another page name (bench-<page>.md)
        page = sys.argv[2]
        del sys.argv[1:3]
        if not page.replace("-", "").replace("_", "").isalnum():
            raise SystemExit("--as: letters, digits, '-' and '_' only (the page stays in docs/generated)")
    if len(sys.argv) < 2 or not (HERE / f"{sys.argv[1]}.py").is_file():
        scripts = ", ".join(sorted(p.stem for p in HERE.glob("*.py") if p.stem != "record"))
        raise SystemExit(f"usage: record.py SCRIPT [ARGS...]; SCRIPT is one of {scripts}")
    name, args = sys.argv[1], sys.argv[2:]
    command = [sys.executable, str(HERE / f"{name}.py"), *args]
    load = os.getloadavg()[0]
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "COLUMNS": "160"})
    sys.stdout.write(done.stdout)
    if done.returncode != 0:
        sys.stderr.write(done.stderr)
        raise SystemExit(f"{name} failed (exit {done.returncode}); nothing recorded")
    shown = shlex.join(["python", f"benchmarks/{name}.py", *args])
    target = HERE.parent / "docs" / "generated" / f"bench-{page or name}.md"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(f"`{shown}` on {platform.machine()}, {os.cpu_count()} CPUs, load average {load:.2f} when "
                      f"it started:\n\n```text\n{done.stdout.strip()}\n```\n")
    print(f"recorded in {target.relative_to(HERE.parent)}")


if __name__ == "__main__":
    main()

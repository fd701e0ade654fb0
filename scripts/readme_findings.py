"""Put a generated findings table into README.md, between its ``<!-- findings:start -->`` and
``<!-- findings:end -->`` markers (what `make findings` runs after `sinkscope paper --findings-md`).

    python scripts/readme_findings.py docs/generated/findings.md README.md
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

START, END = "<!-- findings:start -->", "<!-- findings:end -->"


def splice(readme: str, findings: str) -> str:
    pattern = re.compile(re.escape(START) + r".*?" + re.escape(END), re.S)
    if not pattern.search(readme):
        raise SystemExit(f"README has no {START} ... {END} block")
    # the snippet's own links are relative to docs/generated/: make them relative to the repository root
    findings = findings.replace("](../", "](docs/")
    return pattern.sub(lambda _: f"{START}\n{findings.strip()}\n{END}", readme)


def main() -> None:
    if len(sys.argv) != 3:
        raise SystemExit(__doc__)
    findings, readme = Path(sys.argv[1]), Path(sys.argv[2])
    readme.write_text(splice(readme.read_text(), findings.read_text()))
    print(f"{readme}: findings block updated from {findings}")


if __name__ == "__main__":
    main()

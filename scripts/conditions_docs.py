"""Write docs/generated/conditions-<model>.md from a `sinkscope scan` run over several conditions.

    python scripts/conditions_docs.py RUN_DIR [RUN_DIR ...]

RUN_DIR is the --out of ``sinkscope scan --condition A --condition B ...`` (one sub-directory per
condition). The page lists, per condition, where the sink is: Gu's α and the sink rate at position 0 and at
the first text token, read from each run's ``whereabouts`` summary, and names the command that made them.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from sinkscope.experiments.base import Result

GENERATED = Path(__file__).resolve().parent.parent / "docs" / "generated"


def page(results: list[Result]) -> str:
    first = results[0]
    model = first.summary["model"]
    lines = [
        f"**{model}**, {first.summary['n_prompts']} probe prompts of at most {first.summary['max_tokens']} tokens. "
        "α: Gu et al.'s mean attention on the key over the queries that can see it (query 0 of that key "
        "included), averaged over prompts, layers and heads; sink rate: the share of (prompt, layer, head) with "
        "α > 0.3. \"First text token\" is position 1 after a prefix, position 0 without one.",
        "",
        "| condition | α on position 0 | α on the first text token | sink rate at position 0 | "
        "sink rate at the first text token |",
        "|---|---|---|---|---|",
    ]
    for result in results:
        for condition, where in result.summary["whereabouts"].items():
            lines.append(f"| `{condition}` | {where['alpha_first']:.3f} | {where['alpha_first_text']:.3f} | "
                         f"{where['sink_rate_first']['0.3']:.3f} | {where['sink_rate_first_text']['0.3']:.3f} |")
    version = first.provenance["versions"]["sinkscope"]
    lines += ["", f"Made by `{first.provenance.get('command', '?')}` (sinkscope {version})."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", type=Path)
    args = parser.parse_args()
    for run in args.runs:
        directories = sorted(p for p in run.iterdir() if (p / "summary.json").is_file())
        results = [Result.load(d) for d in directories] or [Result.load(run)]
        order = results[0].summary.get("provenance", {}).get("command", "")
        results.sort(key=lambda r: order.find(f" {r.summary['bos']} ") if f" {r.summary['bos']} " in order
                     else len(order))
        path = GENERATED / f"conditions-{results[0].summary['model']}.md"
        path.write_text(page(results), encoding="utf-8")
        print(f"wrote {path}")


if __name__ == "__main__":
    main()

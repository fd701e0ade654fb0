"""The whole context in linear memory: one scan of the longest input a bundled model allows, per query position.

Runs ``sinkscope scan --per-position`` on one long real text (Shakespeare's plays, concatenated) at the
model's context length (Gemma-3-270M: 32768 tokens) in this process, and records the wall time, the peak
RSS and the RSS the model alone holds (measured before the scan), so "within 24 GB" is a measured number.
Writes the run to ``--out`` (tables, ``first_token_by_position.png``) and a markdown table to ``--markdown``
(the docs include it).

    .venv/bin/python benchmarks/long_context.py --model gemma3-270m --out runs/long-g3 \\
        --markdown docs/generated/long-context-gemma3-270m.md
"""

from __future__ import annotations

import argparse
import re
import shutil
import sys
import time
from pathlib import Path

GIB = 1024**3


def _rss(field: str) -> int:
    match = re.search(rf"{field}:\s+(\d+) kB", Path("/proc/self/status").read_text())
    return int(match.group(1)) * 1024 if match else 0


def _long_text(characters: int) -> str:
    from sinkscope.data.texts import shakespeare_text, shakespeare_works

    text = ""
    for work in shakespeare_works():
        text += shakespeare_text(work).text + "\n\n"
        if len(text) >= characters:
            break
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gemma3-270m")
    parser.add_argument("--tokens", type=int, default=None, help="default: the model's context length")
    parser.add_argument("--out", type=Path, default=Path("runs/long-context"))
    parser.add_argument("--markdown", type=Path, default=None)
    parser.add_argument("--replot", action="store_true", help="only redraw the figure of the run in --out")
    args = parser.parse_args()
    if args.replot:
        replot(args)
        return

    import sinkscope as ss
    from sinkscope.data import Prompt
    from sinkscope.experiments.inputs import context_limit

    lm = ss.load(args.model)
    tokens = args.tokens or context_limit(lm)
    if tokens is None:
        sys.exit("the model declares no context length: pass --tokens")
    model_rss = _rss("VmRSS")
    if args.out.exists():
        shutil.rmtree(args.out)
    started = time.perf_counter()
    result = ss.scan(lm, [Prompt("shakespeare", _long_text(12 * tokens), "literature")], bos="add",
                     max_tokens=tokens, per_position=True, batch_size=1, out=args.out)
    seconds = time.perf_counter() - started
    peak = _rss("VmHWM")
    positions = result.tables["positions"]
    by_type = positions.groupby("layer_type", observed=True)["attention"]
    n = int(result.frame["n_tokens"].iloc[0])
    lines = [
        f"`benchmarks/long_context.py --model {args.model}`: one input of **{n} tokens** (Shakespeare, `<bos>` "
        "added), first-token attention of every query position, on this machine's CPU:",
        "",
        "| tokens | wall time | peak RSS | of which the model | sink rate ε=0.3 | mean α (sliding / full layers) |",
        "|---|---|---|---|---|---|",
        f"| {n} | {seconds / 60:.1f} min | {peak / GIB:.2f} GiB | {model_rss / GIB:.2f} GiB | "
        f"{result.sink_rate(0.3):.3f} | "
        + " / ".join(f"{by_type.get_group(kind).mean():.3f}" for kind in ("sliding_attention", "full_attention")
                     if kind in by_type.groups)
        + " |",
        "",
        f"Rows in `positions.parquet`: {len(positions):,} (layer × head × query position).",
        "",
    ]
    print("\n".join(lines))
    if args.markdown is not None:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text("\n".join(lines))
        image = args.markdown.parent / f"long-context-{args.model}.png"
        shutil.copyfile(args.out / "first_token_by_position.png", image)


def replot(args: argparse.Namespace) -> None:
    """Redraw the figure from the saved run (the positions table), without measuring again."""
    from sinkscope.experiments.base import Result
    from sinkscope.report.figures import save_figure

    figure = Result.load(args.out).figures()["first_token_by_position"]
    save_figure(figure, args.out / "first_token_by_position.png")
    if args.markdown is not None:
        shutil.copyfile(args.out / "first_token_by_position.png", args.markdown.parent /
                        f"long-context-{args.model}.png")


if __name__ == "__main__":
    main()

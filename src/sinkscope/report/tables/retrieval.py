"""Terminal tables of the long-context retrieval experiments (RULER-style accuracy per task x length)."""

from __future__ import annotations

from typing import Any

from rich.table import Table

from . import table_for_experiment


def _cell(mean: float, low: float, high: float) -> str:
    return f"{mean:.2f} [{low:.2f}, {high:.2f}]"


@table_for_experiment("ruler")
def ruler_tables(result: Any) -> list[Any]:
    """Score per task x length, each condition side by side with its 95% bootstrap interval over trials, and
    the first condition minus the next (paired by trial)."""
    accuracy = result.tables["accuracy"]
    difference = result.tables.get("difference")
    conditions = list(dict.fromkeys(accuracy["bos"]))
    summary = result.summary
    table = Table(title=f"RULER-style tasks, {summary.get('model')}: score [95% CI over {summary.get('trials')} "
                        "trials]", title_justify="left")
    table.add_column("task", overflow="fold")
    table.add_column("length", justify="right", min_width=6)
    for bos in conditions:
        table.add_column(f"bos={bos}", justify="right")
    other = None
    if difference is not None and len(difference):
        other = difference["other"].iloc[0]
        table.add_column(f"{conditions[0]} - {other}", justify="right")
    by_cell = {(r.task, r.length, r.bos): r for r in accuracy.itertuples()}
    diffs = {} if other is None else {(r.task, r.length): r for r in difference.itertuples() if r.other == other}
    previous = None
    for task, length in dict.fromkeys(zip(accuracy["task"], accuracy["length"], strict=True)):
        if previous is not None and task != previous:
            table.add_section()
        previous = task
        cells = [task, str(length)]
        for bos in conditions:
            r = by_cell.get((task, length, bos))
            cells.append("" if r is None else _cell(r.accuracy, r.low, r.high))
        if other is not None:
            d = diffs.get((task, length))
            cells.append("" if d is None else f"{d.difference:+.2f} [{d.low:+.2f}, {d.high:+.2f}]")
        table.add_row(*cells)
    totals = ["all", ""] + [_cell(summary["accuracy"][b]["mean"], summary["accuracy"][b]["low"],
                                  summary["accuracy"][b]["high"]) for b in conditions]
    if other is not None:
        d = summary["difference"][f"{conditions[0]} - {other}"]
        totals.append(f"[bold]{d['mean']:+.2f} [{d['low']:+.2f}, {d['high']:+.2f}][/]")
    table.add_section()
    table.add_row(*totals)
    for skipped in summary.get("skipped", []):
        table.caption = (table.caption + "\n" if table.caption else "") + f"skipped: {skipped['reason']}"
    return [table]

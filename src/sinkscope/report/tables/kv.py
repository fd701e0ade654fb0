"""Terminal table of `kv` (registered with `table_for_experiment`)."""

from __future__ import annotations

from typing import Any

from rich.table import Table

from . import table_for_experiment


def _number(value: Any, spec: str) -> str:
    return "-" if value is None or value != value else format(value, spec)  # NaN (no retrieval) as "-"


@table_for_experiment("kv")
def kv_table(result: Any) -> list[Any]:
    """One row per cache: loss, Δloss with its interval, retrieval through the cache with its paired drop, memory
    and the sink mass kept; then retrieval task by task."""
    s = result.summary
    prompts = s.get("n_retrieval_prompts", 0)
    table = Table("cache", "loss", "Δloss [95% CI]", "retrieval", "Δretrieval [95% CI]", "answer NLL", "bytes",
                  "full layers", "sink mass", "kept",
                  title=f"{s['n_windows']} windows: {s['context']} text tokens prefilled, {s['scored_per_window']} "
                        f"scored through the cache ({s['text']}); {prompts} retrieval prompts of "
                        f"{s.get('retrieval_length', 0)} tokens")
    for r in result.tables["kv"].itertuples():
        table.add_row(r.method, f"{r.loss:.3f}", f"{r.delta_loss:+.3f} [{r.delta_low:+.3f}, {r.delta_high:+.3f}]",
                      _number(r.retrieval, ".2f"), _interval(r.retrieval_delta, r.retrieval_delta_low,
                                                             r.retrieval_delta_high),
                      _number(r.answer_nll, ".2f"), f"{r.bytes_ratio:.3f}", f"{r.bytes_full_layers_ratio:.3f}",
                      f"{r.sink_mass:.3f}", f"{r.sink_mass_kept:.2f}")
    table.caption = ("bytes (whole cache, and its full-attention layers alone) and sink mass kept: relative to the "
                     "full cache" + _recommendation(s))
    tables = [table]
    by_task = result.tables.get("retrieval_tasks")
    if by_task is not None and not by_task.empty:
        tasks = list(dict.fromkeys(by_task["task"]))
        per_task = Table("cache", *tasks, title="retrieval through the cache, task by task (Δ vs full [95% CI])")
        for method, rows in by_task.groupby("method", sort=False):
            cells = {r.task: f"{r.retrieval:.2f} "
                             f"({_interval(r.retrieval_delta, r.retrieval_delta_low, r.retrieval_delta_high)})"
                     for r in rows.itertuples()}
            per_task.add_row(str(method), *(cells.get(t, "-") for t in tasks))
        tables.append(per_task)
    return tables


def _interval(value: Any, low: Any, high: Any) -> str:
    if value is None or value != value:
        return "-"
    return f"{value:+.2f} [{low:+.2f}, {high:+.2f}]"


def _recommendation(summary: dict[str, Any]) -> str:
    chosen = summary.get("recommendation")
    if not chosen or chosen.get("method") is None:
        return ""
    return (f"\nrecommended (the fewest bytes with Δloss ≤ {chosen['max_delta_loss']:g} nats and retrieval within "
            f"{chosen['max_retrieval_drop']:g} of the full cache, both by their intervals): {chosen['method']}")

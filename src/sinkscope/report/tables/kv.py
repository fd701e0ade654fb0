"""Terminal table of `kv` (registered with `table_for_experiment`)."""

from __future__ import annotations

from typing import Any

from rich.table import Table

from . import table_for_experiment


def _number(value: Any, spec: str) -> str:
    return "-" if value is None or value != value else format(value, spec)  # NaN (no passkey) as "-"


@table_for_experiment("kv")
def kv_table(result: Any) -> list[Any]:
    """One row per cache: loss, Δloss with its interval, passkey, memory and the sink mass kept."""
    s = result.summary
    table = Table("cache", "loss", "Δloss [95% CI]", "passkey", "key NLL", "bytes", "full layers", "sink mass",
                  "kept", title=f"{s['n_windows']} windows: {s['context']} text tokens prefilled, "
                        f"{s['scored_per_window']} scored through the cache ({s['text']})")
    for r in result.tables["kv"].itertuples():
        table.add_row(r.method, f"{r.loss:.3f}", f"{r.delta_loss:+.3f} [{r.delta_low:+.3f}, {r.delta_high:+.3f}]",
                      _number(r.passkey_accuracy, ".2f"), _number(r.key_nll, ".2f"), f"{r.bytes_ratio:.3f}",
                      _number(getattr(r, "bytes_full_layers_ratio", None), ".3f"), f"{r.sink_mass:.3f}",
                      f"{r.sink_mass_kept:.2f}")
    table.caption = ("bytes (whole cache, and its full-attention layers alone) and sink mass kept: relative to the "
                     "full cache" + _recommendation(s))
    return [table]


def _recommendation(summary: dict[str, Any]) -> str:
    chosen = summary.get("recommendation")
    if not chosen or chosen.get("method") is None:
        return ""
    return (f"\nrecommended (the fewest bytes with Δloss ≤ {chosen['max_delta_loss']:g} nats and passkey within "
            f"{chosen['max_retrieval_drop']:g}, both by their intervals): {chosen['method']}")


# -- the documentation page's tables, written from a saved run -------------------------------------------
def _interval(r: Any) -> str:
    return f"{r.delta_loss:+.3f} [{r.delta_low:+.3f}, {r.delta_high:+.3f}]"


def markdown(result: Any) -> str:
    """A saved `kv` run as Markdown: settings, the table of every cache, and protected vs unprotected pairs."""
    s, table = result.summary, result.tables["kv"]
    provenance = result.provenance
    lines = [
        f"**{s['model']}** — {s['n_windows']} windows of {s['text']}: `<bos>` + {s['context']} text tokens "
        f"prefilled, then {s['scored_per_window']} tokens per window scored through the cache ({s['step']} per "
        f"forward); {s['n_passkey_prompts']} passkey prompts of {s['passkey_length']} tokens. Full cache: loss "
        f"{s['full']['loss']:.3f}, sink mass {s['full']['sink_mass']:.3f}. Command: "
        f"`{provenance.get('command', '')}` (sinkscope {provenance.get('versions', {}).get('sinkscope', '?')}, "
        f"{provenance.get('seconds', 0):.0f} s).",
        "",
        "| cache | loss | Δloss [95% CI] | passkey | key NLL | bytes / full | sink mass | kept |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in table.itertuples():
        lines.append(f"| {r.method} | {r.loss:.3f} | {_interval(r)} | {_number(r.passkey_accuracy, '.2f')} | "
                     f"{_number(r.key_nll, '.2f')} | {r.bytes_ratio:.3f} | {r.sink_mass:.3f} | "
                     f"{r.sink_mass_kept:.2f} |")
    protected = sorted(k for k in table["protect"].unique() if k > 0)
    if protected and 0 in set(table["protect"]):
        k = protected[-1]
        lines += ["", f"Protecting the first {k} tokens, cache by cache (Δloss [95% CI], protect 0 → {k}):", "",
                  "| cache | protect 0 | protect " + str(k) + " | passkey 0 → " + str(k) + " |", "|---|---|---|---|"]
        others = table[table["kind"] != "full"]
        for _, group in others.groupby(["family", others["ratio"].fillna(-1)], sort=False):
            rows = {int(r.protect): r for r in group.itertuples()}
            if 0 in rows and k in rows:
                name = rows[0].method.rsplit(" k=", 1)[0]
                before, after = (_number(rows[p].passkey_accuracy, ".2f") for p in (0, k))
                lines.append(f"| {name} | {_interval(rows[0])} | {_interval(rows[k])} | {before} → {after} |")
    return "\n".join(lines) + "\n"


def write_docs(run: str, docs: str = "docs") -> None:
    """Write ``docs/generated/kv-<model>.md`` and ``docs/images/kv-<model>.png`` from a finished run directory."""
    import shutil
    from pathlib import Path

    from ...experiments.base import Result

    result = Result.load(run)
    name = result.summary["model"]
    Path(docs, "generated").mkdir(parents=True, exist_ok=True)
    Path(docs, "generated", f"kv-{name}.md").write_text(markdown(result), encoding="utf-8")
    Path(docs, "images").mkdir(parents=True, exist_ok=True)
    shutil.copyfile(Path(run, "kv_pareto.png"), Path(docs, "images", f"kv-{name}.png"))


if __name__ == "__main__":  # python -m sinkscope.report.tables.kv RUN_DIR [RUN_DIR ...]
    import sys

    for directory in sys.argv[1:]:
        write_docs(directory)

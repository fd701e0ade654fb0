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

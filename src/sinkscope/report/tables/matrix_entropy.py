"""Terminal table of `matrix_entropy`: per `<bos>` condition, the entropy valley and the sink rate."""

from __future__ import annotations

from typing import Any

from rich.table import Table

from . import table_for_experiment


@table_for_experiment("matrix_entropy")
def matrix_entropy_table(result: Any) -> list[Any]:
    s = result.summary
    per_depth = result.tables["per_depth"]
    conditions = list(s["bos"])
    table = Table("depth", *[f"{label} bos={c}" for c in conditions
                             for label in ("entropy", "||h0||/median", "sink rate (layer d-1)")],
                  title=f"{s['model']}: residual-stream matrix entropy (nats) by depth, {s['n_prompts']} prompts")
    for depth in sorted(per_depth["depth"].unique()):
        cells = []
        for c in conditions:
            row = per_depth[(per_depth["bos"] == c) & (per_depth["depth"] == depth)].iloc[0]
            rate = "-" if row["sink_rate"] != row["sink_rate"] else f"{row['sink_rate']:.2f}"  # NaN at depth 0
            cells += [f"{row['entropy']:.3f}", f"{row['first_norm_ratio']:.1f}", rate]
        table.add_row(str(depth), *cells)
    lines = [f"bos={c}: valley at depth {v['valley_depth']}, entropy {v['valley_entropy']:.3f} "
             f"[{v['valley_entropy_ci'][0]:.3f}, {v['valley_entropy_ci'][1]:.3f}]" for c, v in s["conditions"].items()]
    return [table, *lines]

"""Terminal tables of the measurements: per-layer sink rates, conditions side by side."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from rich.table import Table


def layer_table(results: Sequence[tuple[str, Any]], eps: Sequence[float]) -> Table:
    """Per-layer sink rates, conditions side by side. `results`: (label, ScanResult) pairs."""
    table = Table(title="sink rate per layer (fraction of heads with alpha > eps)", title_justify="left")
    table.add_column("layer", justify="right")
    table.add_column("type")
    for label, _ in results:
        for e in eps:
            table.add_column(f"{label}\n@{e}", justify="right", overflow="fold")
        table.add_column(f"{label}\nalpha", justify="right", overflow="fold")
    by_layer = [({e: r.sink_rate_by_layer(e) for e in eps}, r.alpha_map().mean(1), r.layer_types) for _, r in results]
    n_layers = max(len(types) for _, _, types in by_layer)
    for layer in range(n_layers):
        kind = next((types[layer] for _, _, types in by_layer if layer < len(types)), "")
        cells = [str(layer), kind.replace("_attention", "")]
        for rates, means, types in by_layer:
            if layer < len(types):
                cells += [f"{rates[e][layer]:.2f}" for e in eps] + [f"{means[layer]:.3f}"]
            else:
                cells += [""] * (len(eps) + 1)
        table.add_row(*cells)
    totals = ["all", ""]
    for _, result in results:
        totals += [f"[bold]{result.sink_rate(e):.3f}[/]" for e in eps] + [f"[bold]{result.alpha.mean():.3f}[/]"]
    table.add_section()
    table.add_row(*totals)
    return table

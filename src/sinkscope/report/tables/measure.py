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
    columns = []  # per condition: {layer: row of its cubes}, rates, mean alpha, mean gate (gated models)
    for label, result in results:
        gate = result.gate_mean
        for e in eps:
            table.add_column(f"{label}\n@{e}", justify="right", overflow="fold")
        table.add_column(f"{label}\nalpha", justify="right", overflow="fold")
        if gate is not None:
            table.add_column(f"{label}\ngate", justify="right", overflow="fold")
        rows = {layer: (i, kind) for i, (layer, kind) in enumerate(zip(result.layers, result.layer_types,
                                                                        strict=True))}
        columns.append((rows, {e: result.sink_rate_by_layer(e) for e in eps}, result.alpha_map().mean(1),
                        None if gate is None else gate.mean(axis=(0, 2))))
    # a hybrid model's linear-attention layers have no row: they have no softmax attention
    for layer in sorted(set().union(*(rows for rows, _, _, _ in columns))):
        kind = next(rows[layer][1] for rows, _, _, _ in columns if layer in rows)
        cells = [str(layer), kind.replace("_attention", "")]
        for rows, rates, means, gates in columns:
            width = len(eps) + 1 + (gates is not None)
            if layer not in rows:
                cells += [""] * width
                continue
            i = rows[layer][0]
            cells += [f"{rates[e][i]:.2f}" for e in eps] + [f"{means[i]:.3f}"]
            cells += [] if gates is None else [f"{gates[i]:.3f}"]
        table.add_row(*cells)
    totals = ["all", ""]
    for (_, result), (_, _, _, gates) in zip(results, columns, strict=True):
        totals += [f"[bold]{result.sink_rate(e):.3f}[/]" for e in eps] + [f"[bold]{result.alpha.mean():.3f}[/]"]
        totals += [] if gates is None else [f"[bold]{gates.mean():.3f}[/]"]
    table.add_section()
    table.add_row(*totals)
    return table

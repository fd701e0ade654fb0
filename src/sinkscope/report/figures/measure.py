"""Figures of the measurements: the scan's layer x head map of first-token attention."""

from __future__ import annotations

from typing import Any

from . import figure_for
from .common import alpha_heatmaps_figure


@figure_for("scan")
def scan_figures(result: Any) -> dict[str, Any]:
    return {"alpha_heatmap": alpha_heatmaps_figure([(result.label, result.alpha_map())])}

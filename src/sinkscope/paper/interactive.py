"""Interactive heatmaps (plotly; its JS is inlined once by the report) with a static PNG twin for readers
without JavaScript. Hover shows the row, the column and the value; any text shown on hover (tokens) is
HTML-escaped first, so a hostile token is drawn as text."""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass
class Heatmap:
    """One interactive figure: its plotly div (trusted HTML built here) and the PNG fallback (base64)."""

    title: str
    div: str
    png: str


def plotly_js() -> str:
    """plotly.js itself, to inline once in the page (no network needed)."""
    from plotly.offline import get_plotlyjs

    return str(get_plotlyjs())


def png_base64(figure: object) -> str:
    """A matplotlib figure as base64 PNG (closed afterwards)."""
    from ..report.figures import pyplot

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)  # type: ignore[attr-defined]
    pyplot().close(figure)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _static(title: str, values: np.ndarray, x_label: str, y_label: str) -> str:
    from ..report.figures import pyplot

    plt = pyplot()
    figure, axis = plt.subplots(figsize=(min(2.5 + 0.3 * values.shape[1], 10), 1.6 + 0.18 * values.shape[0]),
                                constrained_layout=True)
    image = axis.imshow(values, aspect="auto", cmap="magma", interpolation="nearest")
    axis.set_title(title, fontsize=9)
    axis.set_xlabel(x_label)
    axis.set_ylabel(y_label)
    figure.colorbar(image, ax=axis)
    return png_base64(figure)


def heatmap(title: str, values: np.ndarray, *, x_label: str, y_label: str, value_label: str, div_id: str,
            x_text: Sequence[str] | None = None) -> Heatmap:
    """A [rows, columns] heatmap; ``x_text``: a label per column shown on hover (escaped)."""
    import plotly.graph_objects as go

    rows, columns = values.shape
    hover = f"{y_label} %{{y}}<br>{x_label} %{{x}}<br>{value_label} %{{z:.4g}}"
    custom = None
    if x_text is not None:
        labels = [html.escape(str(t)) for t in x_text]
        custom = np.broadcast_to(np.array(labels, dtype=object), (rows, columns))
        hover += "<br>token %{customdata}"
    figure = go.Figure(go.Heatmap(z=np.where(np.isfinite(values), values, None), x=list(range(columns)),
                                  y=list(range(rows)), customdata=custom, colorscale="Magma",
                                  hovertemplate=hover + "<extra></extra>", colorbar={"title": value_label}))
    figure.update_layout(title={"text": html.escape(title), "font": {"size": 13}}, height=max(260, 60 + 16 * rows),
                         margin={"l": 50, "r": 20, "t": 40, "b": 40}, xaxis_title=x_label, yaxis_title=y_label)
    div = figure.to_html(full_html=False, include_plotlyjs=False, div_id=div_id,
                         config={"displaylogo": False, "responsive": True})
    return Heatmap(title, div, _static(title, values, x_label, y_label))

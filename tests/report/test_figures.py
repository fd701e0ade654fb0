"""Figures draw the numbers of their tables: the arrays behind the images and lines, read back from the
matplotlib objects, against values computed by hand from small tables built here (no model)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from sinkscope.experiments.scan import ScanResult
from sinkscope.report.figures import figures_for
from sinkscope.report.figures.common import sink_rate_by_layer_figure
from sinkscope.report.figures.measure import position_curves
from sinkscope.report.figures.retrieval import accuracy_heatmaps_figure


def scan_table(alpha: np.ndarray) -> pd.DataFrame:
    """The ``alpha`` table of a scan from a [prompts, layers, heads] cube, rows shuffled."""
    prompts, layers, heads = alpha.shape
    p, lay, h = np.meshgrid(np.arange(prompts), np.arange(layers), np.arange(heads), indexing="ij")
    frame = pd.DataFrame({"prompt": p.ravel(), "prompt_id": [f"p{i}" for i in p.ravel()], "layer": lay.ravel(),
                          "head": h.ravel(), "layer_type": "full_attention", "alpha": alpha.ravel(),
                          "first_k_mass": alpha.ravel(), "sink_logit_mass": np.nan, "first_token_id": 1,
                          "first_token": "<s>"})
    return frame.sample(frac=1.0, random_state=0)


def test_the_scan_heatmap_is_the_mean_alpha_per_layer_and_head():
    alpha = np.random.default_rng(0).uniform(size=(3, 4, 2))
    result = ScanResult({"alpha": scan_table(alpha)}, {"model": "m", "bos": "add"})
    figures = figures_for(result)
    assert set(figures) == {"alpha_heatmap"}
    image = figures["alpha_heatmap"].axes[0].get_images()[0]
    np.testing.assert_allclose(np.asarray(image.get_array()), alpha.mean(0), rtol=0, atol=1e-12)
    assert image.get_clim() == (0.0, 1.0)  # alpha is a share of attention: one fixed scale across runs


def test_the_scan_position_figure_draws_one_line_per_layer_from_the_positions_table():
    rng = np.random.default_rng(1)
    rows = [{"prompt": p, "layer": layer, "head": h, "position": t, "layer_type": kind,
             "attention": rng.uniform()}
            for p in range(2) for layer, kind in enumerate(["sliding_attention", "full_attention"])
            for h in range(2) for t in range(5)]
    positions = pd.DataFrame(rows)
    result = ScanResult({"alpha": scan_table(rng.uniform(size=(2, 2, 2))), "positions": positions},
                        {"model": "m", "bos": "add"})
    figure = figures_for(result)["first_token_by_position"]
    by_title = {ax.get_title(): ax for ax in figure.axes}
    for layer, title in ((0, "sliding attention layers"), (1, "full attention layers")):
        (line,) = by_title[title].get_lines()
        expected = positions[positions["layer"] == layer].groupby("position")["attention"].mean()
        np.testing.assert_array_equal(line.get_xdata(), expected.index.to_numpy() + 1)  # log axis: from 1
        np.testing.assert_allclose(line.get_ydata(), expected.to_numpy(), rtol=0, atol=1e-12)


def test_position_curves_average_equal_log_bins_of_positions():
    positions = pd.DataFrame({"layer": 0, "layer_type": "full_attention", "position": np.arange(100),
                              "attention": np.arange(100, dtype=float)})
    every = position_curves(positions, max_points=400)
    np.testing.assert_array_equal(every["position"], np.arange(100))  # fewer positions than points: all kept
    binned = position_curves(positions, max_points=5)
    edges = np.unique(np.geomspace(1, 101, num=5).astype(np.int64)) - 1  # 0, 2, 9, 30, 100 (by hand below)
    assert edges.tolist() == [0, 2, 9, 30, 100]
    assert binned["position"].tolist() == [0, 2, 9, 30]
    # each bin's mean of attention = position over [start, next start)
    assert binned["attention"].tolist() == pytest.approx([0.5, 5.0, 19.0, 64.5], abs=1e-12)


def test_the_sink_rate_figure_draws_each_series_by_layer():
    series = [("add", np.array([0.9, 0.5, 0.1])), ("strip", np.array([0.2, 0.4, 0.0]))]
    (ax,) = sink_rate_by_layer_figure(series, eps=0.3).axes
    for line, (label, values) in zip(ax.get_lines(), series, strict=True):
        assert line.get_label() == label
        np.testing.assert_array_equal(line.get_xdata(), [0, 1, 2])
        np.testing.assert_array_equal(line.get_ydata(), values)
    assert "0.3" in ax.get_ylabel()


def test_the_ruler_heatmaps_show_each_conditions_scores_and_their_difference():
    accuracy = pd.DataFrame({"bos": ["add"] * 4 + ["strip"] * 4, "task": ["vt", "vt", "cwe", "cwe"] * 2,
                             "length": [100, 200] * 4, "accuracy": [1.0, 0.5, 0.75, np.nan, 0.5, 0.25, 0.0, 0.5]})
    difference = pd.DataFrame({"first": "add", "other": "strip", "task": ["vt", "vt", "cwe", "cwe"],
                               "length": [100, 200] * 2, "difference": [0.5, 0.25, 0.75, np.nan]})
    figure = accuracy_heatmaps_figure(accuracy, difference, "t")
    panels = [ax for ax in figure.axes if ax.get_images()]
    assert [ax.get_title() for ax in panels] == ["bos=add", "bos=strip", "add - strip"]
    expected = [[[1.0, 0.5], [0.75, np.nan]], [[0.5, 0.25], [0.0, 0.5]], [[0.5, 0.25], [0.75, np.nan]]]
    for ax, values in zip(panels, expected, strict=True):
        np.testing.assert_array_equal(np.asarray(ax.get_images()[0].get_array().filled(np.nan)), values)
    texts = [t.get_text() for t in panels[0].texts]
    assert texts == ["1.00", "0.50", "0.75", "n/a"]  # a length the task could not fit is marked, not coloured

"""The 95% bootstrap intervals in the headline numbers of `ablate` (over windows) and `scan` (over prompts),
recomputed here from the per-window losses and the per-prompt alpha tables."""

from __future__ import annotations

import numpy as np
import pytest

from helpers import SENTENCES, TEXT, lm
from sinkscope.experiments.ablate import ablate
from sinkscope.experiments.scan import scan
from sinkscope.metrics.stats import bootstrap_interval


def test_ablate_intervals_over_windows():
    result = ablate(lm(), TEXT, bos=["add", "strip"], window=16, max_windows=5, per_token=True, progress=False)
    tokens, loss = result.tables["tokens"], result.summary["loss"]
    per_window = {c: g.groupby("window")["nll"].mean().to_numpy() for c, g in tokens.groupby("condition")}
    _, low, high = bootstrap_interval(per_window["strip"])
    # ablate's window means are float32 (15 losses of ~6 nats), these float64: ~eps32 * 6 = 7e-7 apart
    assert loss["strip"]["mean_loss_ci"] == pytest.approx([low, high], abs=1e-5)
    _, low, high = bootstrap_interval(per_window["strip"] - per_window["add"])
    # the same float32 rounding, absolute: relative to a Δ near 0 it is unbounded
    assert loss["strip"]["delta_loss_vs_add_ci"] == pytest.approx([low, high], abs=1e-5)
    assert low <= loss["strip"]["delta_loss_vs_add"] <= high and low < high
    assert loss["add"]["delta_loss_vs_add_ci"] == [0.0, 0.0]


def test_scan_sink_rate_interval_over_prompts():
    result = scan(lm(), SENTENCES, bos="add", eps=(0.3,), progress=False)
    alpha = result.alpha  # [prompts, layers, heads]
    _, low, high = bootstrap_interval((alpha > 0.3).mean(axis=(1, 2)))
    assert result.summary["sink_rate_ci"]["0.3"] == pytest.approx([low, high])
    assert low <= result.summary["sink_rate"]["0.3"] <= high
    assert np.isfinite([low, high]).all()

"""Bootstrap intervals: hand-computed cases and properties a percentile bootstrap must have."""

import numpy as np
import pytest

from sinkscope.errors import InputError
from sinkscope.metrics.stats import bootstrap_interval, paired_difference_interval, ratio_interval


def test_paired_difference_is_the_bootstrap_of_differences():
    first, second = np.array([1.0, 2.0, 4.0, 3.0]), np.array([0.5, 2.5, 1.0, 1.0])
    assert paired_difference_interval(first, second, seed=4) == bootstrap_interval(first - second, seed=4)
    # a constant shift has no spread: the paired interval is a point, the unpaired one would not be
    mean, low, high = paired_difference_interval(first + 1.0, first)
    assert mean == pytest.approx(1.0) and low == pytest.approx(1.0) and high == pytest.approx(1.0)
    with pytest.raises(InputError, match="differ in number"):
        paired_difference_interval([1.0], [1.0, 2.0])


def test_ratio_interval_by_hand_and_bracketing():
    assert ratio_interval([2.0], [4.0]) == (0.5, 0.5, 0.5)
    num, den = np.array([2.0, 4.0, 6.0]), np.array([1.0, 2.0, 3.0])
    assert ratio_interval(num, den) == pytest.approx((2.0, 2.0, 2.0))  # every resample has ratio 2
    rng = np.random.default_rng(0)
    num, den = rng.uniform(1, 3, 30), rng.uniform(1, 2, 30)
    ratio, low, high = ratio_interval(num, den, seed=1)
    assert ratio == pytest.approx(num.mean() / den.mean()) and low < ratio < high
    with pytest.raises(InputError, match="paired, non-empty"):
        ratio_interval([], [])

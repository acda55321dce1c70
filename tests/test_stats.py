"""The statistics of the sweep's report: t-intervals of a mean and paired differences."""

from __future__ import annotations

import math

import pytest

from tenslora.app.sweep.stats import Estimate, format_estimate, paired_difference, t_interval

T_975_2 = 4.302652729911275  # Student's t, 97.5 % quantile, 2 degrees of freedom (tables)


def test_t_interval_of_three_values():
    estimate = t_interval([1.0, 2.0, 3.0])
    half = T_975_2 * 1.0 / math.sqrt(3)
    assert (estimate.mean, estimate.n, estimate.std) == (2.0, 3, 1.0)
    assert estimate.low == pytest.approx(2.0 - half) and estimate.high == pytest.approx(2.0 + half)
    assert t_interval([1.0, 2.0, 3.0], confidence=0.5).high < estimate.high  # a lower confidence, a narrower interval


def test_one_value_has_no_spread_and_no_interval():
    assert t_interval([0.7]) == Estimate(0.7, 1)
    assert not Estimate(0.7, 1).excludes_zero and format_estimate(Estimate(0.7, 1)) == "0.7000"
    with pytest.raises(ValueError, match="at least one value"):
        t_interval([])


def test_paired_difference_uses_the_shared_seeds_only():
    first = {0: 0.80, 1: 0.90, 2: 0.70, 5: 0.0}
    second = {0: 0.78, 1: 0.88, 2: 0.69, 7: 1.0}
    difference = paired_difference(first, second)
    assert difference.n == 3 and difference.mean == pytest.approx((0.02 + 0.02 + 0.01) / 3)
    assert difference.excludes_zero  # the seeds move both by 20 points, the gap stays 1-2 points
    assert paired_difference({0: 1.0}, {1: 1.0}) is None


def test_an_interval_across_zero_does_not_exclude_it():
    assert not t_interval([0.01, -0.02, 0.005]).excludes_zero
    assert t_interval([-0.03, -0.031, -0.029]).excludes_zero


def test_format_estimate():
    estimate = t_interval([0.01, 0.02, 0.03])
    assert format_estimate(estimate, signed=True) == "+0.0200 ± 0.0100 [-0.0048, +0.0448]"
    assert format_estimate(t_interval([0.5, 0.7])) == "0.6000 ± 0.1414 [-0.6706, 1.8706]"

"""The statistics of a sweep's report: a mean over seeds with its t-interval, and paired differences.

A sweep has a handful of seeds, so the interval of a mean is Student's t-interval (not the
normal one, which would be too narrow for 3 values); two methods trained on the same seeds are
compared by the per-seed differences, which removes the share of the variance the seed causes
to both (the same training examples, the same head initialization).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from scipy.stats import t as student_t


@dataclass(frozen=True)
class Estimate:
    """A mean over ``n`` values; ``std`` and the interval ``[low, high]`` are None for a single value."""

    mean: float
    n: int
    std: float | None = None
    low: float | None = None
    high: float | None = None

    @property
    def excludes_zero(self) -> bool:
        """Whether the interval lies wholly on one side of zero (never, without an interval)."""
        return self.low is not None and (self.low > 0 or self.high < 0)


def t_interval(values: Sequence[float], confidence: float = 0.95) -> Estimate:
    """The mean of ``values``, their standard deviation and the ``confidence`` t-interval of the mean."""
    if not values:
        raise ValueError("A mean needs at least one value.")
    mean = statistics.fmean(values)
    if len(values) == 1:
        return Estimate(mean, 1)
    std = statistics.stdev(values)
    half_width = student_t.ppf((1 + confidence) / 2, len(values) - 1) * std / math.sqrt(len(values))
    return Estimate(mean, len(values), std, mean - half_width, mean + half_width)


def paired_difference(first: Mapping[int, float], second: Mapping[int, float],
                      confidence: float = 0.95) -> Estimate | None:
    """``first - second`` over the keys (seeds) both have, with its t-interval; None if they share none."""
    shared = sorted(set(first) & set(second))
    if not shared:
        return None
    return t_interval([first[key] - second[key] for key in shared], confidence)


def format_estimate(estimate: Estimate, signed: bool = False) -> str:
    """``0.7637 ± 0.0047 [0.7520, 0.7754]`` (mean ± std [interval]); the mean alone for one value."""
    sign = "+" if signed else ""
    if estimate.std is None:
        return f"{estimate.mean:{sign}.4f}"
    return f"{estimate.mean:{sign}.4f} ± {estimate.std:.4f} [{estimate.low:{sign}.4f}, {estimate.high:{sign}.4f}]"

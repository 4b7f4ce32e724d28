"""95 % intervals for the book's numbers, in one place: an accuracy on ``n`` examples (Wilson), a Pearson
correlation on ``n`` pairs (Fisher), a mean over seeds (Student's t), and a mean over independent tasks.

Numbers only: chapters, tables and the grid format them, so that a change of display never touches the code
behind a recorded result.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

__all__ = ["Z95", "independent_mean", "macro_interval", "mean_interval", "pearson_interval", "wilson_interval"]

Z95 = 1.959963984540054  # the standard normal's 97.5 % quantile


def wilson_interval(accuracy: float, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of an accuracy measured on ``n`` examples: what a different sample of ``n``
    evaluation examples could have given (it stays inside [0, 1] and is sound near 0, 1 and at small ``n``)."""
    if n <= 0:
        raise ValueError(f"an interval needs n > 0 evaluated examples, got {n}")
    centre = (accuracy + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(accuracy * (1 - accuracy) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def pearson_interval(r: float, n: int, z: float = Z95) -> tuple[float, float]:
    """The interval of a Pearson correlation ``r`` measured on ``n`` pairs (Fisher's z transform)."""
    if n <= 3:
        raise ValueError(f"a correlation's interval needs n > 3 pairs, got {n}")
    centre, half = math.atanh(max(-0.999999, min(0.999999, r))), z / math.sqrt(n - 3)
    return math.tanh(centre - half), math.tanh(centre + half)


def mean_interval(values: Sequence[float], level: float = 0.95) -> tuple[float, float, float]:
    """Mean of ``values`` (one per seed) and its ``level`` t-interval ``(mean, low, high)``: the spread over
    seeds, the uncertainty that matters when two methods differ by a little. One value has no spread: its
    interval is the value itself (NaN-free, so tables stay readable; say so where it is shown)."""
    from scipy import stats

    n = len(values)
    if n == 0:
        raise ValueError("mean_interval needs at least one value")
    mean = sum(values) / n
    if n == 1:
        return mean, mean, mean
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = float(stats.t.ppf(0.5 + level / 2, n - 1)) * sd / math.sqrt(n)
    return mean, mean - half, mean + half


def independent_mean(means: Sequence[float], halves: Sequence[float]) -> tuple[float, float]:
    """The mean of independent estimates and its interval's half-width, from theirs: the variances add,
    so the half-widths add in quadrature, and averaging ``k`` of them divides by ``k``."""
    if len(means) != len(halves) or not means:
        raise ValueError("give one half-width per mean, and at least one of each")
    return sum(means) / len(means), math.sqrt(sum(h * h for h in halves)) / len(means)


def macro_interval(accuracies: Sequence[float], ns: Sequence[int]) -> tuple[float, float]:
    """The normal interval of the mean of independent per-task accuracies (each a binomial proportion on its
    ``n`` examples), clipped to [0, 1]."""
    if len(accuracies) != len(ns):
        raise ValueError("give one eval size per accuracy, and at least one of each")
    mean, half = independent_mean(accuracies, [Z95 * math.sqrt(a * (1 - a) / n) for a, n in zip(accuracies, ns)])
    return max(0.0, mean - half), min(1.0, mean + half)

"""The book's 95 % intervals against hand values and their defining properties."""
import math

import pytest

from lorafam_nb import intervals, multitask, notebook
from lorafam_nb.intervals import Z95, independent_mean, macro_interval, mean_interval, pearson_interval, wilson_interval


def test_wilson_interval_matches_hand_values() -> None:
    lo, hi = wilson_interval(0.0, 10)  # Wilson: [0, z²/(n+z²)]
    assert lo == 0.0 and hi == pytest.approx(Z95**2 / (10 + Z95**2))
    lo, hi = wilson_interval(0.5, 100)
    assert (lo + hi) / 2 == pytest.approx(0.5) and hi - lo == pytest.approx(2 * 0.0961684696, abs=1e-8)
    with pytest.raises(ValueError):
        wilson_interval(0.5, 0)


def test_pearson_interval_is_fishers() -> None:
    lo, hi = pearson_interval(0.5, 103)  # atanh(0.5) ± 1.96 / 10
    assert math.atanh(lo) == pytest.approx(math.atanh(0.5) - Z95 / 10)
    assert math.atanh(hi) == pytest.approx(math.atanh(0.5) + Z95 / 10)
    with pytest.raises(ValueError):
        pearson_interval(0.5, 3)


def test_mean_interval_is_students_t() -> None:
    mean, lo, hi = mean_interval([1.0, 2.0, 3.0])  # sd 1, t(2, 0.975) = 4.3027
    assert mean == 2.0 and hi - mean == pytest.approx(4.302652729911275 / math.sqrt(3))
    assert mean_interval([0.7]) == (0.7, 0.7, 0.7)
    with pytest.raises(ValueError):
        mean_interval([])


def test_means_of_independent_estimates_add_variances() -> None:
    assert independent_mean([0.2, 0.4], [0.03, 0.04]) == pytest.approx((0.3, 0.05 / 2))
    lo, hi = macro_interval([0.5, 0.7], [100, 50])
    assert (lo + hi) / 2 == pytest.approx(0.6)
    assert hi - lo == pytest.approx(2 * Z95 * math.sqrt((0.25 / 100 + 0.21 / 50) / 4))
    with pytest.raises(ValueError):
        macro_interval([0.5], [])


def test_the_chapters_names_are_the_same_functions() -> None:
    # Chapters call notebook.wilson_interval and multitask.interval: one implementation behind both.
    assert notebook.wilson_interval is multitask.interval is intervals.wilson_interval
    assert multitask.macro_interval is intervals.macro_interval
    assert notebook.mean_interval is intervals.mean_interval and notebook.pearson_interval is intervals.pearson_interval

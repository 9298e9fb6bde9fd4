"""The timing tables' statistics (mabn.benchmark)."""

import math
import random

import pytest
from scipy import stats

from mabn.benchmark import median_interval, paired_ratio_text


@pytest.mark.parametrize("n", [6, 7, 10, 16, 20, 31])
def test_median_interval_takes_the_order_statistics_the_binomial_gives(n):
    samples = random.Random(n).sample(range(1000), n)
    low, high = median_interval(samples)
    ordered = sorted(samples)
    k = ordered.index(low) + 1
    assert high == ordered[n - k]
    coverage = lambda k: 1 - 2 * stats.binom.cdf(k - 1, n, 0.5)  # of [x_(k), x_(n + 1 - k)]
    assert coverage(k) >= 0.95 > coverage(k + 1)


def test_median_interval_is_nan_below_six_samples_at_95_percent():
    assert all(math.isnan(v) for v in median_interval([1.0, 2.0, 3.0, 4.0, 5.0]))
    assert median_interval([3.0, 1.0, 2.0, 6.0, 5.0, 4.0]) == (1.0, 6.0)


def test_median_interval_covers_the_median_about_95_percent_of_the_time():
    rng = random.Random(0)
    trials = 4000
    hits = sum(
        low <= 0 <= high for low, high in (median_interval([rng.gauss(0, 1) for _ in range(16)]) for _ in range(trials))
    )
    assert 0.95 <= hits / trials <= 0.995  # exact coverage at n = 16: 0.979


def test_paired_ratio_text_is_the_median_ratio_and_its_interval():
    baseline = [2.0] * 6
    assert paired_ratio_text([1.0, 1.2, 1.4, 1.6, 1.8, 2.0], baseline) == "0.75 [0.50, 1.00]"
    assert paired_ratio_text([1.0, 1.2, 1.4], [2.0] * 3) == "0.60"

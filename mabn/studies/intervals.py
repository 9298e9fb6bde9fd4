"""Differences of means with Welch's 95 % interval (from per-run values or from a table's
mean ± half-width) or the paired 95 % interval (runs matched by seed), and the verdict of a
claim on them."""

from __future__ import annotations

import math
import statistics

from scipy import stats


def difference(a: list[float], b: list[float]) -> dict:
    """Mean of a minus mean of b with Welch's 95 % interval (nan bounds with fewer than 2 each)."""
    diff = statistics.fmean(a) - statistics.fmean(b)
    if len(a) < 2 or len(b) < 2:
        return {"diff": diff, "low": math.nan, "high": math.nan}
    interval = stats.ttest_ind(a, b, equal_var=False).confidence_interval(0.95)
    return {"diff": diff, "low": float(interval.low), "high": float(interval.high)}


def paired_difference(a: dict, b: dict) -> dict:
    """Mean over the seeds both have of a[seed] - b[seed], with the paired 95 % t-interval
    (nan bounds with fewer than 2 pairs); ``n`` is the number of pairs."""
    seeds = sorted(set(a) & set(b))
    if not seeds:
        return {"diff": math.nan, "low": math.nan, "high": math.nan, "n": 0}
    diffs = [a[s] - b[s] for s in seeds]
    diff = statistics.fmean(diffs)
    if len(seeds) < 2:
        return {"diff": diff, "low": math.nan, "high": math.nan, "n": 1}
    interval = stats.ttest_rel([a[s] for s in seeds], [b[s] for s in seeds]).confidence_interval(0.95)
    return {"diff": diff, "low": float(interval.low), "high": float(interval.high), "n": len(seeds)}


def half_width(values: list[float]) -> float:
    """The 95 % t half-width of the mean of ``values`` (2 or more)."""
    return stats.t.ppf(0.975, len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))


def std_from_half_width(half_width: float, n: int) -> float:
    """The sample standard deviation behind a 95 % t half-width over n values."""
    return half_width * math.sqrt(n) / stats.t.ppf(0.975, n - 1)


def difference_from_table(a: list[float], mean_b: float, half_width_b: float, n_b: int) -> dict:
    """Mean of a minus a table's cell (mean ± 95 % half-width over n_b runs), Welch's interval;
    for studies whose per-run values were not kept, only their table."""
    diff = statistics.fmean(a) - mean_b
    if len(a) < 2 or n_b < 2:
        return {"diff": diff, "low": math.nan, "high": math.nan}
    sa, sb = statistics.stdev(a) ** 2 / len(a), std_from_half_width(half_width_b, n_b) ** 2 / n_b
    dof = (sa + sb) ** 2 / (sa ** 2 / (len(a) - 1) + sb ** 2 / (n_b - 1))
    half = stats.t.ppf(0.975, dof) * math.sqrt(sa + sb)
    return {"diff": diff, "low": diff - half, "high": diff + half}


def verdict(d: dict, expect: str) -> str:
    """'supported' when the 95 % interval of a difference lies on the expected side of 0
    (``expect`` "positive"), or contains 0 (``expect`` "zero"); else 'not supported' (for
    "positive": within noise, or the opposite holds)."""
    if math.isnan(d["low"]):
        return "not testable (fewer than 2 seeds)"
    if expect == "positive":
        return "supported" if d["low"] > 0 else "not supported (the opposite holds)" if d["high"] < 0 \
            else "not supported (within noise)"
    return "supported (within noise)" if d["low"] <= 0 <= d["high"] else "not supported"


def fmt_diff(d: dict) -> str:
    if math.isnan(d["low"]):
        return f"{d['diff']:+.2f} (one seed: no interval)"
    return f"{d['diff']:+.2f} [{d['low']:+.2f}, {d['high']:+.2f}]"

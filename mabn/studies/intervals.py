"""Differences of means with Welch's 95 % interval or the paired 95 % interval (runs matched by
seed), and the verdict of a claim on them."""

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


def verdict(d: dict, expect: str) -> str:
    """'supported' when the 95 % interval of a difference lies on the expected side of 0
    (``expect`` "positive"), or contains 0 (``expect`` "zero"); else 'not supported' (for
    "positive": within noise, or the opposite holds)."""
    if math.isnan(d["low"]):
        return "not testable (fewer than 2 seeds)"
    if expect == "positive":
        return (
            "supported"
            if d["low"] > 0
            else "not supported (the opposite holds)"
            if d["high"] < 0
            else "not supported (within noise)"
        )
    return "supported (within noise)" if d["low"] <= 0 <= d["high"] else "not supported"


def fmt_diff(d: dict) -> str:
    if math.isnan(d["low"]):
        return f"{d['diff']:+.2f} (one seed: no interval)"
    return f"{d['diff']:+.2f} [{d['low']:+.2f}, {d['high']:+.2f}]"

"""Shared by the benchmarks and the studies: the runs' summaries, a
mean with its interval, and printing a markdown report that is also written to a file."""

from __future__ import annotations

import json
import math
import statistics
from collections import defaultdict
from pathlib import Path

from scipy import stats as scipy_stats

from ..provenance import NOT_RECORDED, commit_label


def describe(values: list[float]) -> dict:
    """Mean, sample standard deviation, n and the half-width of the 95 % t-interval of the mean."""
    n = len(values)
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if n > 1 else math.nan
    half = scipy_stats.t.ppf(0.975, n - 1) * std / math.sqrt(n) if n > 1 else math.nan
    return {"mean": mean, "std": std, "n": n, "ci95": half}


def load_summaries(root: Path) -> list[dict]:
    """Every ``summary.json`` under ``root``, each with ``path``: its run folder."""
    return [json.loads(p.read_text()) | {"path": str(p.parent)} for p in sorted(root.rglob("summary.json"))]


def keep_runs(found: dict[str, dict], kept: Path) -> dict[str, dict]:
    """Write each run of ``found`` (run folder name -> summary) to ``kept``/<name>.json, then
    return those and every other run kept there, by name: a study spread over sessions or
    machines (whose run folders are gone), or a fresh clone, still reports every run."""
    for name, summary in found.items():
        kept.mkdir(parents=True, exist_ok=True)
        (kept / f"{name}.json").write_text(json.dumps({k: v for k, v in summary.items() if k != "path"}, indent=2))
    runs = dict(found)
    for path in sorted(kept.glob("*.json")):
        runs.setdefault(path.stem, json.loads(path.read_text()))
    return dict(sorted(runs.items()))


def keep_finished(runs: Path, kept: Path, select=lambda summary: True) -> int:
    """Keep the summaries of the finished runs under ``runs`` that ``select`` takes in
    ``kept``/<run folder name>.json (``keep_runs``); returns how many."""
    found = {Path(s["path"]).name: s for s in load_summaries(runs) if select(s)}
    keep_runs(found, kept)
    return len(found)


def publish(text: str, out: Path | None) -> None:
    print(text)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n")


def provenance_table(summaries: list[dict]) -> str:
    """Which code made the runs: one row per commit (``+changes``: with uncommitted changes), its
    number of runs and their labels; runs kept before summaries recorded it are "not recorded"."""
    runs = defaultdict(list)
    for summary in summaries:
        runs[commit_label(summary)].append(summary.get("label") or summary.get("norm", "?"))
    lines = ["| commit | runs | norms |", "|---|---|---|"]
    for commit in sorted(runs, key=lambda c: (c == NOT_RECORDED, c)):
        shown = f"{commit} (made before run summaries recorded their commit)" if commit == NOT_RECORDED else commit
        lines.append(f"| {shown} | {len(runs[commit])} | {', '.join(sorted(set(runs[commit])))} |")
    return "\n".join(lines)

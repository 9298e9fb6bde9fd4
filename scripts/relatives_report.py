"""MABN's relatives (the relatives' blocks of scripts/fashion_study.sh, and scripts/fashion_vit.sh):
keeps each finished run's summary in results/fashion_relative_runs/ and results/fashion_vit_runs/
and writes results/fashion_relatives.md (tables, one verdict per claim and each norm's price in
memory, mabn.studies.relatives):

    python scripts/relatives_report.py --runs runs/fashion_study --vit-runs runs/fashion_vit   # collect, report
    python scripts/relatives_report.py                                                        # from results/ alone
"""

from __future__ import annotations

import argparse
from pathlib import Path

from mabn.studies.relatives import KEPT_LABELS, write_report
from mabn.studies.reporting import keep_runs, load_summaries


def keep_summaries(runs: Path, kept: Path, labels=None) -> int:
    """Keep the summaries of the finished runs under ``runs`` (those of ``labels`` only, if given) in
    ``kept``/<run name>.json."""
    found = {
        Path(s["path"]).name: s for s in load_summaries(runs) if labels is None or s.get("label", s["norm"]) in labels
    }
    keep_runs(found, kept)
    return len(found)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=Path, help="the Fashion-MNIST study's runs folder to collect from first")
    parser.add_argument("--vit-runs", type=Path, help="the transformer study's runs folder to collect from first")
    parser.add_argument("--results", type=Path, default=Path("results"))
    args = parser.parse_args(argv)
    for runs, folder, labels in (
        (args.runs, "fashion_relative_runs", KEPT_LABELS),
        (args.vit_runs, "fashion_vit_runs", None),
    ):
        if runs:
            print(
                f"kept {keep_summaries(runs, args.results / folder, labels)} run summaries in {args.results / folder}"
            )
    write_report(args.results)


if __name__ == "__main__":
    main()

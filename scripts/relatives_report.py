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
from mabn.studies.reporting import keep_finished


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=Path, help="the Fashion-MNIST study's runs folder to collect from first")
    parser.add_argument("--vit-runs", type=Path, help="the transformer study's runs folder to collect from first")
    parser.add_argument("--results", type=Path, default=Path("results"))
    args = parser.parse_args(argv)
    relatives = lambda summary: summary.get("label", summary["norm"]) in KEPT_LABELS
    for runs, folder, select in (
        (args.runs, "fashion_relative_runs", relatives),
        (args.vit_runs, "fashion_vit_runs", lambda summary: True),
    ):
        if runs:
            kept = args.results / folder
            print(f"kept {keep_finished(runs, kept, select)} run summaries in {kept}")
    write_report(args.results)


if __name__ == "__main__":
    main()

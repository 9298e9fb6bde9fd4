"""MABN's successors in the Fashion-MNIST study (the last block of scripts/fashion_study.sh):
keeps each finished run's summary in results/fashion_successor_runs/ and writes
results/fashion_successors.md (their table and one verdict per claim, mabn.studies.successors)
and its plot results/fashion_successors.png:

    python scripts/successors_report.py runs/fashion_study     # collect new runs, then report
    python scripts/successors_report.py                        # report from results/ alone
"""

from __future__ import annotations

import argparse
from pathlib import Path

from mabn.studies.reporting import keep_finished
from mabn.studies.successors import SUCCESSORS, write_report


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", type=Path, nargs="?", help="a study's runs folder to collect from first")
    parser.add_argument("--results", type=Path, default=Path("results"))
    args = parser.parse_args(argv)
    kept = args.results / "fashion_successor_runs"
    if args.runs:
        print(f"kept {keep_finished(args.runs, kept, lambda s: s['norm'] in SUCCESSORS)} run summaries in {kept}")
    write_report(args.results)


if __name__ == "__main__":
    main()

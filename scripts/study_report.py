"""Tables, plots and the claim-by-claim report of the Fashion-MNIST evidence study
(mabn.studies.classification), from its run folders (what ``bash scripts/fashion_study.sh`` wrote):

    python scripts/study_report.py                       # runs/fashion_study -> results/
    python scripts/study_report.py runs/fashion_study --results /tmp/results
"""

import argparse
from pathlib import Path

from mabn.studies.classification import write_report


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", type=Path, nargs="?", default=Path("runs/fashion_study"))
    parser.add_argument("--results", type=Path, default=Path("results"))
    args = parser.parse_args(argv)
    write_report(args.runs, args.results)


if __name__ == "__main__":
    main()

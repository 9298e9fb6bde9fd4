"""Table, AP curve, plot and claim-by-claim verdicts of the detection study (mabn.studies.scenes),
from its run folders (what ``bash scripts/scenes_study.sh`` wrote) and the runs kept in results/:

    python scripts/scenes_report.py                      # runs/scenes_study -> results/
    python scripts/scenes_report.py runs/scenes_study --results /tmp/results
"""

import argparse
from pathlib import Path

from mabn.studies.scenes import write_report


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="?", type=Path, default=Path("runs/scenes_study"))
    parser.add_argument("--results", type=Path, default=Path("results"))
    args = parser.parse_args(argv)
    write_report(args.runs, args.results)


if __name__ == "__main__":
    main()

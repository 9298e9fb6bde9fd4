"""Collect the summary.json of finished runs into a table (and a plot) next to the paper's
(mabn.studies.collect):

    python scripts/collect_results.py runs/imagenet                     # print the table
    python scripts/collect_results.py runs/imagenet --out results/fashion_mnist.md --plot results/fashion_mnist.png
    python scripts/collect_results.py runs/quickstart --study results/REPORT.md   # beside the study

Classification runs give top-1 error (%) per norm (rows) and normalization batch (columns), a
table per model; detection runs give box/mask AP per run; a folder of both gives both. The paper's
numbers (docs/papers.md, MABN's results) are printed beside them when the run is the paper's
setting (ImageNet ResNet-50, COCO Mask R-CNN R50-FPN).
"""

import argparse
import shlex
import sys
from pathlib import Path

from mabn.studies.collect import beside_the_study, plot, tables
from mabn.studies.reporting import load_summaries, publish


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("root", type=Path, help="folder searched recursively for summary.json")
    parser.add_argument("--out", type=Path, help="write the markdown table here")
    parser.add_argument("--plot", type=Path, help="write a plot of error vs normalization batch (classification)")
    parser.add_argument("--title", help="a first line, e.g. the command that made the runs")
    parser.add_argument(
        "--study", type=Path, help="an evidence report (results/REPORT.md): its cells and claims beside these runs'"
    )
    args = parser.parse_args(argv)
    summaries = load_summaries(args.root)
    if not summaries:
        sys.exit(f"error: no summary.json under {args.root}: run a training job first")
    classification = [s for s in summaries if "box_AP" not in s]
    text = tables(summaries)
    if args.study and classification:
        text += "\n\n" + beside_the_study(classification, args.study)
    if args.title:
        text = f"{args.title}\n\n{text}"
    text += f"\n\nCommand: `` python scripts/collect_results.py {shlex.join(argv or sys.argv[1:])} ``"
    publish(text, args.out)
    if args.plot and classification:
        plot(classification, args.plot)
    return text


if __name__ == "__main__":
    main()

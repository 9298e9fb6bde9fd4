"""Collect the summary.json of finished runs into a table (and a plot) next to the paper's.

    python scripts/collect_results.py runs/imagenet                     # print the table
    python scripts/collect_results.py runs/imagenet --out results/fashion_mnist.md --plot results/fashion_mnist.png

Classification runs give top-1 error (%) per norm (rows) and normalization batch (columns);
detection runs give box/mask AP per norm. The paper's numbers (REFERENCE.md section 2) are
printed beside them when the run is the paper's setting (ImageNet ResNet-50, COCO Mask R-CNN).
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import sys
from collections import defaultdict
from pathlib import Path

from mabn.studies.tables import study_cells
from report import publish

# ImageNet ResNet-50 top-1 error by normalization batch (authors' README/figure). GN: the GN
# paper's value at 32 images per GPU only (its other columns vary the SGD batch, not this).
PAPER_IMAGENET = {
    "bn": {32: 23.41, 16: 24.25, 8: 25.5, 4: 27.9, 2: 35.22},
    "brn": {32: 23.5, 16: 24.40, 8: 25.33, 4: 26.88, 2: 30.29},
    "mabn": {32: 23.54, 16: 23.73, 8: 23.62, 4: 23.73, 2: 23.67, 1: 23.73},
    "gn": {32: 24.1},
}
# COCO Mask R-CNN R50-FPN 2x, (start, norm) -> box AP, mask AP
PAPER_COCO = {
    ("scratch", "bn"): (32.38, 29.07), ("scratch", "brn"): (34.07, 30.98),
    ("scratch", "syncbn"): (36.80, 33.10), ("scratch", "mabn"): (36.50, 32.69),
    ("finetune", "syncbn"): (38.25, 34.22), ("finetune", "mabn"): (38.42, 34.12),
}


def load_summaries(root: Path) -> list[dict]:
    return [json.loads(p.read_text()) | {"path": str(p.parent)} for p in sorted(root.rglob("summary.json"))]


def is_paper_imagenet(summary: dict) -> bool:
    config = summary.get("config", {})
    return config.get("data", {}).get("name") == "imagenet" and config.get("model", {}).get("name") == "resnet50"


def classification_table(summaries: list[dict]) -> str:
    errors = defaultdict(dict)
    speed = defaultdict(dict)
    for s in summaries:
        name = s.get("label", s["norm"])  # a variant (mabn_no_wc, ...) keeps its own row
        errors[name][s["batch"]] = errors[name].get(s["batch"], []) + [s["top1_error"]]
        speed[name][s["batch"]] = s["images_per_second"]
    paper = all(is_paper_imagenet(s) for s in summaries)
    batches = sorted({b for row in errors.values() for b in row}, reverse=True)
    header = "| norm | " + " | ".join(f"batch {b}" for b in batches) + " |"
    lines = ["Top-1 error (%) by normalization batch" + (" (paper in brackets)" if paper else "")
             + "; mean over seeds.", "", header, "|---" * (len(batches) + 1) + "|"]
    for norm in sorted(errors):
        cells = []
        for b in batches:
            values = errors[norm].get(b)
            cell = f"{sum(values) / len(values):.2f}" if values else "-"
            if paper and b in PAPER_IMAGENET.get(norm, {}):
                cell += f" ({PAPER_IMAGENET[norm][b]})"
            cells.append(cell)
        lines.append(f"| {norm} | " + " | ".join(cells) + " |")
    lines += ["", "Training images/s: " + "; ".join(
        f"{n}@{b}: {v:.0f}" for n in sorted(speed) for b, v in sorted(speed[n].items(), reverse=True))]
    return "\n".join(lines)


CLAIM = re.compile(r"^- \*\*(?P<title>.+?)\*\* (?P<a>\w+)@(?P<ab>\d+) minus (?P<b>\w+)@(?P<bb>\d+): "
                   r"(?P<diff>[-+][\d.]+) \[(?P<low>[-+][\d.]+), (?P<high>[-+][\d.]+)\].*?\*\*(?P<verdict>.+?)\*\*")


def beside_the_study(summaries: list[dict], study: Path) -> str:
    """The study's means for the quick runs' cells, and one line per claim of the study's report
    whose cells the quick runs have: the quick difference beside the study's, agreeing or not."""
    errors = defaultdict(list)
    for s in summaries:
        errors[s.get("label", s["norm"]), s["batch"]].append(s["top1_error"])
    steps = max(s.get("steps", 0) for s in summaries)
    seeds = len({s["seed"] for s in summaries})
    cells = study_cells((study.parent / "fashion_study.md").read_text())
    report = study.read_text()
    study_seeds = len(re.search(r"seeds \[([\d, ]+)\]", report)[1].split(","))
    lines = [f"The study ({study}: {study_seeds} seeds of its full recipe, mean ± 95 % half-width) for the same cells:",
             "",
             "| norm | batch | these runs | the study |", "|---|---|---|---|"]
    lines += [f"| {norm} | {batch} | {sum(v) / len(v):.2f} | "
              + ("{:.2f} ± {:.2f}".format(*cells[norm, batch]) if (norm, batch) in cells else "-") + " |"
              for (norm, batch), v in sorted(errors.items())]
    lines += ["", "The study's claims on these cells:", ""]
    for match in map(CLAIM.match, report.splitlines()):
        if not match or (match["a"], int(match["ab"])) not in errors or (match["b"], int(match["bb"])) not in errors:
            continue
        mean = lambda norm, batch: sum(errors[norm, int(batch)]) / len(errors[norm, int(batch)])  # noqa: E731
        quick = mean(match["a"], match["ab"]) - mean(match["b"], match["bb"])
        low, high = float(match["low"]), float(match["high"])
        # the study's interval holds 0: agree when inside it; else: agree on the side of 0
        agrees = low <= quick <= high if low <= 0 <= high else (quick > 0) == (float(match["diff"]) > 0)
        line = (f"- {match['title']} {match['a']}@{match['ab']} minus {match['b']}@{match['bb']}: {quick:+.2f} here, "
                f"{match['diff']} [{match['low']}, {match['high']}] in the study ({match['verdict']}): ")
        lines.append(line + ("these runs agree." if agrees else
                             f"these runs disagree: they are {seeds} seed(s) of {steps} steps against the study's "
                             f"{study_seeds} seeds of its full length (run length); the study ({study}) is the "
                             "evidence."))
    return "\n".join(lines)


def detection_table(summaries: list[dict]) -> str:
    keys = ("box_AP", "box_AP50", "box_AP75", "mask_AP", "mask_AP50", "mask_AP75")
    lines = ["| start | norm | imgs/device | " + " | ".join(keys) + " | paper box/mask AP |",
             "|---" * (len(keys) + 4) + "|"]
    for s in summaries:
        paper = PAPER_COCO.get((s["start"], s["norm"]))
        lines.append(f"| {s['start']} | {s['norm']} | {s['batch']} | "
                     + " | ".join(f"{s[k]:.2f}" for k in keys)
                     + f" | {f'{paper[0]} / {paper[1]}' if paper else '-'} |")
    return "\n".join(lines)


def plot(summaries: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_norm = defaultdict(lambda: defaultdict(list))
    for s in summaries:
        by_norm[s.get("label", s["norm"])][s["batch"]].append(s["top1_error"])
    figure, axes = plt.subplots(figsize=(5, 3.5))
    for norm, points in sorted(by_norm.items()):
        batches = sorted(points, reverse=True)
        axes.plot([str(b) for b in batches], [sum(points[b]) / len(points[b]) for b in batches], "o-", label=norm)
    axes.set_xlabel("normalization batch")
    axes.set_ylabel("top-1 error (%)")
    axes.legend()
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("root", type=Path, help="folder searched recursively for summary.json")
    parser.add_argument("--out", type=Path, help="write the markdown table here")
    parser.add_argument("--plot", type=Path, help="write a plot of error vs normalization batch (classification)")
    parser.add_argument("--title", help="a first line, e.g. the command that made the runs")
    parser.add_argument("--study", type=Path, help="an evidence report (results/REPORT.md): its cells and claims "
                                                   "beside these runs'")
    args = parser.parse_args(argv)
    summaries = load_summaries(args.root)
    if not summaries:
        sys.exit(f"error: no summary.json under {args.root}: run a training job first")
    detection = "box_AP" in summaries[0]
    text = detection_table(summaries) if detection else classification_table(summaries)
    if args.study and not detection:
        text += "\n\n" + beside_the_study(summaries, args.study)
    if args.title:
        text = f"{args.title}\n\n{text}"
    text += f"\n\nCommand: `` python scripts/collect_results.py {shlex.join(argv or sys.argv[1:])} ``"
    publish(text, args.out)
    if args.plot and not detection:
        plot(summaries, args.plot)
    return text


if __name__ == "__main__":
    main()

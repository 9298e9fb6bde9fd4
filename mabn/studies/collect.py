"""Any runs' summaries as a table beside the paper's (``collect_results.py``): top-1 error per
norm and normalization batch, or box/mask AP per detection run; and quick runs beside the
evidence study's cells and claims (``beside_the_study``)."""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path

from .papers import PAPER_COCO, PAPER_IMAGENET
from .tables import study_cells


def is_paper_imagenet(summary: dict) -> bool:
    config = summary.get("config", {})
    return config.get("data", {}).get("name") == "imagenet" and config.get("model", {}).get("name") == "resnet50"


def is_paper_coco(summary: dict) -> bool:
    config = summary.get("config", {})
    return config.get("data", {}).get("name") == "coco" and config.get("detector", {}).get("backbone") == "resnet50"


def tables(summaries: list[dict]) -> str:
    """A table per kind of run: classification (one per model) and detection."""
    detection = [s for s in summaries if "box_AP" in s]
    classification = [s for s in summaries if "box_AP" not in s]
    models = defaultdict(list)
    for s in classification:
        models[s.get("config", {}).get("model", {}).get("name", "?")].append(s)
    parts = [
        (f"Model {model}:\n\n" if len(models) > 1 else "") + classification_table(runs)
        for model, runs in sorted(models.items())
    ]
    return "\n\n".join(parts + ([detection_table(detection)] if detection else []))


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
    lines = [
        "Top-1 error (%) by normalization batch" + (" (paper in brackets)" if paper else "") + "; mean over seeds.",
        "",
        header,
        "|---" * (len(batches) + 1) + "|",
    ]
    for norm in sorted(errors):
        cells = []
        for b in batches:
            values = errors[norm].get(b)
            cell = f"{sum(values) / len(values):.2f}" if values else "-"
            if paper and b in PAPER_IMAGENET.get(norm, {}):
                cell += f" ({PAPER_IMAGENET[norm][b]})"
            cells.append(cell)
        lines.append(f"| {norm} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Training images/s: "
        + "; ".join(f"{n}@{b}: {v:.0f}" for n in sorted(speed) for b, v in sorted(speed[n].items(), reverse=True)),
    ]
    return "\n".join(lines)


CLAIM = re.compile(
    r"^- \*\*(?P<title>.+?)\*\* (?P<a>\w+)@(?P<ab>\d+) minus (?P<b>\w+)@(?P<bb>\d+): "
    r"(?P<diff>[-+][\d.]+) \[(?P<low>[-+][\d.]+), (?P<high>[-+][\d.]+)\].*?\*\*(?P<verdict>.+?)\*\*"
)


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
    lines = [
        f"The study ({study}: {study_seeds} seeds of its full recipe, mean ± 95 % half-width) for the same cells:",
        "",
        "| norm | batch | these runs | the study |",
        "|---|---|---|---|",
    ]
    lines += [
        f"| {norm} | {batch} | {sum(v) / len(v):.2f} | "
        + ("{:.2f} ± {:.2f}".format(*cells[norm, batch]) if (norm, batch) in cells else "-")
        + " |"
        for (norm, batch), v in sorted(errors.items())
    ]
    claims = []
    for match in map(CLAIM.match, report.splitlines()):
        if not match or (match["a"], int(match["ab"])) not in errors or (match["b"], int(match["bb"])) not in errors:
            continue
        mean = lambda norm, batch: sum(errors[norm, int(batch)]) / len(errors[norm, int(batch)])
        quick = mean(match["a"], match["ab"]) - mean(match["b"], match["bb"])
        low, high = float(match["low"]), float(match["high"])
        # the study's interval holds 0: agree when inside it; else: agree on the side of 0
        agrees = low <= quick <= high if low <= 0 <= high else (quick > 0) == (float(match["diff"]) > 0)
        line = (
            f"- {match['title']} {match['a']}@{match['ab']} minus {match['b']}@{match['bb']}: {quick:+.2f} here, "
            f"{match['diff']} [{match['low']}, {match['high']}] in the study ({match['verdict']}): "
        )
        claims.append(
            line
            + (
                "these runs agree."
                if agrees
                else f"these runs disagree: they are {seeds} seed(s) of {steps} steps against the study's "
                f"{study_seeds} seeds of its full length (run length); the study ({study}) is the "
                "evidence."
            )
        )
    lines += (
        ["", "The study's claims on these cells:", "", *claims]
        if claims
        else ["", "No claim of the study is on these cells."]
    )
    return "\n".join(lines)


def detection_table(summaries: list[dict]) -> str:
    keys = ("box_AP", "box_AP50", "box_AP75", "mask_AP", "mask_AP50", "mask_AP75")
    lines = [
        "| start | norm | imgs/device | " + " | ".join(keys) + " | paper box/mask AP |",
        "|---" * (len(keys) + 4) + "|",
    ]
    for s in summaries:
        paper = PAPER_COCO.get((s["start"], s["norm"])) if is_paper_coco(s) else None
        lines.append(
            f"| {s['start']} | {s['norm']} | {s['batch']} | "
            + " | ".join(f"{s[k]:.2f}" for k in keys)
            + f" | {f'{paper[0]} / {paper[1]}' if paper else '-'} |"
        )
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

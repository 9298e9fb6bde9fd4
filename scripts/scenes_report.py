"""Table, plot and claim-by-claim verdicts of the detection study, from its run folders (what
``bash scripts/scenes_study.sh`` wrote):

    python scripts/scenes_report.py                      # runs/scenes_study -> results/
    python scripts/scenes_report.py runs/scenes_study --results /tmp/results

Writes ``scenes_study.md`` (box and mask AP, AP50, AP75: mean, 95 % interval and spread over
seeds, beside the paper's COCO numbers; each claim of the paper's COCO table with this
study's difference and interval) and ``scenes_study.png``. Only finished runs count. Each
finished run's summary is also kept in ``scenes_study_runs/<run>.json`` beside the table, and
read back from there: a study spread over sessions or machines (whose run folders are gone)
still reports every run, and ``scenes_study.sh`` skips the runs kept there.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

from collect_results import PAPER_COCO, load_summaries
from report import describe, publish
from study_report import difference, fmt_diff, verdict

METRICS = ("box_AP", "box_AP50", "box_AP75", "mask_AP", "mask_AP50", "mask_AP75")
ORDER = [("scratch", "bn", 1), ("scratch", "brn", 1), ("scratch", "gn", 1), ("scratch", "mabn", 1),
         ("scratch", "mabn", 2), ("scratch", "syncbn", 2), ("finetune", "mabn", 2), ("finetune", "syncbn", 2)]
CLAIMS = [  # text, (start, norm, processes) that should score higher or equal, the other, expectation
    ("BRN is better than BN from scratch (paper: 34.07 vs 32.38 box AP)", ("scratch", "brn", 1),
     ("scratch", "bn", 1), "positive"),
    ("MABN is better than BRN from scratch (paper: 36.50 vs 34.07)", ("scratch", "mabn", 1), ("scratch", "brn", 1),
     "positive"),
    ("MABN is better than BN from scratch (paper: 36.50 vs 32.38)", ("scratch", "mabn", 1), ("scratch", "bn", 1),
     "positive"),
    ("MABN is within noise of SyncBN from scratch, both over 2 processes x 2 images (paper: 36.50 vs 36.80)",
     ("scratch", "mabn", 2), ("scratch", "syncbn", 2), "zero"),
    ("Fine-tuned, MABN is within noise of SyncBN (paper: 38.42 vs 38.25)", ("finetune", "mabn", 2),
     ("finetune", "syncbn", 2), "zero"),
]


def eval_curve(run_dir: Path) -> dict:
    """Box and mask AP at each evaluation of a run (its metrics.jsonl): {step: [box, mask]}."""
    path = run_dir / "metrics.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []
    return {str(r["step"]): [r["eval/box_AP"], r["eval/mask_AP"]] for r in records if "eval/box_AP" in r}


def kept_summaries(runs: Path, kept: Path) -> list[dict]:
    """The finished runs under ``runs`` (with their AP curves) and those kept in ``kept``; each
    finished run of ``runs`` is (re)written to ``kept``, named by its run folder. A run cut
    short is left out."""
    found = {Path(s["path"]).name: s | {"curve": eval_curve(Path(s["path"]))} for s in load_summaries(runs)
             if s["steps"] == s["config"]["schedule"]["max_iter"]}
    for name, s in found.items():
        kept.mkdir(parents=True, exist_ok=True)
        (kept / f"{name}.json").write_text(json.dumps({k: v for k, v in s.items() if k != "path"}, indent=2))
    for path in sorted(kept.glob("*.json")):
        found.setdefault(path.stem, json.loads(path.read_text()) | {"path": str(path)})
    return list(found.values())


def group(summaries: list[dict], expected_steps: int | None) -> dict:
    """(start, norm, processes) -> list of finished runs' summaries (a run cut short is left out)."""
    runs = defaultdict(list)
    for s in summaries:
        if expected_steps is None or s["steps"] == expected_steps:
            runs[(s["start"], s.get("label") or s["norm"], s["world_size"])].append(s)
    return runs


def cell(values: list[float]) -> str:
    d = describe(values)
    if d["n"] == 1:
        return f"{d['mean']:.1f} (n=1)"
    return f"{d['mean']:.1f} ± {d['ci95']:.1f} ({min(values):.1f}-{max(values):.1f})"


def table(runs: dict) -> str:
    lines = ["| start | norm | processes x images | seeds | " + " | ".join(METRICS) + " | paper box / mask AP |",
             "|---" * (len(METRICS) + 5) + "|"]
    for key in [k for k in ORDER if k in runs] + sorted(set(runs) - set(ORDER)):
        group_runs = runs[key]
        paper = PAPER_COCO.get(key[:2])
        lines.append(f"| {key[0]} | {key[1]} | {group_runs[0]['world_size']} x {group_runs[0]['batch']} | "
                     f"{len(group_runs)} | " + " | ".join(cell([s[m] for s in group_runs]) for m in METRICS)
                     + f" | {f'{paper[0]} / {paper[1]}' if paper else '-'} |")
    return "\n".join(lines)


def curve_table(runs: dict) -> list[str]:
    """Box AP at each evaluation, mean over seeds: whether a run had leveled off."""
    steps = sorted({int(k) for group_runs in runs.values() for s in group_runs for k in s.get("curve", {})})
    if not steps:
        return []
    lines = ["Box AP during training (mean over seeds; lr x0.1 at the schedule's steps):", "",
             "| start | norm | processes x images | " + " | ".join(f"{k} it" for k in steps) + " |",
             "|---" * (len(steps) + 3) + "|"]
    for key in [k for k in ORDER if k in runs] + sorted(set(runs) - set(ORDER)):
        cells = []
        for step in steps:
            values = [s["curve"][str(step)][0] for s in runs[key] if str(step) in s.get("curve", {})]
            cells.append(f"{describe(values)['mean']:.1f}" if values else "-")
        lines.append(f"| {key[0]} | {key[1]} | {key[2]} x {runs[key][0]['batch']} | " + " | ".join(cells) + " |")
    return lines + [""]


def claims(runs: dict) -> list[str]:
    out = []
    for text, better, other, expect in CLAIMS:
        if better in runs and other in runs:
            parts = []
            for metric in ("box_AP", "mask_AP"):
                d = difference([s[metric] for s in runs[better]], [s[metric] for s in runs[other]])
                parts.append(f"{metric.replace('_', ' ')} {fmt_diff(d)}: **{verdict(d, expect)}**")
            out.append(f"- **{text}.** {better[1]} minus {other[1]} ({better[0]}, {better[2]} vs {other[2]} "
                       f"processes, n = {len(runs[better])}, "
                       f"{len(runs[other])}): " + "; ".join(parts) + ".")
        else:
            out.append(f"- **{text}.** Not run yet.")
    return out


def plot(runs: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in ORDER if k in runs]
    figure, axes = plt.subplots(1, 2, figsize=(9, 3.4), sharey=True)
    for ax, metric in zip(axes, ("box_AP", "mask_AP")):
        for i, key in enumerate(keys):
            values = [s[metric] for s in runs[key]]
            ax.bar(i, describe(values)["mean"], color="tab:orange" if key[1] == "mabn" else "tab:gray", alpha=0.6)
            ax.plot([i] * len(values), values, "k.", markersize=5)
        ax.set_xticks(range(len(keys)), [f"{norm}\n{start}\n{n}x2" for start, norm, n in keys], fontsize=7)
        ax.set_title(f"{metric.replace('_', ' ')} (mean; dots: seeds)", fontsize=9)
    axes[0].set_ylabel("AP (%) on generated scenes")
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def recipe(summary: dict) -> str:
    c = summary["config"]
    return (f"Mask R-CNN {c['detector']['name']} (torchvision engine), {c['data']['name']} "
            f"({c['data']['train_images']} training / {c['data']['val_images']} validation images of "
            f"{c['data']['canvas_size']} px), {c['batch']} images per process, {c['schedule']['max_iter']} "
            f"iterations (lr x0.1 at {list(c['schedule']['steps'])}), lr {c['optim']['base_lr']} per "
            f"{c['optim']['reference_batch']} images, BRN's and MABN's schedules scaled from "
            f"{c['norm'].get('schedule_reference_steps')} iterations")


def scaled_schedules(summaries: list[dict]) -> str:
    """Each layer's iteration counts as the runs used them (e.g. BRN's warm-up after scaling)."""
    layers = {}
    for s in summaries:
        for layer, options in (s.get("norm_schedule") or {}).items():
            layers.setdefault(layer, options)
    return "; ".join(f"{layer} " + ", ".join(f"{k} {v}" for k, v in options.items())
                     for layer, options in sorted(layers.items()))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="?", type=Path, default=Path("runs/scenes_study"))
    parser.add_argument("--results", type=Path, default=Path("results"))
    args = parser.parse_args(argv)

    summaries = kept_summaries(args.runs, args.results / "scenes_study_runs")
    if not summaries:
        raise SystemExit(f"error: no finished runs under {args.runs}: run bash scripts/scenes_study.sh first")
    steps = summaries[0]["config"]["schedule"]["max_iter"]
    runs = group(summaries, steps)
    text = "\n".join([
        "# Detection study: Mask R-CNN on generated scenes, from scratch and fine-tuned", "",
        f"Recipe (configs/experiment/scenes_study.yaml, fixed before the runs): {recipe(summaries[0])} "
        f"({scaled_schedules(summaries) or 'none recorded'}). "
        "BN, BRN, GN and MABN run one process x 2 images; SyncBN, and MABN beside it, 2 processes x 2 "
        "images (gloo; 4 images per iteration at twice the lr, linear scaling, as the paper's 8 GPUs x 2), "
        "so each claim compares runs of one size. Fine-tuning starts from Fashion-MNIST ResNet-18 "
        "classifiers trained with the run's own norm (configs/experiment/scenes_pretrain.yaml). Cells: "
        "mean ± half-width of the 95 % t-interval over seeds (range). The paper's numbers are COCO "
        "Mask R-CNN R50-FPN 2x: a different scale, for the direction of each comparison only.", "",
        "Commands: `bash scripts/scenes_study.sh`, then `python scripts/scenes_report.py`.", "",
        table(runs), "", *curve_table(runs), "![box and mask AP](scenes_study.png)", "",
        "## The paper's claims, one by one", "",
        "Differences in AP points with Welch's 95 % interval; 'within noise' means the interval holds 0.", "",
        *claims(runs),
    ])
    args.results.mkdir(parents=True, exist_ok=True)
    publish(text, args.results / "scenes_study.md")
    plot(runs, args.results / "scenes_study.png")


if __name__ == "__main__":
    main()

"""The detection study's report (Mask R-CNN on generated scenes): table, AP curve, plot and
one verdict per claim (the MABN paper's and its successors'), from the runs' summaries.

Only finished runs count. Each finished run's summary is kept in ``scenes_study_runs/<run>.json``
beside the table and read back from there, so a study spread over sessions or machines (whose
run folders are gone) still reports every run. Seed k gives every norm the same initialization
and data order, so two norms' runs pair by seed: each claim gives the paired 95 % interval
(its verdict) beside Welch's.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

from .intervals import difference, fmt_diff, paired_difference, verdict
from .papers import PAPER_COCO
from .price import PRICE_HEADER, PRICE_NOTE, price_cells
from .reporting import describe, keep_runs, load_summaries, provenance_table, publish
from .successors import CBN_EARLY_WINDOW

METRICS = ("box_AP", "box_AP50", "box_AP75", "mask_AP", "mask_AP50", "mask_AP75")
ORDER = [
    ("scratch", "bn", 1),
    ("scratch", "brn", 1),
    ("scratch", "gn", 1),
    ("scratch", "mabn", 1),
    ("scratch", "cbn", 1),
    ("scratch", "gn_ws", 1),
    ("scratch", "evonorm_s0", 1),
    ("scratch", "powernorm", 1),
    ("scratch", "mabn", 2),
    ("scratch", "syncbn", 2),
    ("finetune", "mabn", 2),
    ("finetune", "syncbn", 2),
]
DIAGNOSTICS = {"cbn_burnin8it": CBN_EARLY_WINDOW}  # label -> what it is (runs kept, in no claim)
CLAIMS = [  # text, (start, norm, processes) that should score higher or equal, the other, expectation
    (
        "BRN is better than BN from scratch (paper: 34.07 vs 32.38 box AP)",
        ("scratch", "brn", 1),
        ("scratch", "bn", 1),
        "positive",
    ),
    (
        "MABN is better than BRN from scratch (paper: 36.50 vs 34.07)",
        ("scratch", "mabn", 1),
        ("scratch", "brn", 1),
        "positive",
    ),
    (
        "MABN is better than BN from scratch (paper: 36.50 vs 32.38)",
        ("scratch", "mabn", 1),
        ("scratch", "bn", 1),
        "positive",
    ),
    (
        "MABN is within noise of SyncBN from scratch, both over 2 processes x 2 images (paper: 36.50 vs 36.80)",
        ("scratch", "mabn", 2),
        ("scratch", "syncbn", 2),
        "zero",
    ),
    (
        "Fine-tuned, MABN is within noise of SyncBN (paper: 38.42 vs 38.25)",
        ("finetune", "mabn", 2),
        ("finetune", "syncbn", 2),
        "zero",
    ),
    # the successors' papers (docs/papers.md, later small-batch remedies): other protocols, for the direction only
    (
        "CBN is better than BN at 2 images per process (Yao et al.: CBN closes the small-batch gap; COCO 1x "
        "with a frozen-BN backbone: CBN 38.4 vs SyncBN 38.5 box AP)",
        ("scratch", "cbn", 1),
        ("scratch", "bn", 1),
        "positive",
    ),
    (
        "CBN is within noise of MABN from scratch (no paper compares them)",
        ("scratch", "cbn", 1),
        ("scratch", "mabn", 1),
        "zero",
    ),
    (
        "GN+WS is better than GN from scratch (Qiao et al.; mmdetection Mask R-CNN R50-FPN 2x GN+WS 40.6 / 36.6)",
        ("scratch", "gn_ws", 1),
        ("scratch", "gn", 1),
        "positive",
    ),
    (
        "EvoNorm-S0 is better than GN from scratch (Liu et al.: S0 ahead of the batch-independent baselines; "
        "unverified figures)",
        ("scratch", "evonorm_s0", 1),
        ("scratch", "gn", 1),
        "positive",
    ),
    # MABN's relative (docs/papers.md): its paper is about transformers and has no detection figures
    (
        "PowerNorm is better than BN at 2 images per process (Shen et al.: its running quadratic mean "
        "and approximate backward fix BN's batch-statistics failure; no detection figures)",
        ("scratch", "powernorm", 1),
        ("scratch", "bn", 1),
        "positive",
    ),
    (
        "PowerNorm is within noise of MABN from scratch (no paper compares them)",
        ("scratch", "powernorm", 1),
        ("scratch", "mabn", 1),
        "zero",
    ),
]


def eval_curve(run_dir: Path) -> dict:
    """Box and mask AP at each evaluation of a run (its metrics.jsonl): {step: [box, mask]}."""
    path = run_dir / "metrics.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []
    return {str(r["step"]): [r["eval/box_AP"], r["eval/mask_AP"]] for r in records if "eval/box_AP" in r}


def kept_summaries(runs: Path, kept: Path) -> list[dict]:
    """The finished runs under ``runs`` (with their AP curves), kept in ``kept``, and the runs
    kept there before. A run cut short is left out."""
    found = {
        Path(s["path"]).name: s | {"curve": eval_curve(Path(s["path"]))}
        for s in load_summaries(runs)
        if s["steps"] == s["config"]["schedule"]["max_iter"]
    }
    return list(keep_runs(found, kept).values())


def kept_pretraining(summaries: list[dict], kept: Path) -> dict[str, dict]:
    """The classification runs the fine-tuned runs start from (the folder of their ``weights``),
    by run name: kept in ``kept`` from the run folders found now (a classifier older than the
    run), read back from there after. Runs kept before are not matched again: their ``weights``
    path may hold a newer classifier by now."""
    found = {}
    for s in summaries:
        weights = s["config"].get("weights")
        if not weights or "path" not in s:
            continue
        classifier = Path(weights).parent / "summary.json"
        if classifier.is_file() and classifier.stat().st_mtime <= (Path(s["path"]) / "summary.json").stat().st_mtime:
            found[classifier.parent.name] = json.loads(classifier.read_text())
    return keep_runs(found, kept)


def pretraining(classifiers: dict[str, dict]) -> str:
    """The fine-tuned runs' starting classifiers and their test error, as a clause."""
    return "".join(
        f"; {name}: {s['top1_error']:.2f} % top-1 error after {s['steps']} steps" for name, s in classifiers.items()
    )


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


def table(runs: dict, prices: dict[str, str]) -> str:
    """Each group's AP cells, the paper's, and the norm's price in memory (``mabn.studies.price``)."""
    lines = [
        "| start | norm | processes x images | seeds | "
        + " | ".join(METRICS)
        + " | paper box / mask AP |"
        + PRICE_HEADER,
        "|---" * (len(METRICS) + 6) + "|",
    ]
    for key in [k for k in ORDER if k in runs] + sorted(set(runs) - set(ORDER)):
        group_runs = runs[key]
        paper = PAPER_COCO.get(key[:2])
        lines.append(
            f"| {key[0]} | {key[1]} | {group_runs[0]['world_size']} x {group_runs[0]['batch']} | "
            f"{len(group_runs)} | "
            + " | ".join(cell([s[m] for s in group_runs]) for m in METRICS)
            + f" | {f'{paper[0]} / {paper[1]}' if paper else '-'} | {prices.get(key[1], '-')} |"
        )
    return "\n".join(lines)


def curve_table(runs: dict) -> list[str]:
    """Box AP at each evaluation, mean over seeds: whether a run had leveled off."""
    steps = sorted({int(k) for group_runs in runs.values() for s in group_runs for k in s.get("curve", {})})
    if not steps:
        return []
    lines = [
        "Box AP during training (mean over seeds; lr x0.1 at the schedule's steps):",
        "",
        "| start | norm | processes x images | " + " | ".join(f"{k} it" for k in steps) + " |",
        "|---" * (len(steps) + 3) + "|",
    ]
    for key in [k for k in ORDER if k in runs] + sorted(set(runs) - set(ORDER)):
        cells = []
        for step in steps:
            values = [s["curve"][str(step)][0] for s in runs[key] if str(step) in s.get("curve", {})]
            cells.append(f"{describe(values)['mean']:.1f}" if values else "-")
        lines.append(f"| {key[0]} | {key[1]} | {key[2]} x {runs[key][0]['batch']} | " + " | ".join(cells) + " |")
    return lines + [""]


def claims(runs: dict) -> list[str]:
    """One line per claim: box and mask AP differences, the paired interval over the seeds both
    cells ran (the verdict) and Welch's beside it."""
    out = []
    for text, better, other, expect in CLAIMS:
        if better not in runs or other not in runs:
            out.append(f"- **{text}.** Not run yet.")
            continue
        parts = []
        for metric in ("box_AP", "mask_AP"):
            by_seed = [{s["seed"]: s[metric] for s in runs[key]} for key in (better, other)]
            paired = paired_difference(*by_seed)
            welch = difference(list(by_seed[0].values()), list(by_seed[1].values()))
            parts.append(
                f"{metric.replace('_', ' ')} paired {fmt_diff(paired)} (Welch {fmt_diff(welch)}): "
                f"**{verdict(paired, expect)}**"
            )
        out.append(
            f"- **{text}.** {better[1]} minus {other[1]} ({better[0]}, {better[2]} vs {other[2]} "
            f"processes, n = {len(runs[better])}, {len(runs[other])}, {paired['n']} pairs): " + "; ".join(parts) + "."
        )
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
    return (
        f"Mask R-CNN {c['detector']['name']} (torchvision engine), {c['data']['name']} "
        f"({c['data']['train_images']} training / {c['data']['val_images']} validation images of "
        f"{c['data']['canvas_size']} px), {c['batch']} images per process, {c['schedule']['max_iter']} "
        f"iterations (lr x0.1 at {list(c['schedule']['steps'])}), lr {c['optim']['base_lr']} per "
        f"{c['optim']['reference_batch']} images, BRN's and MABN's schedules scaled from "
        f"{c['norm'].get('schedule_reference_steps')} iterations, CBN's burn-in a fraction of the run"
    )


def scaled_schedules(summaries: list[dict]) -> str:
    """Each layer's iteration counts as the runs used them (e.g. BRN's warm-up after scaling)."""
    layers = {}
    for s in summaries:
        for layer, options in (s.get("norm_schedule") or {}).items():
            layers.setdefault(layer, options)
    return "; ".join(
        f"{layer} " + ", ".join(f"{k} {v}" for k, v in options.items()) for layer, options in sorted(layers.items())
    )


def relatives(runs: dict) -> str:
    """ ", and PowerNorm," where the study ran it (the study before it did not)."""
    return ", and PowerNorm," if ("scratch", "powernorm", 1) in runs else ""


def write_report(run_folders: Path, results: Path) -> str:
    """Keep the finished runs under ``run_folders`` in ``results``/scenes_study_runs, then write
    ``scenes_study.md`` and ``scenes_study.png`` from every kept run; returns the markdown."""
    summaries = kept_summaries(run_folders, results / "scenes_study_runs")
    classifiers = kept_pretraining(summaries, results / "scenes_study_runs" / "pretraining")
    if not summaries:
        raise SystemExit(f"error: no finished runs under {run_folders}: run bash scripts/scenes_study.sh first")
    steps = summaries[0]["config"]["schedule"]["max_iter"]
    runs = group(summaries, steps)
    seeds = sorted({s["seed"] for s in summaries})
    text = "\n".join(
        [
            "# Detection study: Mask R-CNN on generated scenes, from scratch and fine-tuned",
            "",
            f"Recipe (configs/experiment/scenes_study.yaml, fixed before the runs): {recipe(summaries[0])} "
            f"({scaled_schedules(summaries) or 'none recorded'}). Seeds {seeds}; seed k gives every norm the same "
            "initialization and the same data order, so the runs pair by seed. "
            f"BN, BRN, GN, MABN and the successors{relatives(runs)} run one process x 2 images; SyncBN, and MABN "
            "beside it, "
            "2 processes x 2 images (gloo; 4 images per iteration at twice the lr, linear scaling, as the paper's "
            "8 GPUs x 2), so each claim compares runs of one size. Fine-tuning starts from Fashion-MNIST ResNet-18 "
            "classifiers trained with the run's own norm (configs/experiment/scenes_pretrain.yaml"
            f"{pretraining(classifiers)}). Cells: mean ± half-width of the 95 % t-interval over seeds (range). "
            "The paper's numbers are COCO Mask R-CNN R50-FPN 2x: a different scale, for the direction of each "
            "comparison only.",
            "",
            "Commands: `bash scripts/scenes_study.sh`, then `python scripts/scenes_report.py`.",
            "",
            table(runs, price_cells(summaries, sorted({key[1] for key in runs}))),
            "",
            PRICE_NOTE,
            "",
            *curve_table(runs),
            "![box and mask AP](scenes_study.png)",
            "",
            *(
                f"Diagnostic row {label}: {text}; in no claim.\n"
                for label, text in DIAGNOSTICS.items()
                if any(key[1] == label for key in runs)
            ),
            "## The claims, one by one",
            "",
            "Differences in AP points: the paired 95 % interval over the seeds both cells ran (the verdict), "
            "Welch's beside it; 'within noise' means the interval holds 0.",
            "",
            *claims(runs),
            "",
            "## Which code made the runs",
            "",
            provenance_table(summaries),
        ]
    )
    results.mkdir(parents=True, exist_ok=True)
    publish(text, results / "scenes_study.md")
    plot(runs, results / "scenes_study.png")
    return text

"""The Fashion-MNIST evidence study's report: tables, plots and one verdict per claim of the
paper, from its runs' summaries (what ``bash scripts/fashion_study.sh`` wrote).

``write_report`` writes ``fashion_study.md/.png`` (top-1 error vs normalization batch, mean and
95 % interval over seeds), ``fashion_ablation.md`` (MABN's components at normalization batch 2),
``fashion_probes.md/.png`` (the four batch statistics: trajectories and noise by normalization
batch), ``fashion_diagnostics.md`` (runs with their own ``norm.label``, if any) and ``REPORT.md``
(each claim with this study's difference and interval; the inference-cost tables if present).
"""

from __future__ import annotations

import json
import math
import re
import statistics
from collections import defaultdict
from pathlib import Path

from . import successors
from .intervals import difference, fmt_diff, verdict
from .papers import PAPER_IMAGENET
from .price import PRICE_HEADER, PRICE_NOTE, price_cells
from .reporting import describe, keep_runs, load_summaries, provenance_table, publish
from .successors import SUCCESSORS

BATCHES = (32, 16, 8, 4, 2, 1)
NORMS = ("bn", "brn", "gn", "mabn")
ABLATIONS = {  # label -> what differs from norm=mabn
    "mabn": "full MABN (SMA forward and backward, weight centralization, renormalization)",
    "mabn_fwd_batch": "forward: the normalization batch's own chi2 (no SMA)",
    "mabn_fwd_ema": "forward: the EMA of chi2 (after warm-up)",
    "mabn_bwd_batch": "backward: the normalization batch's own psi (no SMA)",
    "mabn_no_wc": "no weight centralization",
    "mabn_no_renorm": "no renormalization (r = 1)",
}
FORWARD, BACKWARD = ("mu", "sigma2"), ("g", "psi")


# -- statistics ------------------------------------------------------------------------
def fmt(d: dict) -> str:
    return f"{d['mean']:.2f} ± {d['ci95']:.2f}" if d["n"] > 1 else f"{d['mean']:.2f} (n=1)"


# -- runs ------------------------------------------------------------------------------
def label(summary: dict) -> str:
    return summary.get("label") or summary["norm"]


def errors_by_point(summaries: list[dict]) -> tuple[dict, list[tuple[int, int, float, float]]]:
    """{(label, normalization batch): {seed: top-1 error}}, with GN, which never reads the
    normalization batch, filled in at every batch from its batch-32 runs; and the GN runs made
    at another batch as (batch, seed, their error, the batch-32 run's error), the check."""
    points = defaultdict(dict)
    for s in summaries:
        points[(label(s), s["batch"])][s["seed"]] = s["top1_error"]
    gn = points.get(("gn", 32), {})
    checks = [
        (b, seed, e, gn[seed])
        for (name, b), runs in points.items()
        if name == "gn" and b != 32
        for seed, e in runs.items()
        if seed in gn
    ]
    for batch in BATCHES:
        if gn:
            points[("gn", batch)] = dict(gn)
    return points, checks


def errors(points, name, batch) -> list[float]:
    return [points[(name, batch)][s] for s in sorted(points.get((name, batch), {}))]


def batch_table(points, prices: dict[str, str]) -> str:
    """The study's errors by normalization batch, each norm's price in memory beside them
    (``mabn.studies.price``), and the paper's errors below."""
    header = ["| norm | " + " | ".join(f"batch {b}" for b in BATCHES) + " |", "|---" * (len(BATCHES) + 1) + "|"]
    lines = [header[0] + PRICE_HEADER, header[1] + "---|"]
    for name in NORMS:
        cells = [fmt(describe(v)) if (v := errors(points, name, b)) else "-" for b in BATCHES]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {prices.get(name, '-')} |")
    lines += [
        "",
        f"GN does not read the normalization batch: its row repeats its runs (see the claims). {PRICE_NOTE}",
        "",
        "The paper (ImageNet ResNet-50, docs/papers.md; GN: the GN paper at 32):",
        "",
        *header,
    ]
    for name in NORMS:
        lines.append(f"| {name} | " + " | ".join(str(PAPER_IMAGENET.get(name, {}).get(b, "-")) for b in BATCHES) + " |")
    return "\n".join(lines)


def plot_batches(points, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (ours, paper) = plt.subplots(1, 2, figsize=(10, 3.8))
    for name in NORMS:
        batches = [b for b in BATCHES if errors(points, name, b)]
        described = [describe(errors(points, name, b)) for b in batches]
        ours.errorbar(
            batches,
            [d["mean"] for d in described],
            yerr=[d["ci95"] for d in described],
            marker="o",
            capsize=3,
            label=name,
            color=f"C{NORMS.index(name)}",
        )
        reference = PAPER_IMAGENET.get(name, {})
        if len(reference) > 1:
            paper.plot(
                sorted(reference),
                [reference[b] for b in sorted(reference)],
                "o-",
                label=name,
                color=f"C{NORMS.index(name)}",
            )
    for axes, title in ((ours, "Fashion-MNIST (this study): mean, 95 % interval"), (paper, "ImageNet (paper)")):
        axes.set_xscale("log", base=2)
        axes.set_xticks(BATCHES, [str(b) for b in BATCHES])
        axes.invert_xaxis()
        axes.set_xlabel("normalization batch")
        axes.set_ylabel("top-1 error (%)")
        axes.set_title(title, fontsize=10)
        axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def diverged_runs(runs: Path) -> dict[str, str]:
    """{run name: the one-line reason} of the runs that stopped on a non-finite loss, paths
    relative to the project (not to the machine that ran them)."""
    here = f"{Path.cwd().resolve()}/"
    return {p.parent.name: p.read_text().strip().replace(here, "") for p in sorted(runs.glob("*/diverged.txt"))}


def ablation_table(points) -> str:
    full = errors(points, "mabn", 2)
    lines = ["| variant (normalization batch 2) | top-1 error | minus full MABN [95 %] |", "|---|---|---|"]
    rows = [("bn", 32, "BN at normalization batch 32"), ("bn", 2, "BN at normalization batch 2")]
    rows += [(name, 2, text) for name, text in ABLATIONS.items()]
    for name, batch, text in rows:
        values = errors(points, name, batch)
        if values:
            delta = fmt_diff(difference(values, full)) if full and name != "mabn" else "-"
            lines.append(f"| {name}@{batch}: {text} | {fmt(describe(values))} | {delta} |")
    return "\n".join(lines)


def diagnostics_table(points, base_norm: dict[str, str]) -> str | None:
    """Runs that are neither a norm of the curve nor an ablation (e.g. ``+norm.label=brn_ref60k``),
    each beside its base norm at the same normalization batch; None when there are none."""
    rows = sorted(p for p in points if p[0] not in NORMS and p[0] not in ABLATIONS)
    if not rows:
        return None
    lines = ["| diagnostic run | top-1 error | minus its base norm at the same batch [95 %] |", "|---|---|---|"]
    for name, batch in rows:
        values, base = errors(points, name, batch), errors(points, base_norm[name], batch)
        delta = f"{base_norm[name]}@{batch}: {fmt_diff(difference(values, base))}" if base else "-"
        lines.append(f"| {name}@{batch} | {fmt(describe(values))} | {delta} |")
    return "\n".join(lines)


# -- probes ----------------------------------------------------------------------------
def read_probes(run_dir: Path) -> list[dict]:
    """probes.jsonl of a run, the last record of each (step, layer, stat, batch) (a resumed
    run repeats the steps after its checkpoint)."""
    path = run_dir / "probes.jsonl"
    if not path.is_file():
        return []
    latest = {}
    for line in path.read_text().splitlines():
        r = json.loads(line)
        latest[(r["step"], r["layer"], r["stat"], r["batch"])] = r
    return sorted(latest.values(), key=lambda r: r["step"])


def relative_noise(records: list[dict]) -> dict[str, dict[int, list[float]]]:
    """{stat: {b: [ratio per (step, layer)]}}: RMS over groups and channels of a b-sample
    estimate's deviation from the whole batch's, over the RMS of the whole batch's value."""
    full = {(r["step"], r["layer"], r["stat"]): r["values"][0] for r in records if r["batch"] == max(BATCHES)}
    noise = defaultdict(lambda: defaultdict(list))
    for r in records:
        whole = full.get((r["step"], r["layer"], r["stat"]))
        if r["stat"] not in FORWARD + BACKWARD or whole is None or r["batch"] == max(BATCHES) or r["step"] == 1:
            continue
        scale = math.sqrt(statistics.fmean(v * v for v in whole))
        deviation = math.sqrt(statistics.fmean((v - w) ** 2 for group in r["values"] for v, w in zip(group, whole)))
        if scale > 0:
            noise[r["stat"]][r["batch"]].append(deviation / scale)
    return noise


def quartiles(values: list[float]) -> tuple[float, float, float]:
    q = statistics.quantiles(values, n=4) if len(values) > 1 else values * 3
    return q[0], statistics.median(values), q[2]


def noise_quartiles(records: list[dict]) -> dict[str, dict[int, list[float]]]:
    """{stat: {b: [first quartile, median, third quartile]}} of ``relative_noise``: the probe's
    aggregates that the report needs, small enough to keep with the run's summary."""
    return {
        stat: {b: list(quartiles(values)) for b, values in sorted(per_batch.items())}
        for stat, per_batch in relative_noise(records).items()
    }


def probe_table(noise) -> str:
    batches = sorted({b for per_batch in noise.values() for b in per_batch})
    lines = ["| statistic | " + " | ".join(f"b={b}" for b in batches) + " |", "|---" * (len(batches) + 1) + "|"]
    for stat in FORWARD + BACKWARD:
        cells = []
        for b in batches:
            low, mid, high = noise[stat][b]
            cells.append(f"{mid:.2f} ({low:.2f}-{high:.2f})")
        lines.append(f"| {stat} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_probes(runs: dict[str, list[dict]], noise, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(2, 3, figsize=(13, 6.5))
    stats_axes = {"mu": axes[0, 0], "sigma2": axes[0, 1], "g": axes[1, 0], "psi": axes[1, 1]}
    psi_axes = axes[0, 2].twinx()
    for run_name, records in runs.items():
        layer = records[0]["layer"] if records else None
        for stat, ax in stats_axes.items():
            for batch, style in ((32, "-"), (2, ":")):
                series = [
                    (r["step"], r["values"][0][0])
                    for r in records
                    if r["layer"] == layer and r["stat"] == stat and r["batch"] == batch
                ]
                if series:
                    ax.plot(*zip(*series), style, lw=1, label=f"{run_name}, b={batch}")
            ax.set_title(f"{stat}, layer {layer}, channel 0", fontsize=9)
        for stat, ax in (("chi2_sma", axes[0, 2]), ("ema_chi2", axes[0, 2]), ("psi_sma", psi_axes)):
            series = [(r["step"], r["values"][0][0]) for r in records if r["layer"] == layer and r["stat"] == stat]
            if series:
                ax.plot(*zip(*series), "--" if stat == "psi_sma" else "-", lw=1, label=f"{run_name}: {stat}")
    axes[0, 2].set_title("MABN's smoothed chi2 and its EMA (left), psi (right, dashed)", fontsize=9)
    psi_axes.legend(fontsize=6, loc="lower right")
    for stat in FORWARD + BACKWARD:
        batches = sorted(noise[stat])
        axes[1, 2].plot(batches, [noise[stat][b][1] for b in batches], "o-", label=stat)
    axes[1, 2].set_xscale("log", base=2)
    axes[1, 2].set_yscale("log")
    axes[1, 2].set_xlabel("normalization batch")
    axes[1, 2].set_title("noise of a b-sample estimate / size of the statistic", fontsize=9)
    for ax in axes.flat:
        ax.legend(fontsize=6)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


# -- claims ----------------------------------------------------------------------------
def claims(points, gn_checks, noise, inference: str | None) -> list[str]:
    """One markdown paragraph per claim of the paper, with this study's evidence."""
    get = lambda name, batch: errors(points, name, batch)
    out = []
    tests = [
        (
            "BN at normalization batch 2 is worse than BN at 32 (paper: 35.22 vs 23.41)",
            ("bn", 2),
            ("bn", 32),
            "positive",
        ),
        ("BRN at 2 is better than BN at 2 (paper: 30.29 vs 35.22)", ("bn", 2), ("brn", 2), "positive"),
        ("BRN at 4 is better than BN at 4 (paper: 26.88 vs 27.9)", ("bn", 4), ("brn", 4), "positive"),
        ("BRN at 2 is worse than MABN at 2 (paper: 30.29 vs 23.67)", ("brn", 2), ("mabn", 2), "positive"),
        ("MABN at 2 is within noise of BN at 32 (paper: 23.67 vs 23.41)", ("mabn", 2), ("bn", 32), "zero"),
        ("MABN at 2 is within noise of MABN at 32 (paper: 23.67 vs 23.54)", ("mabn", 2), ("mabn", 32), "zero"),
        ("MABN at 1 is within noise of MABN at 32 (paper: 23.73 vs 23.54)", ("mabn", 1), ("mabn", 32), "zero"),
        ("MABN at 2 is better than BN at 2 (paper: 23.67 vs 35.22)", ("bn", 2), ("mabn", 2), "positive"),
    ]
    for text, a, b, expect in tests:
        if get(*a) and get(*b):
            d = difference(get(*a), get(*b))
            out.append(
                f"- **{text}.** {a[0]}@{a[1]} minus {b[0]}@{b[1]}: {fmt_diff(d)} points "
                f"(n = {len(get(*a))}, {len(get(*b))}): **{verdict(d, expect)}**."
            )
    if get("gn", 32):
        same = all(e == ref for _, _, e, ref in gn_checks)
        checked = "; ".join(f"batch {b} seed {seed}: {e:.2f} vs {ref:.2f} at 32" for b, seed, e, ref in gn_checks)
        out.append(
            "- **GN is flat in the normalization batch (paper: 24.1 at every batch of the GN paper).** GN "
            "never reads it (per-sample statistics), so its runs at any normalization batch compute the "
            f"same thing: {fmt(describe(get('gn', 32)))} at every batch. "
            + (
                f"Checked by running it: {checked}: **{'supported' if same else 'not supported'}**."
                if gn_checks
                else "**Supported by construction** (no run at another batch yet)."
            )
        )
    if noise:
        median = {s: noise[s][2][1] for s in FORWARD + BACKWARD if 2 in noise.get(s, {})}
        if len(median) == 4:
            ok = min(median["g"], median["psi"]) > max(median["mu"], median["sigma2"])
            out.append(
                "- **The backward statistics are noisier at small normalization batch than the forward ones.** "
                "Median relative noise of a 2-sample estimate: "
                + ", ".join(f"{s} {v:.2f}" for s, v in median.items())
                + f": **{'supported' if ok else 'not supported'}** (fashion_probes.md)."
            )
    if inference:
        intervals = [
            (float(low), float(high))
            for low, high in re.findall(r"interval of the per-round ratio ([\d.]+)-([\d.]+)", inference)
        ]
        holds = "supported (within noise)" if all(low <= 1 <= high for low, high in intervals) else "not supported"
        out.append(
            f"- **MABN folded costs what BN costs at inference (authors: 237.88 iterations/s each).** {inference} "
            f"**{holds}**."
        )
    return out


PROBE_RUNS = ("bn-b32-s0", "bn-b2-s0", "mabn-b2-s0")  # the probe's plot; the noise table from the first


def kept_runs(run_folders: Path, kept: Path, probe_records: list[dict]) -> tuple[list[dict], dict[str, str], dict]:
    """The finished runs' summaries, the diverged runs' reasons and the probe's noise quartiles,
    from the run folders under ``run_folders`` (kept in ``kept``, one small JSON per run) and from
    the runs kept there before: a fresh clone regenerates the reports from ``kept`` alone. The
    successors' runs in the same folder belong to their own report (``successors``)."""
    found = {Path(s["path"]).name: s for s in load_summaries(run_folders) if s["norm"] not in SUCCESSORS}
    found |= {name: {"diverged": why} for name, why in diverged_runs(run_folders).items()}
    if probe_records:  # the probe records of PROBE_RUNS[0]
        found[PROBE_RUNS[0]] = found.get(PROBE_RUNS[0], {}) | {"probe_noise": noise_quartiles(probe_records)}
    runs = keep_runs(found, kept)
    noise = next((r["probe_noise"] for r in runs.values() if "probe_noise" in r), {})
    noise = {stat: {int(b): q for b, q in per_batch.items()} for stat, per_batch in noise.items()}
    diverged = {name: r["diverged"] for name, r in runs.items() if "diverged" in r}
    return [r for r in runs.values() if "top1_error" in r], diverged, noise


def write_report(run_folders: Path, results: Path) -> None:
    """Every report of the study, from the runs under ``run_folders`` and those kept in
    ``results``/fashion_study_runs, into ``results``."""
    probe_runs = {name: records for name in PROBE_RUNS if (records := read_probes(run_folders / name))}
    summaries, diverged, noise = kept_runs(
        run_folders, results / "fashion_study_runs", probe_runs.get(PROBE_RUNS[0], [])
    )
    if not summaries:
        raise SystemExit(f"error: no summary.json under {run_folders}: run bash scripts/fashion_study.sh first")
    results.mkdir(parents=True, exist_ok=True)
    points, gn_checks = errors_by_point(summaries)
    seeds = sorted({s["seed"] for s in summaries})
    publish(
        "Top-1 error (%) on Fashion-MNIST by normalization batch: mean ± half-width of the 95 % "
        f"t-interval over seeds (runs: {run_folders}).\n\n" + batch_table(points, price_cells(summaries, NORMS)),
        results / "fashion_study.md",
    )
    plot_batches(points, results / "fashion_study.png")
    if (results / "fashion_successor_runs").is_dir():  # the successors beside the new table
        successors.write_report(results)
    publish(
        "MABN ablation at normalization batch 2 (top-1 error %, mean ± 95 % half-width; difference to the "
        "full MABN with Welch's 95 % interval).\n\n"
        + ablation_table(points)
        + "".join(f"\n\nDiverged (not in the means): {name}: {why}" for name, why in diverged.items()),
        results / "fashion_ablation.md",
    )
    if noise:
        publish(
            "Relative noise of each batch statistic estimated from b samples (median and quartiles over "
            "steps and 3 layers, 4 channels each; RMS deviation from the 32-sample value over its RMS), "
            "from the BN run at normalization batch 32, seed 0:\n\n" + probe_table(noise),
            results / "fashion_probes.md",
        )
        if probe_runs:  # the trajectories need the run folders; a fresh clone keeps the committed plot
            plot_probes(probe_runs, noise, results / "fashion_probes.png")
    diagnostics = diagnostics_table(points, {label(s): s["norm"] for s in summaries})
    if diagnostics:
        publish(
            "Diagnostic runs (top-1 error %, mean ± 95 % half-width; difference to the base norm with "
            "Welch's 95 % interval).\n\n" + diagnostics,
            results / "fashion_diagnostics.md",
        )
    inference_path = results / "bench_inference_cpu.md"
    runtime_path = results / "bench_inference_onnxruntime_cpu.md"
    inference = (
        " ".join(
            path.read_text().strip().split("\n\n")[-1].replace("\n", " ")
            for path in (inference_path, runtime_path)
            if path.is_file()
        )
        or None
    )
    notes = results / "REPORT_notes.md"
    report = [
        "# Evidence report: the paper's claims on Fashion-MNIST",
        "",
        f"Generated by `python scripts/study_report.py {run_folders}` from the runs of `bash scripts/fashion_study.sh` "
        f"({len(summaries)} runs, seeds {seeds}). {recipe(summaries[0])}",
        "",
        "A difference is given as mean [95 % interval] (Welch); a claim is *supported* when the interval lies on "
        'its side of 0 (or contains 0, for "within noise").',
        "",
        "## Claims",
        "",
        *claims(points, gn_checks, noise, inference),
        "",
        "## Error vs normalization batch (fashion_study.md, fashion_study.png)",
        "",
        (results / "fashion_study.md").read_text(),
        "## Ablation at normalization batch 2 (fashion_ablation.md)",
        "",
        (results / "fashion_ablation.md").read_text(),
    ]
    if diagnostics:
        report += ["## Diagnostic runs (fashion_diagnostics.md)", "", (results / "fashion_diagnostics.md").read_text()]
    if noise:
        report += [
            "## Batch statistics (fashion_probes.md, fashion_probes.png)",
            "",
            (results / "fashion_probes.md").read_text(),
        ]
    successors_md = results / "fashion_successors.md"
    if successors_md.is_file():
        report += [
            "## MABN's successors on the same recipe (fashion_successors.md, fashion_successors.png)",
            "",
            successors_md.read_text(),
        ]
    if inference_path.is_file():
        report += ["## Inference cost (bench_inference_cpu.md)", "", inference_path.read_text()]
    if runtime_path.is_file():
        report += [
            "## Inference cost where deployment happens (bench_inference_onnxruntime_cpu.md)",
            "",
            runtime_path.read_text(),
        ]
    report += ["## Which code made the runs", "", provenance_table(summaries), ""]
    if notes.is_file():
        report += [notes.read_text()]
    publish("\n".join(report), results / "REPORT.md")


def recipe(summary: dict) -> str:
    """The training recipe, read from a run's resolved config."""
    c = summary.get("config", {})
    if not c:
        return ""
    optim, model = c["optim"], c["model"]
    return (
        f"Recipe, the same for every norm: {c['data']['name']} "
        f"({'crop + flip' if c['data'].get('augment') else 'no augmentation'}), "
        f"{model['name']} {model.get('options', {})}, per-device batch {c['per_device_batch']}, {c['epochs']} epochs, "
        f"SGD lr {optim['base_lr'] * c['per_device_batch'] / optim['reference_batch']:g} "
        f"(momentum {optim['momentum']}, "
        f"weight decay {optim['weight_decay']}), {optim['schedule']['name']} schedule, label smoothing "
        f"{optim['label_smoothing']}; BRN and MABN iteration schedules scaled from a "
        f"{c['norm'].get('schedule_reference_steps') or 'unscaled'}-step run (mabn/schedules.py)."
    )

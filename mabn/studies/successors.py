"""MABN's successors beside the Fashion-MNIST study: their top-1 errors by normalization batch
and one verdict per claim of their papers that the study can test, each difference with Welch's
95 % interval.

Every cell comes from per-run summaries kept in ``results/``: the successors' and the study's own
(bn, gn, mabn), so a reader can recompute every interval; the plot draws the study's rows from its
table ``results/fashion_study.md``.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

from .intervals import difference, fmt_diff, half_width, verdict
from .price import PRICE_HEADER, PRICE_NOTE, price_cells
from .reporting import describe, provenance_table, publish
from .tables import study_cells

BATCHES = (32, 16, 8, 4, 2, 1)
SUCCESSORS = ("cbn", "evonorm_b0", "evonorm_s0", "frn", "gn_ws")
# (claim, cell a, cell b, expected sign of a - b: "positive" or "zero"); a cell is (norm, batch)
CLAIMS = [
    (
        "GN+WS at 32 is within noise of BN at 32 (Qiao et al.: GN+WS 23.72 on ImageNet at any batch; "
        "BN at 32 23.41 in the MABN paper)",
        ("gn_ws", 32),
        ("bn", 32),
        "zero",
    ),
    ("GN+WS is better than GN (Qiao et al.: 23.72 vs GN 24.1)", ("gn", 32), ("gn_ws", 32), "positive"),
    (
        "CBN at 2 is within noise of BN at 32 (Yao et al.: CBN at small batch approaches BN at large batch)",
        ("cbn", 2),
        ("bn", 32),
        "zero",
    ),
    ("CBN at 2 is better than BN at 2 (Yao et al.)", ("bn", 2), ("cbn", 2), "positive"),
    ("CBN at 2 is within noise of MABN at 2 (no paper compares them)", ("cbn", 2), ("mabn", 2), "zero"),
    (
        "EvoNorm-S0 is better than GN (Liu et al.: S0 ahead of the batch-independent baselines; unverified figures)",
        ("gn", 32),
        ("evonorm_s0", 32),
        "positive",
    ),
    (
        "EvoNorm-B0 at 2 is better than BN at 2 (Liu et al.: B0 replaces BN-ReLU; no small-batch figure)",
        ("bn", 2),
        ("evonorm_b0", 2),
        "positive",
    ),
    (
        "FRN is within noise of BN at 32 (ppwwyyxx's replication: 24.0 vs 23.6, step lr; 23.2 vs 23.0, cosine)",
        ("frn", 32),
        ("bn", 32),
        "zero",
    ),
]
# the CBN runs made before 2026-12-04 (label cbn_burnin8it), kept in both studies as a diagnostic
CBN_EARLY_WINDOW = (
    "CBN with its window open from iteration 9 (burnin=8 read as iterations, the suite's setting "
    "until 2026-12-04; the authors' 8 counts epochs of 12, so their window opens for the last "
    "third of training)"
)
# diagnostic runs (their own norm.label, not the study's recipe): (cell, what it changes, cells to compare with)
DIAGNOSTICS = [
    (
        ("cbn_k0", 2),
        "CBN without its window (buffer_num=0: BN with the biased variance, eps outside the root, gamma starting at 1)",
        [("cbn", 2), ("bn", 2)],
    ),
    (("cbn_burnin8it", 2), CBN_EARLY_WINDOW, [("cbn", 2), ("cbn_k0", 2), ("bn", 2)]),
]


def load_runs(folder: Path) -> dict:
    """(norm label, normalization batch) -> top-1 errors of the summaries (``*.json``) in ``folder``
    (a diverged run, kept with its reason only, has none)."""
    errors = defaultdict(list)
    for path in sorted(folder.glob("*.json")):
        summary = json.loads(path.read_text())
        if "top1_error" in summary:
            errors[summary.get("label") or summary["norm"], summary["batch"]].append(summary["top1_error"])
    return dict(errors)


def cell_difference(runs: dict, a, b) -> dict | None:
    """a - b with Welch's interval, or None while a cell has no runs."""
    return difference(runs[a], runs[b]) if a in runs and b in runs else None


def report(
    runs: dict,
    seeds: int,
    rows=SUCCESSORS,
    claims=CLAIMS,
    diagnostics=DIAGNOSTICS,
    batches=BATCHES,
    what="Top-1 error (%) on Fashion-MNIST by normalization batch, the study's recipe",
    prices: dict[str, str] | None = None,
) -> str:
    """The table of ``rows`` (the successors by default; a family of norms), with each row's price
    in memory beside it where ``prices`` are given (``mabn.studies.price``), and one line per claim
    whose cells exist (others are listed as pending), then the diagnostic runs."""

    def cell(values):
        mean, n = sum(values) / len(values), len(values)
        text = f"{mean:.2f} ± {half_width(values):.2f}" if n > 1 else f"{mean:.2f}"
        return text if n == seeds else f"{text} (n={n})"

    lines = [
        f"{what}: mean ± 95 % half-width over seeds (n = seeds where not {seeds}).",
        "",
        "| norm | " + " | ".join(f"batch {b}" for b in batches) + " |" + (PRICE_HEADER if prices else ""),
        "|---" * (len(batches) + 1 + bool(prices)) + "|",
    ]
    diagnostic_rows = tuple(dict.fromkeys(cell[0] for cell, _, _ in diagnostics))
    for norm in tuple(rows) + diagnostic_rows:
        if any((norm, b) in runs for b in batches):
            name = norm if norm in rows else f"{norm} (diagnostic)"
            cells = [cell(runs[norm, b]) if (norm, b) in runs else "-" for b in batches]
            cells += [prices.get(norm, "-")] if prices else []
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Claims (a difference is mean [Welch's 95 % interval], in top-1 error points; the study's cells "
        "from its kept runs):",
        "",
    ]
    for title, a, b, expect in claims:
        d = cell_difference(runs, a, b)
        name = f"{a[0]}@{a[1]} minus {b[0]}@{b[1]}"
        if d is None:
            lines.append(f"- **{title}.** {name}: pending (no runs yet).")
        else:
            lines.append(f"- **{title}.** {name}: {fmt_diff(d)} points: **{verdict(d, expect)}**.")
    diagnostics = [(a, text, others) for a, text, others in diagnostics if a in runs]
    if diagnostics:
        lines += ["", "Diagnostic runs (a difference is mean [Welch's 95 % interval], in top-1 error points):", ""]
    for a, text, others in diagnostics:
        compared = [
            f"minus {b[0]}@{b[1]} {fmt_diff(d)}" for b in others if (d := cell_difference(runs, a, b)) is not None
        ]
        lines.append(f"- **{text}.** {a[0]}@{a[1]}: {cell(runs[a])}; " + "; ".join(compared) + ".")
    return "\n".join(lines)


def plot(runs: dict, study: dict, path: Path) -> list[str]:
    """Top-1 error by normalization batch: the study's norms (dashed, from its table) and the
    successors (solid, from their runs), each point mean and 95 % interval; a norm run at one
    batch only is one point. Returns the legend's labels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4.2))
    for index, norm in enumerate(sorted({n for n, _ in study})):
        batches = [b for b in BATCHES if (norm, b) in study]
        axes.errorbar(
            batches,
            [study[norm, b][0] for b in batches],
            yerr=[study[norm, b][1] for b in batches],
            fmt="o--",
            capsize=3,
            alpha=0.6,
            color=f"C{index}",
            label=f"{norm} (study)",
        )
    for index, norm in enumerate(SUCCESSORS, start=5):
        batches = [b for b in BATCHES if (norm, b) in runs]
        if batches:
            described = [describe(runs[norm, b]) for b in batches]
            axes.errorbar(
                batches,
                [d["mean"] for d in described],
                yerr=[d["ci95"] for d in described],
                fmt="s-",
                capsize=3,
                color=f"C{index}",
                label=norm,
            )
    axes.set_xscale("log", base=2)
    axes.set_xticks(BATCHES, [str(b) for b in BATCHES])
    axes.invert_xaxis()
    axes.set_xlabel("normalization batch")
    axes.set_ylabel("top-1 error (%)")
    axes.set_title("Fashion-MNIST, the study's recipe: mean, 95 % interval over seeds", fontsize=10)
    axes.legend(fontsize=8, ncol=2)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return axes.get_legend_handles_labels()[1]


def write_report(results: Path) -> None:
    """``fashion_successors.md`` and ``.png`` in ``results``, from the runs kept there (the
    successors' and the study's; a cell with fewer runs than the fullest one is marked with its
    n) and, for the plot, the study's table ``fashion_study.md``."""
    kept = results / "fashion_successor_runs"
    runs = load_runs(kept) | load_runs(results / "fashion_study_runs")
    if not runs:
        raise SystemExit(
            f"error: no run summaries in {kept} or fashion_study_runs: run "
            "python scripts/study_report.py runs/fashion_study first"
        )
    study = study_cells((results / "fashion_study.md").read_text())
    plot(runs, study, results / "fashion_successors.png")
    summaries = [json.loads(path.read_text()) for path in sorted(kept.glob("*.json"))]
    made_by = provenance_table(summaries)
    study_bn = [json.loads(path.read_text()) for path in sorted((results / "fashion_study_runs").glob("bn-*.json"))]
    labels = SUCCESSORS + tuple(dict.fromkeys(cell[0] for cell, _, _ in DIAGNOSTICS))
    prices = price_cells(summaries + study_bn, labels)
    publish(
        f"{report(runs, max(map(len, runs.values())), prices=prices)}\n\n{PRICE_NOTE}\n\n"
        "Generated by `python scripts/study_report.py` (or "
        f"`python scripts/successors_report.py`) from {kept.as_posix()}/, fashion_study_runs/ and "
        f"fashion_study.md.\n\nWhich code made the successors' runs:\n\n{made_by}",
        results / "fashion_successors.md",
    )

"""mabn.studies on made-up inputs: Welch and paired intervals, verdicts, the successors' table and
claims; and the committed successors' report regenerates unchanged from the committed run summaries."""

import json
import math
import os
import shutil
import subprocess
import sys

import pytest
from hydra_configs import ROOT

from mabn.studies import classification, intervals, relatives, successors, tables


def test_the_paired_interval_is_the_t_interval_of_the_per_seed_differences():
    a = {0: 30.1, 1: 31.0, 2: 29.5, 3: 30.8, 4: 30.2, 7: 99.0}  # seed 7 has no partner: left out
    b = {0: 29.0, 1: 30.2, 2: 28.9, 3: 29.5, 4: 29.6, 9: 0.0}
    d = [a[s] - b[s] for s in range(5)]
    mean, sd = sum(d) / 5, math.sqrt(sum((x - sum(d) / 5) ** 2 for x in d) / 4)
    half = 2.7764451051977987 * sd / math.sqrt(5)  # t(0.975, 4 degrees of freedom)
    paired = intervals.paired_difference(a, b)
    assert paired["n"] == 5 and paired["diff"] == pytest.approx(mean)
    assert (paired["low"], paired["high"]) == (pytest.approx(mean - half), pytest.approx(mean + half))
    # the seeds' shared part cancels: the paired interval is narrower than Welch's here
    welch = intervals.difference([a[s] for s in range(5)], [b[s] for s in range(5)])
    assert paired["high"] - paired["low"] < welch["high"] - welch["low"]
    one = intervals.paired_difference({0: 1.0}, {0: 0.5, 1: 2.0})
    assert one["n"] == 1 and one["diff"] == 0.5 and math.isnan(one["low"])
    assert intervals.paired_difference({0: 1.0}, {1: 1.0})["n"] == 0


def test_verdicts_and_a_single_seed():
    assert intervals.verdict({"diff": 1.0, "low": 0.2, "high": 1.8}, "positive") == "supported"
    assert (
        intervals.verdict({"diff": -1.0, "low": -1.8, "high": -0.2}, "positive") == "not supported (the opposite holds)"
    )
    assert intervals.verdict({"diff": 0.1, "low": -0.5, "high": 0.7}, "zero") == "supported (within noise)"
    one = intervals.difference([1.0], [2.0, 3.0])
    assert math.isnan(one["low"]) and intervals.verdict(one, "zero").startswith("not testable")


STUDY = """| norm | batch 32 | batch 2 |
|---|---|---|
| bn | 11.00 ± 0.50 | 13.00 ± 0.40 |
| gn | 13.00 ± 1.00 | 13.00 ± 1.00 |
| mabn | 10.80 ± 0.50 | 10.70 ± 0.40 |

| norm | batch 32 | batch 2 |
|---|---|---|
| bn | 23.41 | 35.22 |
"""


# the study's kept runs, as load_runs gives them (their means are the table's above)
STUDY_RUNS = {
    ("bn", 32): [10.8, 11.0, 11.2],
    ("bn", 2): [12.8, 13.0, 13.2],
    ("gn", 32): [12.6, 13.0, 13.4],
    ("mabn", 2): [10.5, 10.7, 10.9],
}


def test_the_study_table_cells_are_its_rows_not_the_papers():
    cells = tables.study_cells(STUDY)
    assert cells["bn", 2] == (13.0, 0.4) and ("bn", 1) not in cells and len(cells) == 6


def test_successors_table_and_claims_from_the_runs():
    runs = {("gn_ws", 32): [11.1, 11.3, 10.9], ("cbn", 2): [14.0, 14.4, 14.2], ("frn", 32): [12.0], **STUDY_RUNS}
    text = successors.report(runs, seeds=3)
    assert "| gn_ws | 11.10 ± 0.50 | - | - | - | - | - |" in text
    assert "| frn | 12.00 (n=1) |" in text
    lines = {line.split("** ")[1].split(":")[0]: line for line in text.splitlines() if line.startswith("- **")}
    assert len(lines) == len(successors.CLAIMS)
    assert lines["gn_ws@32 minus bn@32"].endswith("**supported (within noise)**.")
    assert lines["gn@32 minus gn_ws@32"].endswith("**supported**.")  # 13.0 vs 11.1
    assert lines["bn@2 minus cbn@2"].endswith("**not supported (the opposite holds)**.")  # 13.0 vs 14.2
    assert "not testable" in lines["frn@32 minus bn@32"]
    assert lines["bn@2 minus evonorm_b0@2"].endswith("pending (no runs yet).")
    assert "Diagnostic runs" not in text


def test_a_study_cell_is_compared_run_by_run_and_a_claim_without_runs_is_pending(tmp_path):
    (tmp_path / "bn-b32-s0.json").write_text(json.dumps({"norm": "bn", "batch": 32, "top1_error": 12.0}))
    (tmp_path / "bn-b32-s1.json").write_text(json.dumps({"norm": "bn", "batch": 32, "top1_error": 12.6}))
    (tmp_path / "bn-b1-s0.json").write_text(json.dumps({"diverged": "loss is nan at step 9"}))
    study_runs = successors.load_runs(tmp_path)
    assert study_runs == {("bn", 32): [12.0, 12.6]}
    runs = {("gn_ws", 32): [11.1, 11.3, 10.9], **study_runs}
    lines = successors.report(runs, seeds=3).splitlines()
    (line,) = [line for line in lines if "gn_ws@32 minus bn@32" in line]
    assert intervals.fmt_diff(intervals.difference([11.1, 11.3, 10.9], [12.0, 12.6])) in line
    (line,) = [line for line in lines if "gn@32 minus gn_ws@32" in line]  # no gn runs
    assert line.endswith("pending (no runs yet).")
    assert not any(line.startswith("| bn |") for line in lines)  # the study's norms have their rows in its own table


def test_the_successors_plot_draws_the_studys_norms_and_the_successors_with_runs(tmp_path):
    runs = {("gn_ws", 32): [11.1, 11.3, 10.9], ("cbn", 2): [14.0, 14.4, 14.2], ("cbn", 32): [12.0, 12.2, 11.9]}
    labels = successors.plot(runs, tables.study_cells(STUDY), tmp_path / "curve.png")
    assert labels == ["bn (study)", "gn (study)", "mabn (study)", "cbn", "gn_ws"]
    assert (tmp_path / "curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_diagnostic_run_is_compared_with_its_norm_and_the_studys_cell():
    runs = {("cbn", 2): [14.0, 14.4, 14.2], ("cbn_k0", 2): [13.0, 13.2, 12.8]}
    text = successors.report(runs | STUDY_RUNS, seeds=3)
    (line,) = [line for line in text.splitlines() if "cbn_k0@2" in line]
    assert "cbn_k0@2: 13.00 ± 0.50;" in line
    assert "minus cbn@2 -1.20 [" in line and "minus bn@2 +0.00 [" in line
    assert "| cbn_k0 (diagnostic) | - | - | - | - | 13.00 ± 0.50 | - |" in text.splitlines()  # its own row


def test_the_earlier_cbn_runs_are_a_diagnostic_beside_cbn_and_its_windowless_run():
    runs = {("cbn", 2): [13.0, 13.2, 12.8], ("cbn_k0", 2): [13.0, 13.2, 12.8], ("cbn_burnin8it", 2): [25.0, 26.0, 27.0]}
    text = successors.report(runs | STUDY_RUNS, seeds=3)
    (line,) = [line for line in text.splitlines() if "cbn_burnin8it@2" in line]
    assert (
        "window open from iteration 9" in line and "minus cbn@2 +13.00 [" in line and "minus cbn_k0@2 +13.00 [" in line
    )
    rows = [row.split(" |")[0] for row in text.splitlines() if row.startswith("| cbn")]
    assert rows == ["| cbn", "| cbn_k0 (diagnostic)", "| cbn_burnin8it (diagnostic)"]


def test_the_committed_successors_report_regenerates_unchanged(tmp_path):
    committed = ROOT / "results" / "fashion_successors.md"
    if not committed.is_file():
        pytest.skip("no successors' report committed yet")
    results = tmp_path / "results"  # a copy: the command writes its report where it reads
    for kept in ("fashion_successor_runs", "fashion_study_runs"):
        if (ROOT / "results" / kept).is_dir():
            shutil.copytree(ROOT / "results" / kept, results / kept)
    shutil.copy(ROOT / "results" / "fashion_study.md", results / "fashion_study.md")
    result = subprocess.run(
        [sys.executable, "scripts/successors_report.py", "--results", str(results)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    generated = (results / "fashion_successors.md").read_text()
    assert generated.replace(str(results), "results") == committed.read_text()
    assert (results / "fashion_successors.png").is_file()


def test_the_successors_report_without_kept_runs_says_which_command_makes_them(tmp_path):
    with pytest.raises(SystemExit, match="no run summaries in .*study_report.py runs/fashion_study first"):
        successors.write_report(tmp_path)


def test_the_classification_report_leaves_the_successors_runs_to_their_own_report(tmp_path):
    for name, norm in (("bn-b2-s0", "bn"), ("cbn-b2-s0", "cbn"), ("cbn_k0-b2-s0", "cbn")):
        (tmp_path / "runs" / name).mkdir(parents=True)
        (tmp_path / "runs" / name / "summary.json").write_text(json.dumps({"norm": norm, "top1_error": 12.0}))
    summaries, diverged, noise = classification.kept_runs(tmp_path / "runs", tmp_path / "kept", [])
    assert [s["norm"] for s in summaries] == ["bn"] and not diverged and not noise
    assert [p.name for p in (tmp_path / "kept").iterdir()] == ["bn-b2-s0.json"]


def test_the_classification_report_also_writes_the_successors_report_beside_its_new_table(tmp_path):
    runs, results = tmp_path / "runs", tmp_path / "results"
    for name, norm, batch, error in (
        ("bn-b32-s0", "bn", 32, 11.0),
        ("bn-b32-s1", "bn", 32, 11.4),
        ("mabn-b2-s0", "mabn", 2, 10.9),
        ("mabn-b2-s1", "mabn", 2, 10.5),
    ):
        (runs / name).mkdir(parents=True)
        (runs / name / "summary.json").write_text(
            json.dumps({"norm": norm, "label": norm, "batch": batch, "seed": int(name[-1]), "top1_error": error})
        )
    (results / "fashion_successor_runs").mkdir(parents=True)
    for seed, error in enumerate((11.9, 12.1)):
        (results / "fashion_successor_runs" / f"gn_ws-b32-s{seed}.json").write_text(
            json.dumps({"norm": "gn_ws", "label": "gn_ws", "batch": 32, "seed": seed, "top1_error": error})
        )
    classification.write_report(runs, results)
    text = (results / "fashion_successors.md").read_text()
    (line,) = [line for line in text.splitlines() if "gn_ws@32 minus bn@32" in line]
    assert intervals.fmt_diff(intervals.difference([11.9, 12.1], [11.0, 11.4])) in line
    assert (results / "fashion_successors.png").is_file()
    assert "## MABN's successors" in (results / "REPORT.md").read_text()


def test_the_committed_classification_report_regenerates_unchanged_from_its_kept_runs(tmp_path):
    if not (ROOT / "results" / "fashion_study_runs").is_dir():
        pytest.skip("the study's runs are not kept yet")
    results = tmp_path / "results"  # a copy: the command writes its reports where it reads
    shutil.copytree(ROOT / "results", results)
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "study_report.py"), "runs/fashion_study", "--results", str(results)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    for name in ("REPORT.md", "fashion_study.md", "fashion_ablation.md", "fashion_probes.md", "fashion_successors.md"):
        generated = (results / name).read_text().replace(str(results), "results")
        assert generated == (ROOT / "results" / name).read_text(), name


def test_the_committed_relatives_report_regenerates_unchanged(tmp_path):
    """From the kept runs alone (a fresh clone), memory column included."""
    committed = ROOT / "results" / "fashion_relatives.md"
    if not committed.is_file():
        pytest.skip("no relatives' report committed yet")
    results = tmp_path / "results"
    for kept in ("fashion_relative_runs", "fashion_study_runs", "fashion_vit_runs"):
        if (ROOT / "results" / kept).is_dir():
            shutil.copytree(ROOT / "results" / kept, results / kept)
    assert relatives.write_report(results) == committed.read_text().rstrip("\n")


def test_the_relatives_claims_from_made_up_runs(tmp_path):
    runs = {("bn", 32): [11.0, 11.2, 11.1], ("bn", 2): [13.0, 13.4, 13.2], ("mabn", 2): [10.8, 10.9, 11.0]}
    runs |= {("powernorm", 2): [10.9, 11.0, 10.8], ("powernorm", 32): [10.9, 11.1, 11.0]}
    text = successors.report(runs, 3, rows=relatives.RELATIVES, claims=relatives.CLAIMS, diagnostics=[])
    claims = [line for line in text.splitlines() if line.startswith("- **")]
    assert len(claims) == len(relatives.CLAIMS)
    assert "**PowerNorm at 2 is better than BN at 2" in text and "**supported**" in text
    assert text.count("pending (no runs yet)") == 4  # mimicnorm and bn_small_gamma have no runs
    assert "| powernorm | 11.00 ± 0.25 | - | - | - | 10.90 ± 0.25 | - |" in text and "| mimicnorm |" not in text

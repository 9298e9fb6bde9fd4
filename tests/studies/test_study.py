"""The evidence study: its statistics on made-up inputs, and a tiny version of its two commands
(the study's multirun, two seeds, a few steps; then scripts/study_report.py)."""

import json
import math
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
from hydra_configs import ROOT, sweep_jobs
from run_files import read_summary

from mabn.studies import classification
from mabn.studies.intervals import difference, verdict
from mabn.studies.reporting import describe


def test_describe_gives_mean_sample_std_and_the_t_interval():
    d = describe([1.0, 2.0, 3.0])
    assert d["mean"] == 2.0 and d["std"] == 1.0 and d["n"] == 3
    assert d["ci95"] == pytest.approx(4.302653 / math.sqrt(3), rel=1e-6)  # t(0.975, 2) * s / sqrt(n)
    assert math.isnan(describe([5.0])["ci95"])


def test_difference_is_welchs_interval():
    a, b = [10.0, 12.0, 14.0], [1.0, 2.0, 3.0, 4.0]
    d = difference(a, b)
    va, vb = statistics.variance(a) / 3, statistics.variance(b) / 4
    df = (va + vb) ** 2 / (va**2 / 2 + vb**2 / 3)  # Welch-Satterthwaite
    from scipy.stats import t

    half = t.ppf(0.975, df) * math.sqrt(va + vb)
    assert d["diff"] == pytest.approx(9.5)
    assert (d["low"], d["high"]) == pytest.approx((9.5 - half, 9.5 + half))
    assert verdict(d, "positive") == "supported"
    assert verdict(d, "zero") == "not supported"
    assert verdict(difference([1.0, 2.0], [1.5, 1.6]), "zero").startswith("supported")
    assert verdict(difference(b, a), "positive") == "not supported (the opposite holds)"
    assert verdict(difference([1.0, 2.0], [1.5, 1.6]), "positive").endswith("(within noise)")


def test_relative_noise_compares_each_group_with_the_whole_batch():
    records = [
        {"step": 5, "layer": "l", "stat": "g", "batch": 32, "values": [[1.0, -1.0]]},
        {"step": 5, "layer": "l", "stat": "g", "batch": 2, "values": [[1.0, -1.0], [3.0, 1.0]]},
        {"step": 1, "layer": "l", "stat": "g", "batch": 2, "values": [[9.0, 9.0]]},  # step 1 is left out
    ]
    noise = classification.relative_noise(records)
    # deviations 0, 0, 2, 2 -> RMS sqrt(2); size of the statistic: RMS of (1, -1) = 1
    assert noise["g"][2] == [pytest.approx(math.sqrt(2))]


def test_the_study_grid_is_the_papers_and_the_ablation_switches_one_component_each():
    jobs = sweep_jobs("train_imagenet", ["experiment=fashion_study"])
    grid = {(j[2].split("=")[1], int(j[3].split("=")[1])) for j in jobs}
    assert grid == {(n, b) for n in ("bn", "brn", "mabn") for b in (1, 2, 4, 8, 16, 32)} and len(jobs) == 54
    ablation = sweep_jobs("train_imagenet", ["experiment=fashion_ablation"])
    assert len(ablation) == 15 and {j[2] for j in ablation} == {
        f"norm={n}" for n in classification.ABLATIONS if n != "mabn"
    }


def train(*overrides):
    result = subprocess.run(
        [sys.executable, "train_imagenet.py", *overrides], cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]


TINY = [
    "max_steps=6",
    "data.train_samples_limit=256",
    "data.val_samples_limit=64",
    "probe.every=3",
    "eval_every_epochs=100",
]


@pytest.mark.multiprocess
def test_a_tiny_study_and_its_report(tmp_path):
    runs, results = tmp_path / "runs", tmp_path / "results"
    sweep = [f"hydra.sweep.dir={runs}", *TINY]
    train(
        "-m",
        "hydra/launcher=local_parallel",
        "experiment=fashion_study",
        "norm=bn,mabn",
        "batch=2,32",
        "seed=0,1",
        *sweep,
    )
    train("-m", "experiment=fashion_study", "norm=gn", "norm.options.num_groups=8", "batch=32,2", "seed=0", *sweep)
    train("-m", "experiment=fashion_ablation", "norm=mabn_no_renorm", "seed=0", *sweep)
    train(
        "-m",
        "experiment=fashion_study",
        "norm=mabn",
        "batch=2",
        "seed=0",
        "norm.schedule_reference_steps=null",
        "+norm.label=mabn_unscaled",
        *sweep,
    )  # a diagnostic run
    # the schedules scale with the run (6 steps of the paper's 600000) and GN ignores the batch
    mabn = read_summary(runs / "mabn-b2-s0")
    assert mabn["norm_schedule"] == {"MABN2d": {"warmup_iters": 1, "renorm_warmup_iters": 1}}
    assert read_summary(runs / "gn-b2-s0")["top1_error"] == read_summary(runs / "gn-b32-s0")["top1_error"]

    result = subprocess.run(
        [sys.executable, "scripts/study_report.py", str(runs), "--results", str(results)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    for name in (
        "fashion_study.md",
        "fashion_study.png",
        "fashion_ablation.md",
        "fashion_probes.md",
        "fashion_probes.png",
        "fashion_diagnostics.md",
        "REPORT.md",
    ):
        assert (results / name).is_file(), name
    errors = [read_summary(runs / f"bn-b2-s{seed}")["top1_error"] for seed in (0, 1)]
    expected = describe(errors)
    row = next(line for line in (results / "fashion_study.md").read_text().splitlines() if line.startswith("| bn |"))
    assert f"{expected['mean']:.2f} ± {expected['ci95']:.2f}" in row.split("|")[6]  # the batch-2 column
    report = (results / "REPORT.md").read_text()
    assert "MABN at 2 is within noise of BN at 32" in report and "mabn_no_renorm@2" in report
    assert "GN is flat" in report and "batch 2 seed 0" in report
    diagnostic = next(line for line in report.splitlines() if line.startswith("| mabn_unscaled@2 |"))
    assert "mabn@2: " in diagnostic and "mabn_unscaled" not in (results / "fashion_study.md").read_text()
    probes = [json.loads(line) for line in (runs / "bn-b32-s0" / "probes.jsonl").read_text().splitlines()]
    assert {r["step"] for r in probes} == {1, 3, 6}
    # a fresh clone has no run folders: the runs kept in results/ regenerate every table unchanged
    kept = sorted(p.name for p in (results / "fashion_study_runs").glob("*.json"))
    assert kept == sorted(f"{p.name}.json" for p in runs.iterdir() if (p / "summary.json").is_file())
    before = {name: (results / name).read_text() for name in ("REPORT.md", "fashion_probes.md", "fashion_ablation.md")}
    shutil.rmtree(runs)
    classification.write_report(runs, results)
    assert {name: (results / name).read_text() for name in before} == before


def test_a_run_that_diverges_is_recorded_and_the_sweep_goes_on(tmp_path):
    train(
        "-m",
        "experiment=fashion_study",
        "norm=bn,mabn",
        "batch=32",
        "seed=0",
        "optim.base_lr=1e30",
        f"hydra.sweep.dir={tmp_path}",
        *TINY,
    )  # both diverge: the second still runs
    for name in ("bn-b32-s0", "mabn-b32-s0"):
        assert (tmp_path / name / "diverged.txt").read_text().startswith("loss is"), name
        assert not (tmp_path / name / "summary.json").exists()
    assert set(classification.diverged_runs(tmp_path)) == {"bn-b32-s0", "mabn-b32-s0"}


def test_a_diverged_runs_path_is_reported_relative_to_the_project(tmp_path, monkeypatch):
    run = tmp_path / "runs" / "mabn-b2-s1"
    run.mkdir(parents=True)
    (run / "diverged.txt").write_text(
        f"loss is nan at step 4: the last good checkpoint is kept at {run}/checkpoint.pt\n"
    )
    monkeypatch.chdir(tmp_path)
    reasons = classification.diverged_runs(Path("runs"))
    assert reasons == {
        "mabn-b2-s1": "loss is nan at step 4: the last good checkpoint is kept at runs/mabn-b2-s1/checkpoint.pt"
    }

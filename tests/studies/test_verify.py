"""python -m mabn.verify: a kept run, rerun from its recorded config, is reproduced to the last digit;
a changed metric is named; a run of another process count is refused in one line."""

import json
import subprocess
import sys

import pytest
from hydra_configs import ROOT, compose_config

from mabn.engine.classification import train
from mabn.verify import main

TINY = ["data=synthetic", "workers=0", "per_device_batch=8", "batch=4", "norm=mabn", "max_steps=6"]


@pytest.fixture
def kept(tmp_path):
    summary = train(compose_config("train_imagenet", TINY), tmp_path / "study" / "mabn-b4-s0")
    path = tmp_path / "kept" / "mabn-b4-s0.json"
    path.parent.mkdir()
    path.write_text(json.dumps(summary))
    return path


def test_a_kept_run_is_rerun_and_reproduced_to_the_last_digit(kept, tmp_path, capsys):
    assert main([str(kept), "--runs-dir", str(tmp_path / "verify")]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith(f"[verify] {kept}: reproduced to the last digit (top1_error ")
    assert (tmp_path / "verify" / "kept" / "mabn-b4-s0" / "summary.json").is_file()


def test_two_runs_own_summaries_rerun_each_in_its_folder(kept, tmp_path, capsys):
    """Their files are both called summary.json: the reruns' folders are named after the runs."""
    other = train(compose_config("train_imagenet", [*TINY, "seed=1"]), tmp_path / "study" / "mabn-b4-s1")
    assert other["top1_error"] is not None
    summaries = [tmp_path / "study" / run / "summary.json" for run in ("mabn-b4-s0", "mabn-b4-s1")]
    assert main([*map(str, summaries), "--runs-dir", str(tmp_path / "verify")]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split(":")[0] for line in lines if line.startswith("[verify]")] == [f"[verify] {s}" for s in summaries]
    assert all((tmp_path / "verify" / "study" / run / "summary.json").is_file() for run in ("mabn-b4-s0", "mabn-b4-s1"))


def test_a_metric_that_differs_in_any_digit_is_named_and_fails(kept, tmp_path, capsys):
    summary = json.loads(kept.read_text())
    summary["top1_error"] += 1e-12
    kept.write_text(json.dumps(summary))
    assert main([str(kept), "--runs-dir", str(tmp_path / "verify")]) == 1
    assert f"NOT reproduced: top1_error {summary['top1_error']!r} -> " in capsys.readouterr().out


def test_a_run_of_two_processes_asks_for_torchrun_in_one_line(kept, tmp_path):
    summary = json.loads(kept.read_text()) | {"world_size": 2}
    kept.write_text(json.dumps(summary))
    result = subprocess.run(
        [sys.executable, "-m", "mabn.verify", kept, "--runs-dir", tmp_path / "verify"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 1 and result.stderr.strip().count("\n") == 0
    assert "start it with torchrun --nproc_per_node 2 -m mabn.verify" in result.stderr

"""Training killed with SIGKILL at random moments (the process group: loader workers too, as a
cluster kills a job) and relaunched each time ends exactly like an uninterrupted run."""

import contextlib
import os
import random
import signal
import subprocess
import sys
import time

import pytest
from hydra_configs import ROOT
from markers import needs_debian
from run_files import assert_same_run, read_metrics

pytestmark = pytest.mark.multiprocess
KILLS = 3


def mtime(path) -> int:
    try:
        return path.stat().st_mtime_ns
    except FileNotFoundError:  # none yet, or between the two renames of a checkpoint write
        return 0


def train(script, overrides, run_dir, log, timeout=300):
    with open(log, "w") as output:
        return subprocess.run(
            [sys.executable, script, *overrides, f"hydra.run.dir={run_dir}"],
            cwd=ROOT,
            stdout=output,
            stderr=subprocess.STDOUT,
            timeout=timeout,
        )


def killed_at_random(script, overrides, run_dir, rng, log, timeout=300):
    """Launch, let it write 1-6 new checkpoints, SIGKILL it a random fraction of a step later."""
    checkpoint, written = run_dir / "checkpoint.pt", rng.randint(1, 6)
    with open(log, "a") as stderr:
        process = subprocess.Popen(
            [sys.executable, script, *overrides, f"hydra.run.dir={run_dir}"],
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            start_new_session=True,
        )
    try:
        deadline, last = time.monotonic() + timeout, mtime(checkpoint)
        while written:
            assert process.poll() is None, f"ended before its kill: {open(log).read()[-2000:]}"
            assert time.monotonic() < deadline, "no checkpoint written"
            if mtime(checkpoint) != last:
                written, last = written - 1, mtime(checkpoint)
            time.sleep(0.002)
        time.sleep(rng.uniform(0, 0.03))
    finally:
        with contextlib.suppress(ProcessLookupError):  # it ended by itself: the assertion above says why
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    assert process.returncode == -signal.SIGKILL and not (run_dir / "summary.json").exists()


def check_killed_runs_end_like_a_straight_one(script, overrides, tmp_path, seed, keys):
    straight, killed, log = tmp_path / "straight", tmp_path / "killed", tmp_path / "stderr.log"
    assert train(script, overrides, straight, log).returncode == 0, log.read_text()[-2000:]
    rng = random.Random(seed)
    for _ in range(KILLS):
        killed_at_random(script, overrides, killed, rng, log)
    assert train(script, overrides, killed, log).returncode == 0, log.read_text()[-2000:]
    assert "resumed from step" in log.read_text()
    assert_same_run(straight, killed, keys)
    losses = {r["step"]: r["train/loss"] for r in read_metrics(straight) if "train/loss" in r}
    logged = [(r["step"], r["train/loss"]) for r in read_metrics(killed) if "train/loss" in r]
    assert all(loss == losses[step] for step, loss in logged)  # steps logged twice (replayed) included


@needs_debian
def test_classification_killed_three_times_ends_exactly_like_an_uninterrupted_run(tmp_path):
    # 200 steps of 8 augmented Fashion-MNIST images through 2 loader processes, a checkpoint after every step
    overrides = [
        "norm=mabn",
        "batch=2",
        "per_device_batch=8",
        "data.train_samples_limit=1600",
        "data.val_samples_limit=256",
        "model.options.widths=[8,16,16,16]",
        "epochs=1",
        "workers=2",
        "threads=1",
        "log_every_steps=1",
        "checkpoint_every_minutes=0",
        "seed=0",
    ]
    check_killed_runs_end_like_a_straight_one(
        "train_imagenet.py", overrides, tmp_path, 0, ["top1_error", "top5_error", "steps"]
    )


@needs_debian
def test_detection_killed_three_times_ends_exactly_like_an_uninterrupted_run(tmp_path):
    # torchvision Mask R-CNN, 24 iterations on 8 generated scenes, a checkpoint after every iteration
    overrides = [
        f"data.root={tmp_path / 'scenes'}",
        "data.train_images=8",
        "data.val_images=4",
        "workers=2",
        "threads=1",
        "norm=mabn",
        "max_steps=24",
        "log_every_steps=1",
        "checkpoint_every_minutes=0",
        "detector.rpn_pre_nms_test=50",
        "detector.detections_per_image=10",
        "seed=2",
    ]
    check_killed_runs_end_like_a_straight_one(
        "train_coco.py", overrides, tmp_path, 2, ["box_AP", "box_AP50", "mask_AP", "mask_AP50", "steps"]
    )

"""Training killed with SIGKILL at random moments (the process group: loader workers too, as a
cluster kills a job) and relaunched each time ends exactly like an uninterrupted run."""

import os
import random
import signal
import subprocess
import sys
import time

import torch

from hydra_configs import ROOT
from run_files import read_summary, train_losses
from test_data import needs_debian

KILLS = 3


def mtime(path) -> int:
    return path.stat().st_mtime_ns if path.is_file() else 0


def launch(script, overrides, run_dir):
    return subprocess.Popen([sys.executable, script, *overrides, f"hydra.run.dir={run_dir}"], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)


def run_with_kills(script, overrides, run_dir, seed, timeout=300):
    """Launch, wait for a new checkpoint, SIGKILL at a random moment up to 0.4 s later;
    ``KILLS`` times, then relaunch to the end. Returns the final process."""
    rng, checkpoint = random.Random(seed), run_dir / "checkpoint.pt"
    for kill in range(KILLS):
        before, process = mtime(checkpoint), launch(script, overrides, run_dir)
        deadline = time.monotonic() + timeout
        while mtime(checkpoint) == before:  # progress since the last kill
            assert process.poll() is None, f"launch {kill + 1} ended before its kill: {process.stderr.read()[-2000:]}"
            assert time.monotonic() < deadline, "no checkpoint written"
            time.sleep(0.01)
        time.sleep(rng.uniform(0, 0.4))
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        process.stderr.close()
        assert process.returncode == -signal.SIGKILL and not (run_dir / "summary.json").exists()
    return subprocess.run([sys.executable, script, *overrides, f"hydra.run.dir={run_dir}"], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


def assert_same_run(straight, killed, keys):
    a, b = read_summary(straight), read_summary(killed)
    assert [a[k] for k in keys] == [b[k] for k in keys]
    assert train_losses(straight) == train_losses(killed)  # every step, the replayed ones included
    final = lambda d: torch.load(d / "model_final.pt", weights_only=True)
    for key, value in final(straight).items():
        assert torch.equal(value, final(killed)[key]), key


@needs_debian
def test_classification_killed_three_times_ends_exactly_like_an_uninterrupted_run(tmp_path, seed=0):
    # 200 steps of 8 augmented Fashion-MNIST images through 2 loader processes, a checkpoint after every step
    overrides = ["norm=mabn", "batch=2", "per_device_batch=8", "data.train_samples_limit=1600",
                 "data.val_samples_limit=256", "model.options.widths=[8,16,16,16]", "epochs=1", "workers=2",
                 "threads=1", "log_every_steps=1", "checkpoint_every_minutes=0", f"seed={seed}"]
    straight = subprocess.run([sys.executable, "train_imagenet.py", *overrides, f"hydra.run.dir={tmp_path / 'a'}"],
                              cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert straight.returncode == 0, straight.stderr[-2000:]
    final = run_with_kills("train_imagenet.py", overrides, tmp_path / "b", seed)
    assert final.returncode == 0, final.stderr[-2000:]
    assert "resumed from step" in final.stdout
    assert_same_run(tmp_path / "a", tmp_path / "b", ["top1_error", "top5_error", "steps"])


@needs_debian
def test_detection_killed_three_times_ends_exactly_like_an_uninterrupted_run(tmp_path):
    # torchvision Mask R-CNN, 16 iterations on 8 generated scenes, a checkpoint after every iteration
    overrides = [f"data.root={tmp_path / 'scenes'}", "data.train_images=8", "data.val_images=4", "workers=2",
                 "threads=1", "norm=mabn", "max_steps=16", "log_every_steps=1", "checkpoint_every_minutes=0",
                 "detector.rpn_pre_nms_test=50", "detector.detections_per_image=10", "seed=2"]
    straight = subprocess.run([sys.executable, "train_coco.py", *overrides, f"hydra.run.dir={tmp_path / 'a'}"],
                              cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert straight.returncode == 0, straight.stderr[-2000:]
    final = run_with_kills("train_coco.py", overrides, tmp_path / "b", seed=2)
    assert final.returncode == 0, final.stderr[-2000:]
    assert "resumed from step" in final.stdout
    assert_same_run(tmp_path / "a", tmp_path / "b", ["box_AP", "box_AP50", "mask_AP", "mask_AP50", "steps"])

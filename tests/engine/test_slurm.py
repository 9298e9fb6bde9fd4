"""SLURM sweeps through hydra-submitit-launcher (hydra/launcher=slurm_local, which inherits
configs/hydra/launcher/slurm.yaml) on the local test cluster of `bash scripts/slurm_local.sh
start`: a multirun with W&B offline records, a job requeued twice (SIGTERM from `scontrol
requeue`, then submitit's time-limit signal USR2) that ends exactly like an uninterrupted run,
and a 2-task job that trains as one gloo DDP run.

Without a cluster: the launcher config and the ImageNet batch-size sweep expand as intended.
The cluster tests skip where SLURM is not installed, and fail where it is but the local cluster
is not up (CI starts it)."""

import os
import re
import shutil
import subprocess
import sys
import time
from itertools import product
from pathlib import Path

import pytest
import torch
from hydra_configs import ROOT, compose_config, sweep_jobs
from omegaconf import OmegaConf
from run_files import read_summary, train_losses
from wandb_records import history_and_config

from mabn.config import check_normalization_batch

PARTITION = "debug"  # configs/hydra/launcher/slurm_local.yaml
# a small, fast classification run: ~0.05 s per step on one CPU, ~10 s of start-up per job
TINY = [
    "data=synthetic",
    "data.image_size=16",
    "data.val_samples=32",
    "model.options.widths=[32,32,32,32]",
    "workers=0",
    "per_device_batch=8",
]
# the SLURM jobs inherit this environment (sbatch --export=ALL); one thread, as SLURM's one CPU
ENV = dict(os.environ, OMP_NUM_THREADS="1", HYDRA_FULL_ERROR="1", WANDB_SILENT="true")


def compose_with_hydra(overrides):
    return compose_config("train_imagenet", overrides, return_hydra_config=True)


# -- configs, no cluster needed -------------------------------------------------------


def test_slurm_launcher_runs_one_task_per_gpu_and_requeues():
    cfg = compose_with_hydra(["hydra/launcher=slurm", "experiment=paper_imagenet", "data.root=/x"])
    launcher = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    assert launcher["_target_"].endswith("SlurmLauncher")
    assert launcher["gpus_per_node"] == launcher["tasks_per_node"] == 8 and launcher["nodes"] == 1
    assert launcher["max_num_timeout"] > 0 and launcher["signal_delay_s"] >= 120
    assert launcher["additional_parameters"]["requeue"] is True
    assert launcher["submitit_folder"] == "runs/imagenet/imagenet-resnet50/.submitit/%j"
    four = compose_with_hydra(["hydra/launcher=slurm", "hydra.launcher.gpus_per_node=4"])
    assert four.hydra.launcher.tasks_per_node == 4
    local = OmegaConf.to_container(compose_with_hydra(["hydra/launcher=slurm_local"]).hydra.launcher, resolve=True)
    assert (local["partition"], local["gpus_per_node"], local["tasks_per_node"]) == (PARTITION, None, 1)
    assert local["max_num_timeout"] > 0 and local["additional_parameters"] == launcher["additional_parameters"]
    # the entry point finds the launcher plugin and the sweep (what `-m` would launch)
    result = subprocess.run(
        [
            sys.executable,
            "train_imagenet.py",
            "hydra/launcher=slurm",
            "experiment=imagenet_batch_sweep",
            "data.root=/x",
            "--cfg",
            "hydra",
        ],
        cwd=ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "hydra_submitit_launcher.submitit_launcher.SlurmLauncher" in result.stdout
    assert "norm: bn,brn,gn,mabn" in result.stdout and "batch: 1,2,4,8,16,32" in result.stdout


def test_imagenet_batch_sweep_expands_to_the_paper_grid():
    base = ["experiment=imagenet_batch_sweep", "data.root=/x"]
    cfg = compose_with_hydra(base)
    assert cfg.hydra.sweep.dir == "runs/imagenet/imagenet-resnet50" and cfg.hydra.sweep.subdir == cfg.run_name
    jobs = sweep_jobs("train_imagenet", base)
    grid = set()
    for job in jobs:
        job_cfg = compose_config("train_imagenet", job)
        resolved = OmegaConf.to_container(job_cfg, resolve=True)
        check_normalization_batch(job_cfg, job_cfg.per_device_batch)
        assert (
            resolved["model"]["name"],
            resolved["data"]["name"],
            resolved["per_device_batch"],
            resolved["epochs"],
        ) == ("resnet50", "imagenet", 32, 120)
        assert (resolved["logger"]["name"], resolved["logger"]["group"]) == ("wandb", "imagenet-batch-sweep")
        assert resolved["run_name"] == f"{resolved['norm']['name']}-b{resolved['batch']}-s0"
        grid.add((resolved["norm"]["name"], resolved["batch"]))
    assert len(jobs) == len(grid) == 24
    assert grid == set(product(["bn", "brn", "gn", "mabn"], [1, 2, 4, 8, 16, 32]))


# -- the local cluster ----------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster():
    """The local test cluster, up: skip without SLURM, fail if it is installed but not running."""
    if shutil.which("sinfo") is None:
        pytest.skip(
            "SLURM is not installed (no sinfo): `bash scripts/slurm_local.sh start` installs and "
            "starts the local test cluster"
        )
    config = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True, timeout=60)
    if config.returncode != 0:
        pytest.fail(
            f"the local SLURM cluster is not up ({config.stderr.strip()}): "
            "start it with `bash scripts/slurm_local.sh start`"
        )
    if not re.search(r"^ClusterName\s*=\s*local$", config.stdout, re.M):
        pytest.skip(
            "SLURM answers for a cluster other than the local test cluster of scripts/slurm_local.sh: "
            "these tests only submit there"
        )
    states = subprocess.run(
        ["sinfo", "-h", "-p", PARTITION, "-o", "%T"], capture_output=True, text=True, timeout=60
    ).stdout.split()
    if not set(states) & {"idle", "mixed", "allocated", "completing"}:
        reasons = subprocess.run(["sinfo", "-R"], capture_output=True, text=True, timeout=60).stdout
        pytest.fail(
            f"no usable node in partition {PARTITION!r} (states: {states}): restart the cluster with "
            f"`bash scripts/slurm_local.sh start`\n{reasons}"
        )


def tail(path: Path, lines: int = 40) -> str:
    """The last lines of a log, with tqdm's carriage-return redraws reduced to their final state."""
    text = path.read_text(errors="replace") if path.is_file() else "(missing)"
    return "\n".join(line.rsplit("\r", 1)[-1] for line in text.splitlines()[-lines:])


class Sweep:
    """`train_imagenet.py -m hydra/launcher=slurm_local` into its own sweep dir; the driver blocks
    until every job is done."""

    def __init__(self, directory: Path, overrides):
        self.directory, self.driver_log = directory, directory.with_suffix(".driver.log")
        with open(self.driver_log, "w") as log:
            self.driver = subprocess.Popen(
                [
                    sys.executable,
                    "train_imagenet.py",
                    "-m",
                    "hydra/launcher=slurm_local",
                    f"hydra.sweep.dir={directory}",
                    *overrides,
                ],
                cwd=ROOT,
                env=ENV,
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def job_dirs(self) -> list[Path]:
        """.submitit/<job id>/ of each job (a job array's folder holds no job pickle)."""
        return sorted(path.parent for path in self.directory.glob(".submitit/*/*_submitted.pkl"))

    def logs(self) -> str:
        parts = [f"==> {self.driver_log} <==\n{tail(self.driver_log)}"]
        for path in sorted(self.directory.glob(".submitit/*/*_log.*")):
            parts.append(f"==> {path} <==\n{tail(path)}")
        return "\n".join(parts)

    def summary(self, run_name: str) -> dict:
        path = self.directory / run_name / "summary.json"
        assert path.is_file(), f"no {path}\n{self.logs()}"
        return read_summary(path.parent)

    def check_running(self):
        if self.driver.poll() is not None:
            pytest.fail(f"the sweep ended early (rc {self.driver.returncode})\n{self.logs()}")

    def wait(self, timeout: float):
        try:
            self.driver.wait(timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the sweep was not done after {timeout:.0f} s\n{self.logs()}")
        assert self.driver.returncode == 0, self.logs()

    def stop(self):
        """After a failure: kill the driver and cancel the jobs (a sweep that succeeded is left alone)."""
        if self.driver.poll() == 0:
            return
        if self.driver.poll() is None:
            self.driver.kill()
            self.driver.wait()
        for job in self.job_dirs():
            subprocess.run(["scancel", job.name], capture_output=True, timeout=60)


@pytest.fixture
def sweep(cluster, tmp_path):
    """``sweep(*overrides)`` starts a sweep in tmp_path/sweep (one per test)."""
    started = []

    def start(*overrides):
        started.append(Sweep(tmp_path / "sweep", overrides))
        return started[-1]

    yield start
    for each in started:
        each.stop()


def poll(condition, timeout: float, sweep: Sweep, what: str, interval: float = 0.5):
    """Wait for ``condition()`` to return a true value (and return it) while the sweep runs."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        sweep.check_running()
        time.sleep(interval)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}\n{sweep.logs()}")


def checkpoint_step(run_dir: Path) -> int:
    try:
        return torch.load(run_dir / "checkpoint.pt", map_location="cpu", weights_only=False)["step"]
    except (FileNotFoundError, EOFError, RuntimeError):
        return 0


@pytest.mark.slurm
@pytest.mark.multiprocess
def test_sweep_runs_every_job_on_the_cluster_and_logs_to_wandb_offline(sweep):
    run = sweep(
        *TINY,
        "norm=bn,mabn",
        "batch=2,4",
        "max_steps=6",
        "log_every_steps=2",
        "logger=wandb",
        "logger.mode=offline",
        "logger.group=slurm-test",
    )
    run.wait(timeout=240)
    assert len(run.job_dirs()) == 4, run.logs()  # one SLURM job each
    for norm, batch in product(["bn", "mabn"], [2, 4]):
        run_dir = run.directory / f"{norm}-b{batch}-s0"
        summary = run.summary(run_dir.name)
        assert (summary["norm"], summary["batch"], summary["steps"], summary["world_size"]) == (norm, batch, 6, 1)
        run_id = (run_dir / "wandb_run_id.txt").read_text()
        (run_file,) = run_dir.glob(f"wandb/offline-run-*-{run_id}/run-{run_id}.wandb")
        history, config = history_and_config(run_file)
        assert (config["norm"]["name"], config["batch"], config["logger"]["group"]) == (norm, batch, "slurm-test")
        train = [h for h in history if "train/loss" in h]
        assert [h["step"] for h in train] == [2, 4, 6]
        assert all("train/lr" in h and "train/images_per_second" in h for h in train)
        assert any(h.get("eval/top1_error") == pytest.approx(summary["top1_error"]) for h in history)
        assert any(h.get("final/eval/top1_error") == pytest.approx(summary["top1_error"]) for h in history)


@pytest.mark.slurm
@pytest.mark.multiprocess
def test_requeued_job_resumes_and_ends_exactly_like_an_uninterrupted_run(sweep, tmp_path):
    # checkpoints every 0.6 s; no evaluation before the end; 400 steps ~ 25 s of training; each
    # step 2 accumulated micro-batches of 4 (the 8 images of TINY's step)
    overrides = [
        *TINY,
        "per_device_batch=4",
        "accumulate_steps=2",
        "norm=mabn",
        "batch=2",
        "seed=1",
        "epochs=100",
        "eval_every_epochs=100",
        "max_steps=400",
        "log_every_steps=10",
        "checkpoint_every_minutes=0.01",
    ]
    straight = tmp_path / "straight"
    with open(tmp_path / "straight.log", "w") as log:  # the reference, alongside the SLURM job
        reference = subprocess.Popen(
            [sys.executable, "train_imagenet.py", *overrides, f"hydra.run.dir={straight}"],
            cwd=ROOT,
            env=ENV,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        run = sweep(*overrides)
        run_dir = run.directory / "mabn-b2-s1"
        first = poll(lambda: checkpoint_step(run_dir), 180, run, "the first checkpoint")
        (job,) = run.job_dirs()
        stdout = job / f"{job.name}_0_log.out"
        resumes = lambda: re.findall(r"resumed from step (\d+) of 400", stdout.read_text())

        # preemption / `scontrol requeue`: SIGTERM, checkpoint, SLURM requeues the job
        requeue = subprocess.run(["scontrol", "requeue", job.name], capture_output=True, text=True, timeout=60)
        assert requeue.returncode == 0, requeue.stderr
        poll(resumes, 180, run, "the job to resume after scontrol requeue")
        (after_sigterm,) = map(int, resumes())
        poll(lambda: checkpoint_step(run_dir) > after_sigterm, 60, run, "a checkpoint after the resume")

        # the time-limit signal (sbatch --signal=USR2@signal_delay_s), sent now: checkpoint, then
        # submitit's handler requeues the job (max_num_timeout). A real time limit is not used:
        # slurmctld sends the signal on its own ~30 s ticks, so with timeout_min=1 it came 17 s
        # into one attempt and 5 s into the next (still starting up, no step done: no progress),
        # and every round costs a minute plus the ~25 s requeue delay.
        signal = subprocess.run(["scancel", "--signal=USR2", job.name], capture_output=True, text=True, timeout=60)
        assert signal.returncode == 0, signal.stderr
        run.wait(timeout=240)
        assert reference.wait(timeout=240) == 0, tail(tmp_path / "straight.log")
    finally:
        if reference.poll() is None:
            reference.kill()
            reference.wait()

    steps = [int(k) for k in resumes()]
    assert len(steps) == 2 and 0 < first <= after_sigterm < steps[1] < 400, run.logs()
    assert "stopped by signal SIGTERM after saving a checkpoint" in (job / f"{job.name}_0_log.err").read_text()
    assert re.search(r"Requeued job \S+ \(2 remaining timeouts\)", stdout.read_text()), run.logs()
    a = read_summary(straight)
    b = run.summary(run_dir.name)
    assert (a["top1_error"], a["top5_error"], a["steps"]) == (b["top1_error"], b["top5_error"], b["steps"])
    assert b["steps"] == 400 and train_losses(straight) == train_losses(run_dir)
    final_a = torch.load(straight / "model_final.pt", weights_only=True)
    final_b = torch.load(run_dir / "model_final.pt", weights_only=True)
    assert all(torch.equal(value, final_b[key]) for key, value in final_a.items())


@pytest.mark.slurm
@pytest.mark.multiprocess
def test_two_tasks_per_node_train_one_ddp_run(sweep):
    run = sweep(*TINY, "norm=syncbn", "max_steps=4", "log_every_steps=2", "hydra.launcher.tasks_per_node=2")
    run.wait(timeout=240)
    (job,) = run.job_dirs()
    assert "global_rank=1(2)" in (job / f"{job.name}_1_log.out").read_text(), run.logs()
    summary = run.summary("syncbn-b32-s0")
    assert (summary["world_size"], summary["steps"]) == (2, 4)
    assert sorted(train_losses(run.directory / "syncbn-b32-s0")) == [2, 4]  # rank 0 alone logs

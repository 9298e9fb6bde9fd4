"""train_imagenet.py: config groups, short runs per norm, exact resume, errors, NaN stop,
W&B offline records and 2-process DDP."""

import glob
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from hydra_configs import ROOT, base_norms, compose_config, experiments_of, group_options
from omegaconf import OmegaConf
from PIL import Image
from run_files import assert_same_run, read_metrics, read_summary, train_losses
from torchrun import torchrun
from wandb_records import history_and_config, run_group

import mabn.norms
from mabn.config import ConfigError
from mabn.engine.classification import ClassificationRun, train
from mabn.engine.loggers import RunLogger
from mabn.serialization import load_weights_only

SYNTHETIC = ["data=synthetic", "workers=0", "log_every_steps=2", "per_device_batch=8"]


def cli(*overrides, env=None, timeout=300):
    """Run the entry point as a user would; returns the completed process."""
    return subprocess.run(
        [sys.executable, "train_imagenet.py", *overrides],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.parametrize("group", ["norm", "model", "data", "optim", "logger", "experiment"])
def test_every_option_of_every_group_composes_and_resolves(group):
    options = group_options(group)
    if group == "experiment":  # the others are train_coco.py's (tests/detectors/test_train_coco.py)
        options = experiments_of("train_imagenet")
        assert set(options) | set(experiments_of("train_coco")) == set(group_options("experiment"))  # none broken
    for option in options:
        needs_root = ["data.root=/somewhere"] if "imagenet" in option else []
        cfg = compose_config("train_imagenet", [f"{group}={option}", *needs_root])
        resolved = OmegaConf.to_container(cfg, resolve=True)
        assert resolved["batch"] >= 1
        if group == "norm":  # variants of a norm (ablations, presets) carry their own label
            assert resolved["norm"].get("label", resolved["norm"]["name"]) == option


def test_batch_is_the_normalization_batch_and_sets_the_mabn_window():
    for batch, window in ((1, 32), (2, 16), (8, 4), (32, 1)):
        cfg = compose_config("train_imagenet", ["norm=mabn", f"batch={batch}"])
        assert cfg.norm.options.normalization_batch == batch
        assert cfg.norm.options.sma_window == window
        assert cfg.per_device_batch == 32
    paper = compose_config("train_imagenet", ["experiment=paper_imagenet", "data.root=/x"])
    assert (paper.model.name, paper.data.name, paper.norm.name, paper.batch, paper.epochs) == (
        "resnet50",
        "imagenet",
        "mabn",
        2,
        120,
    )
    assert paper.optim.schedule.milestones_epochs == [30, 60, 90] and paper.optim.label_smoothing == 0.1


@pytest.mark.parametrize("norm", base_norms())
def test_a_few_steps_per_norm_on_synthetic_data(norm, tmp_path):
    cfg = compose_config("train_imagenet", [*SYNTHETIC, f"norm={norm}", "batch=2", "max_steps=4"])
    summary = train(cfg, tmp_path)
    assert summary["steps"] == 4 and summary["label"] == norm
    assert 0 <= summary["top1_error"] <= 100 and summary["images_per_second"] > 0
    assert read_summary(tmp_path)["top1_error"] == summary["top1_error"]
    records = read_metrics(tmp_path)
    assert [r["step"] for r in records if "train/loss" in r] == [2, 4]
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=False)["step"] == 4


def test_a_run_says_what_it_runs_its_time_estimate_its_result_and_where_the_summary_is(tmp_path, capsys):
    cfg = compose_config(
        "train_imagenet", [*SYNTHETIC, "norm=mabn", "batch=2", "max_steps=30", "model.options.widths=[8,8,8,8]"]
    )
    summary = train(cfg, tmp_path)
    lines = capsys.readouterr().out.strip().splitlines()
    start = next(line for line in lines if line.startswith("[imagenet]"))
    assert (
        "synthetic / small_resnet / norm mabn at normalization batch 2" in start and f"run folder {tmp_path}" in start
    )
    assert "steps 1-30, eager BN/BRN/MABN kernels" in start and "estimate follows after 25 steps" in start
    estimate = next(line for line in lines if line.startswith("[estimate]"))
    assert re.search(
        r"\d+ ms per step over steps 6-25 on this machine: about [\d.]+ min for the 5 steps left", estimate
    )
    assert (
        lines[-1] == f"[done] top1_error {summary['top1_error']:.2f}, top5_error {summary['top5_error']:.2f}; "
        f"summary: {tmp_path / 'summary.json'}"
    )


def test_the_same_command_twice_gives_the_same_summary_and_weights(tmp_path):
    # two processes, augmented Fashion-MNIST through 2 loader workers: bit for bit on one CPU
    # (with the compiled kernels too: the resume test below compares two processes that use them)
    overrides = [
        "norm=mabn",
        "batch=2",
        "per_device_batch=8",
        "data.train_samples_limit=128",
        "data.val_samples_limit=64",
        "model.options.widths=[8,16,16,16]",
        "epochs=1",
        "workers=2",
    ]
    env = {**os.environ, "MABN_FUSED": "0"}
    for run in ("a", "b"):
        assert cli(*overrides, f"hydra.run.dir={tmp_path / run}", env=env).returncode == 0
    assert_same_run(tmp_path / "a", tmp_path / "b", ["top1_error", "top5_error"])


def test_resume_from_a_mid_epoch_checkpoint_ends_exactly_like_an_uninterrupted_run(tmp_path):
    # Fashion-MNIST with random crops and flips, 32 images / batch 8 = 4 steps per epoch,
    # 2 loader processes; preempted (SIGTERM) at step 6, in the middle of the second epoch. BRN
    # (its schedule's step counter) with the compiled norm kernels; MABN's eager resume after
    # SIGKILL: tests/engine/test_fault_injection.py
    overrides = [
        "data.train_samples_limit=32",
        "data.val_samples_limit=64",
        "per_device_batch=8",
        "workers=2",
        "norm=brn",
        "batch=2",
        "epochs=3",
        "log_every_steps=1",
        "seed=3",
    ]
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    env = {**os.environ, "MABN_FUSED": "1"}
    assert cli(*overrides, f"hydra.run.dir={straight}", env=env).returncode == 0
    first = cli(*overrides, f"hydra.run.dir={interrupted}", "debug.preempt_at_step=6", env=env)
    assert first.returncode != 0 and "stopped by signal SIGTERM" in first.stderr
    assert torch.load(interrupted / "checkpoint.pt", weights_only=False)["step"] == 6
    assert not (interrupted / "summary.json").exists()
    second = cli(*overrides, f"hydra.run.dir={interrupted}", env=env)
    assert second.returncode == 0, second.stderr
    assert_same_run(straight, interrupted, ["top1_error", "top5_error", "steps"])


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["batch=3"], "error: batch=3 does not divide per_device_batch=32: use batch in [1, 2, 4, 8, 16, 32]"),
        (
            ["norm.name=mabnx"],
            "error: unknown norm 'mabnx': choose one of bn, brn, cbn, evonorm_b0, evonorm_s0, frn, gn, gn_ws, in, ln, "
            "mabn, mimicnorm, powernorm, syncbn",
        ),
        (["data=imagenet", "data.root=/no/imagenet"], "error: ImageNet folder /no/imagenet/train missing"),
        (
            ["data.root=/no/fashion"],
            "error: Fashion-MNIST train-images-idx3-ubyte[.gz] and train-labels-idx1-ubyte[.gz] "
            "not found in /no/fashion",
        ),
        (["data=imagenet"], "error: data=imagenet needs data.root=/path/to/imagenet"),
        (["per_device_batch=0"], "error: per_device_batch=0 is out of range: it must be > 0"),
        (["optim.base_lr=-0.1"], "error: optim.base_lr=-0.1 is out of range: it must be > 0"),
        (
            ["data=imagenet", "data.root=/x", "data.max_bad_fraction=null"],
            "error: data.max_bad_fraction=None is out of range: give a number >= 0 and < 1",
        ),
    ],
)
def test_bad_input_fails_with_one_line_naming_the_fix(overrides, message, tmp_path):
    result = cli(*overrides, f"hydra.run.dir={tmp_path}", timeout=120)
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1].startswith(message), result.stderr
    assert "Traceback" not in result.stderr


def imagenet_folder(root, bad_train_images: int):
    """A tiny ImageNet layout (2 classes, 8 train and 4 val JPEGs) with some undecodable train files."""
    rng = np.random.default_rng(0)
    for split, count in (("train", 4), ("val", 2)):
        for wnid in ("n01440764", "n01443537"):
            (root / split / wnid).mkdir(parents=True)
            for i in range(count):
                Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(
                    root / split / wnid / f"{i}.JPEG"
                )
    bad = sorted((root / "train").glob("*/*.JPEG"))[:bad_train_images]
    for path in bad:
        path.write_bytes(path.read_bytes()[:200])  # a copy cut short: the header parses, the pixels do not
    return bad


IMAGENET = [
    "data=imagenet",
    "model.options.widths=[8,8,8,8]",
    "per_device_batch=4",
    "batch=2",
    "workers=2",
    "epochs=1",
    "log_every_steps=1",
]


def test_a_dataset_with_an_unreadable_image_trains_and_reports_it(tmp_path):
    bad = imagenet_folder(tmp_path / "imagenet", bad_train_images=1)
    result = cli(
        *IMAGENET,
        f"data.root={tmp_path / 'imagenet'}",
        "data.max_bad_fraction=0.2",
        f"hydra.run.dir={tmp_path / 'run'}",
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"warning: cannot read image {bad[0]}" in result.stdout
    assert read_summary(tmp_path / "run")["steps"] == 2


def test_too_many_unreadable_images_stop_the_run_with_one_line(tmp_path):
    bad = imagenet_folder(tmp_path / "imagenet", bad_train_images=2)
    result = cli(
        *IMAGENET,
        f"data.root={tmp_path / 'imagenet'}",
        "data.max_bad_fraction=0.1",
        f"hydra.run.dir={tmp_path / 'run'}",
    )
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    # 1 or 2: both loader workers may have met their bad file by the time the first error arrives
    assert re.match(
        rf"error: [12] of 8 images cannot be read \(e\.g\. {bad[0].parent}/\d\.JPEG\): more than "
        r"data\.max_bad_fraction=0\.1 allows",
        last,
    ), result.stderr
    assert "Traceback" not in result.stderr


def test_unknown_norm_group_lists_the_available_ones(tmp_path):
    result = cli("norm=mabnx", f"hydra.run.dir={tmp_path}", timeout=120)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"error: norm=mabnx is not a norm of this suite: choose one of {', '.join(sorted(group_options('norm')))}"
    ]


def test_a_run_kept_by_its_study_is_skipped_and_the_others_of_the_sweep_run(tmp_path):
    """A study relaunched in a fresh clone (its run folders gone) skips the runs kept in results/."""
    kept = tmp_path / "kept"
    kept.mkdir()
    (kept / "bn-b2-s0.json").write_text('{"top1_error": 12.5}')
    result = cli(
        "-m",
        *SYNTHETIC,
        "max_steps=2",
        "norm=bn",
        "batch=2",
        "seed=0,1",
        f"kept_runs={kept}",
        f"hydra.sweep.dir={tmp_path / 'runs'}",
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"[skip] bn-b2-s0: kept in {kept / 'bn-b2-s0.json'}" in result.stdout
    assert not (tmp_path / "runs" / "bn-b2-s0" / "summary.json").exists()
    assert (tmp_path / "runs" / "bn-b2-s1" / "summary.json").is_file()
    # where the summaries are kept does not change what a run computes: its checkpoint still resumes
    again = cli(
        *SYNTHETIC,
        "max_steps=2",
        "norm=bn",
        "batch=2",
        "seed=1",
        f"kept_runs={tmp_path / 'elsewhere'}",
        f"hydra.run.dir={tmp_path / 'runs' / 'bn-b2-s1'}",
    )
    assert again.returncode == 0, again.stderr[-2000:]


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    cfg = compose_config("train_imagenet", [*SYNTHETIC, "batch=8", "checkpoint_every_minutes=0", "max_steps=6"])
    run = ClassificationRun(cfg, tmp_path)
    criterion = run.criterion
    run.criterion = lambda logits, labels: criterion(logits, labels) * (float("nan") if run.step == 2 else 1.0)
    run.logger = RunLogger(tmp_path, True)
    try:
        with pytest.raises(FloatingPointError, match=r"loss is nan at step 2: stopped before updating the weights"):
            run.fit()
    finally:
        run.logger.finish()
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    assert state["step"] == 2
    for key, value in run.model.named_parameters():  # the weights of step 2, untouched by the NaN step
        assert torch.equal(state["model"][key], value), key


def test_non_finite_weights_are_never_checkpointed(tmp_path):
    cfg = compose_config(
        "train_imagenet", [*SYNTHETIC, "batch=8", "optim.base_lr=inf", "checkpoint_every_minutes=0", "max_steps=6"]
    )
    with pytest.raises(FloatingPointError, match=r"weights are not finite after step 1: not saving them"):
        train(cfg, tmp_path)
    assert not (tmp_path / "checkpoint.pt").exists()


def test_wandb_offline_run_holds_the_logged_metrics_and_config(tmp_path):
    cfg = compose_config(
        "train_imagenet",
        [
            *SYNTHETIC,
            "logger=wandb",
            "logger.mode=offline",
            "norm=mabn",
            "batch=4",
            "max_steps=4",
            "logger.group=test-sweep",
        ],
    )
    summary = train(cfg, tmp_path)
    run_id = (tmp_path / "wandb_run_id.txt").read_text()
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=False)["wandb_run_id"] == run_id
    (run_file,) = glob.glob(str(tmp_path / "wandb" / f"offline-run-*-{run_id}" / f"run-{run_id}.wandb"))
    history, config = history_and_config(run_file)
    losses = [h for h in history if "train/loss" in h]
    assert [h["step"] for h in losses] == [2, 4] and all(
        "train/lr" in h and "train/images_per_second" in h for h in losses
    )
    assert any(h.get("final/eval/top1_error") == pytest.approx(summary["top1_error"]) for h in history)
    assert config["norm"]["name"] == "mabn" and config["norm"]["options"]["sma_window"] == 8
    assert config["batch"] == 4 and config["logger"]["group"] == "test-sweep"
    assert run_group(run_file) == "test-sweep"
    assert config["provenance"] == summary["provenance"]


def test_a_sweeps_wandb_runs_share_the_sweeps_folder_as_group_by_default(tmp_path):
    cfg = compose_config(
        "train_imagenet", [*SYNTHETIC, "batch=4", "logger=wandb", "logger.mode=offline", "max_steps=2"]
    )
    run_dir = tmp_path / "fashion-sweep" / cfg.run_name
    train(cfg, run_dir)
    run_id = (run_dir / "wandb_run_id.txt").read_text()
    (run_file,) = glob.glob(str(run_dir / "wandb" / f"offline-run-*-{run_id}" / f"run-{run_id}.wandb"))
    assert run_group(run_file) == "fashion-sweep"


def test_summary_and_checkpoint_record_the_commit_versions_and_machine(tmp_path):
    summary = train(compose_config("train_imagenet", [*SYNTHETIC, "batch=4", "max_steps=2"]), tmp_path)
    recorded = summary["provenance"]
    head = subprocess.run(["git", "-C", ROOT, "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert recorded["commit"] == head and isinstance(recorded["dirty"], bool)
    assert recorded["torch"] == torch.__version__.split("+")[0] or recorded["torch"] == torch.__version__
    assert recorded["python"] == ".".join(map(str, sys.version_info[:3]))
    assert recorded["timm"] and recorded["torchvision"] and "detectron2" in recorded
    assert recorded["device"].startswith("CPU") and recorded["threads"] == torch.get_num_threads()
    assert read_summary(tmp_path)["provenance"] == recorded
    assert load_weights_only(tmp_path / "checkpoint.pt")["provenance"] == recorded


@pytest.mark.multiprocess
def test_two_process_ddp_on_cpu_runs_every_job_of_a_multirun(tmp_path):
    result = torchrun(
        "train_imagenet.py",
        "-m",
        *SYNTHETIC,
        "norm=syncbn,mabn",
        "batch=4",
        "max_steps=4",
        f"hydra.sweep.dir={tmp_path}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    for norm in ("syncbn", "mabn"):
        run_dir = tmp_path / f"{norm}-b4-s0"
        summary = read_summary(run_dir)
        assert summary["world_size"] == 2 and summary["steps"] == 4
        assert len([r for r in read_metrics(run_dir) if "train/loss" in r]) == 2  # rank 0 alone logs


def preempted_run(tmp_path, steps=6, preempt_at=4):
    """A synthetic run stopped at ``preempt_at`` with a checkpoint at every step before it."""
    overrides = [*SYNTHETIC, "batch=2", "norm=mabn", f"max_steps={steps}", "checkpoint_every_minutes=0"]
    with pytest.raises(SystemExit, match="stopped by signal SIGTERM"):
        train(compose_config("train_imagenet", [*overrides, f"debug.preempt_at_step={preempt_at}"]), tmp_path)
    return compose_config("train_imagenet", overrides)


def test_an_unreadable_newest_checkpoint_resumes_from_the_previous_one_exactly(tmp_path, capsys):
    cfg = preempted_run(tmp_path / "cut")
    straight = train(cfg, tmp_path / "straight")
    newest = tmp_path / "cut" / "checkpoint.pt"
    assert torch.load(tmp_path / "cut" / "checkpoint.prev.pt", weights_only=False)["step"] == 3
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])  # a copy cut short
    capsys.readouterr()
    resumed = train(cfg, tmp_path / "cut")
    out = capsys.readouterr().out
    warnings = [line for line in out.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and str(newest) in warnings[0] and "skipping it" in warnings[0], out
    assert "resumed from step 3 of 6" in out
    assert (resumed["top1_error"], resumed["steps"]) == (straight["top1_error"], straight["steps"])
    assert train_losses(tmp_path / "cut") == train_losses(tmp_path / "straight")


def test_no_readable_checkpoint_starts_over_and_says_so(tmp_path, capsys):
    cfg = preempted_run(tmp_path)
    for name in ("checkpoint.pt", "checkpoint.prev.pt"):
        (tmp_path / name).write_bytes(b"not a checkpoint")
    capsys.readouterr()
    summary = train(cfg, tmp_path)
    out = capsys.readouterr().out
    assert f"warning: no readable checkpoint in {tmp_path}: starting the run over" in out
    assert summary["steps"] == 6 and "resumed from" not in out


class Payload:
    """Stands for anything a pickle could construct (and run code while doing so)."""


def test_a_checkpoint_that_is_more_than_tensors_is_refused_with_one_line(tmp_path):
    cfg = compose_config("train_imagenet", [*SYNTHETIC, "batch=2", "max_steps=2"])
    torch.save({"model": Payload()}, tmp_path / "checkpoint.pt")
    with pytest.raises(
        ConfigError, match=r"checkpoint.pt holds more than tensors and plain Python values, so it is not loaded"
    ):
        train(cfg, tmp_path)


def test_bn_small_gamma_starts_gammas_at_a_tenth_and_trains_them_at_a_hundredth_of_the_lr(tmp_path):
    cfg = compose_config("train_imagenet", [*SYNTHETIC, "norm=bn_small_gamma", "batch=4", "max_steps=2"])
    run = ClassificationRun(cfg, tmp_path)
    gammas = [m.weight for m in run.model.modules() if isinstance(m, mabn.norms.BatchNorm2d)]
    assert gammas and all(torch.all(g == 0.1) for g in gammas)  # each block's last too: timm's zero-init is off
    others, small = run.optimizer.param_groups
    assert small["lr"] == pytest.approx(others["lr"] / 100) and {id(p) for p in small["params"]} == set(map(id, gammas))
    assert len(others["params"]) + len(small["params"]) == len(list(run.model.parameters()))


def test_stop_at_step_is_the_full_run_cut_there_and_continues_to_it_exactly(tmp_path):
    """A run stopped at step 3 of 6 keeps the 6-step schedules (not those of a 3-step run, as
    max_steps=3 gives), and relaunched without the stop it ends as the run never stopped."""
    overrides = [*SYNTHETIC, "log_every_steps=1", "batch=2", "norm=cbn", "optim.schedule.name=cosine"]
    run = lambda folder, *more: train(compose_config("train_imagenet", [*overrides, *more]), tmp_path / folder)
    straight = run("straight", "max_steps=6")
    stopped = run("cut", "max_steps=6", "stop_at_step=3")
    assert stopped["steps"] == 3 and stopped["norm_schedule"] == straight["norm_schedule"]
    assert run("short", "max_steps=3")["norm_schedule"] != straight["norm_schedule"]  # CBN's burn-in: 8/12 of the run
    assert train_losses(tmp_path / "cut") == {k: v for k, v in train_losses(tmp_path / "straight").items() if k <= 3}
    run("cut", "max_steps=6")
    assert_same_run(tmp_path / "straight", tmp_path / "cut", ["top1_error", "top5_error", "steps"])


def test_a_checkpoint_from_before_the_one_format_reads_as_it(tmp_path):
    """detectron2 runs stored their step under "iteration": such a checkpoint resumes at that step."""
    from mabn.config import resolved
    from mabn.engine.checkpoint import save_atomic
    from mabn.engine.run import load_run_checkpoint

    cfg = compose_config("train_imagenet", SYNTHETIC)
    save_atomic({"config": resolved(cfg), "iteration": 7}, tmp_path / "checkpoint.pt")
    state = load_run_checkpoint(tmp_path, cfg)
    assert state["step"] == 7 and "iteration" not in state

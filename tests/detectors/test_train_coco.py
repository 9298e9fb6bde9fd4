"""train_coco.py with the torchvision engine: configs, a few iterations per norm on a tiny
generated scene set, AP evaluation, norm placement, exact resume and errors."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra_configs import ROOT, compose_config, detection_norms, experiments_of, group_options, sweep_jobs
from omegaconf import OmegaConf
from run_files import assert_same_run, read_metrics, read_summary
from torchrun import torchrun
from torchvision.models.detection.rpn import RPNHead

import mabn
from mabn.engine.coco import torchvision_engine
from mabn.engine.coco.torchvision_engine import DetectionRun, train
from mabn.norms.centralization import is_centralized
from mabn.studies.eval_statistics import detection_backbone_input, load_detection_checkpoint
from mabn.wiring import conv_norm_pairs

COCO_EXPERIMENTS = sorted(set(experiments_of("train_coco")) - set(experiments_of("train_imagenet")))
AP_KEYS = ("box_AP", "box_AP50", "box_AP75", "mask_AP", "mask_AP50", "mask_AP75")


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    """Overrides pointing at a tiny fashion_scenes set (generated once for the module)."""
    root = tmp_path_factory.mktemp("scenes")
    return [
        f"data.root={root}",
        "data.train_images=8",
        "data.val_images=4",
        "workers=0",
        "log_every_steps=1",
        "detector.rpn_pre_nms_test=50",
        "detector.detections_per_image=10",
    ]


def cli(*overrides, timeout=600, env=None):
    return subprocess.run(
        [sys.executable, "train_coco.py", *overrides],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


@pytest.mark.parametrize(
    "group,option",
    [(g, o) for g in ("engine", "detector", "optim", "schedule") for o in group_options(g)]
    + [("data", "coco"), ("data", "fashion_scenes")]
    + [("experiment", e) for e in COCO_EXPERIMENTS],
)
def test_every_coco_config_option_composes_and_resolves(group, option):
    extra = ["data.root=/coco"] if option in ("coco", *COCO_EXPERIMENTS) else []
    extra += ["weights=/w.pt"] if option == "paper_coco_finetune" else []
    cfg = OmegaConf.to_container(compose_config("train_coco", [f"{group}={option}", *extra]), resolve=True)
    assert cfg["normalization_batch"] is None and cfg["batch"] == 2


def test_paper_coco_settings():
    cfg = compose_config("train_coco", ["experiment=paper_coco_scratch", "data.root=/coco"])
    assert (cfg.norm.name, cfg.detector.backbone, cfg.detector.channels, cfg.batch) == ("mabn", "resnet50", 256, 2)
    assert (cfg.schedule.max_iter, list(cfg.schedule.steps), cfg.schedule.warmup_iters) == (
        180000,
        [120000, 160000],
        500,
    )
    assert cfg.optim.base_lr == 0.02 and cfg.optim.reference_batch == 16 and cfg.optim.weight_decay == 1e-4
    assert cfg.norm.options.sma_window == 16 and cfg.start == "scratch"
    finetune = compose_config("train_coco", ["experiment=paper_coco_finetune", "data.root=/coco", "weights=/w.pt"])
    assert finetune.start == "finetune" and finetune.schedule.max_iter == 180000


def test_coco_comparison_sweeps_the_papers_norms_from_scratch():
    jobs = sweep_jobs("train_coco", ["experiment=coco_comparison", "data.root=/coco"])
    configs = [compose_config("train_coco", job) for job in jobs]
    assert sorted(c.norm.name for c in configs) == ["bn", "brn", "gn", "mabn", "syncbn"]
    assert all(
        (c.start, c.batch, c.schedule.max_iter, c.detector.name, c.logger.group)
        == ("scratch", 2, 180000, "r50_fpn", "coco-comparison")
        for c in configs
    )
    assert len({c.run_name for c in configs}) == 5


@pytest.mark.parametrize("norm", detection_norms())
def test_a_few_iterations_per_norm_report_ap(norm, scenes, tmp_path):
    cfg = compose_config("train_coco", [*scenes, f"norm={norm}", "max_steps=2"])
    summary = train(cfg, tmp_path)
    assert summary["steps"] == 2 and summary["engine"] == "torchvision" and summary["start"] == "scratch"
    assert all(0.0 <= summary[k] <= 100.0 for k in AP_KEYS)
    logged = read_metrics(tmp_path)
    assert {"train/loss_mask", "train/loss_classifier", "train/lr"} <= set(logged[0])
    assert all(f"final/eval/{k}" in logged[-1] for k in AP_KEYS)


def test_accumulated_micro_batches_make_one_step(scenes, tmp_path):
    """accumulate_steps=2: 2 micro-batches of 2 images per step, the lr scaled to the step's 4."""
    cfg = compose_config("train_coco", [*scenes, "norm=mabn", "max_steps=2", "accumulate_steps=2"])
    summary = train(cfg, tmp_path)
    assert summary["steps"] == 2 and summary["images_per_step"] == 4
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    assert state["optimizer"]["param_groups"][0]["initial_lr"] == pytest.approx(
        cfg.optim.base_lr * 4 / cfg.optim.reference_batch
    )
    assert [r["step"] for r in read_metrics(tmp_path) if "train/loss" in r] == [1, 2]


def test_an_unreadable_val_image_is_evaluated_as_no_detections_not_as_its_stand_in(scenes, tmp_path, monkeypatch):
    own_scenes = [*scenes, f"data.root={tmp_path / 'scenes'}"]  # generated here: one file is deleted
    run = DetectionRun(compose_config("train_coco", [*own_scenes, "norm=bn", "data.max_bad_fraction=0.5"]), tmp_path)
    missing = run.val_set.ids[1]
    Path(run.val_set.image_path(1)).unlink()  # sample 1 becomes a copy of sample 2
    monkeypatch.setattr(torchvision_engine, "detections_to_coco", lambda outputs, ids: [{"image_id": int(ids[0])}])
    seen = {}
    monkeypatch.setattr(
        torchvision_engine,
        "evaluate_coco",
        lambda gt, results, img_ids: seen.update(results=[r["image_id"] for r in results], img_ids=img_ids) or {},
    )
    run.evaluate()
    assert sorted(seen["results"]) == sorted(i for i in run.val_set.ids if i != missing)  # each once
    assert missing in seen["img_ids"]  # scored: its objects count as missed
    assert (tmp_path / "unreadable_val.txt").read_text().strip() == run.val_set.image_path(1)


def test_norm_placement_and_weight_centralization_follow_the_paper(scenes, tmp_path):
    cfg = compose_config("train_coco", [*scenes, "norm=mabn"])
    model = DetectionRun(cfg, tmp_path).model
    parts = {
        "body": model.backbone.body,
        "fpn": model.backbone.fpn,
        "box": model.roi_heads.box_head,
        "mask": model.roi_heads.mask_head,
    }
    counts = {k: sum(isinstance(m, mabn.MABN2d) for m in part.modules()) for k, part in parts.items()}
    assert counts == {"body": 20, "fpn": 8, "box": 4, "mask": 4}  # resnet18 body
    assert isinstance(model.rpn.head, RPNHead)
    assert not any(isinstance(m, mabn.MABN2d) for m in model.rpn.modules())
    assert all(p.requires_grad for p in model.parameters())
    pairs = [(conv, norm) for _, conv, _, norm in conv_norm_pairs(model) if isinstance(norm, mabn.MABN2d)]
    assert len(pairs) == 36 and all(is_centralized(conv) for conv, _ in pairs)
    assert all(norm.normalization_batch is None and norm.sma_window == 16 for _, norm in pairs)


@pytest.mark.parametrize("norm,steps,stop_at", [("mabn", 6, 3), ("cbn", 8, 6)])
def test_exact_resume_with_the_torchvision_engine(scenes, tmp_path, norm, steps, stop_at):
    # the compiled norm kernels, as train_coco.py runs them (the eager ones: test_fault_injection.py);
    # CBN's window opens after 2/3 of the run (iteration 6 of 8), so it resumes with one entry in it
    overrides = [*scenes, f"norm={norm}", f"max_steps={steps}", "seed=1"]
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    env = {**os.environ, "MABN_FUSED": "dynamic"}
    assert cli(*overrides, f"hydra.run.dir={straight}", env=env).returncode == 0
    first = cli(*overrides, f"hydra.run.dir={interrupted}", f"debug.preempt_at_step={stop_at}", env=env)
    assert first.returncode != 0 and "stopped by signal SIGTERM" in first.stderr
    second = cli(*overrides, f"hydra.run.dir={interrupted}", env=env)
    assert second.returncode == 0, second.stderr[-2000:]
    assert f"resumed from step {stop_at} of {steps}" in second.stdout
    assert_same_run(straight, interrupted, AP_KEYS)


@pytest.mark.multiprocess
def test_two_process_ddp_runs_every_job_of_a_multirun(scenes, tmp_path):
    result = torchrun("train_coco.py", "-m", *scenes, "norm=syncbn,mabn", "max_steps=2", f"hydra.sweep.dir={tmp_path}")
    assert result.returncode == 0, result.stderr[-3000:]
    for norm in ("syncbn", "mabn"):
        run_dir = tmp_path / f"{norm}-b2-scratch-s0"
        summary = read_summary(run_dir)
        assert summary["world_size"] == 2 and summary["steps"] == 2 and summary["engine"] == "torchvision"
        assert all(0.0 <= summary[k] <= 100.0 for k in AP_KEYS)
        records = read_metrics(run_dir)
        assert [r["step"] for r in records if "train/loss" in r] == [1, 2]  # rank 0 alone logs


@pytest.mark.multiprocess
def test_a_side_by_side_multirun_starts_loader_workers(scenes, tmp_path):
    """joblib's workers (hydra/launcher=local_parallel) replace the start method that loader
    workers need; the runs must still start theirs."""
    overrides = [o for o in scenes if o != "workers=0"]
    result = cli(
        "-m",
        "hydra/launcher=local_parallel",
        *overrides,
        "workers=1",
        "threads=1",
        "norm=bn,mabn",
        "max_steps=2",
        f"hydra.sweep.dir={tmp_path}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert all(read_summary(tmp_path / f"{norm}-b2-scratch-s0")["steps"] == 2 for norm in ("bn", "mabn"))


def test_a_run_kept_by_its_study_is_skipped_and_the_others_of_the_sweep_run(scenes, tmp_path):
    """A detection study relaunched in a fresh clone skips the runs kept in results/."""
    kept = tmp_path / "kept"
    kept.mkdir()
    (kept / "bn-b2-scratch-s0.json").write_text('{"box_AP": 30.0}')
    result = cli(
        "-m", *scenes, "norm=bn,gn", "max_steps=1", f"kept_runs={kept}", f"hydra.sweep.dir={tmp_path / 'runs'}"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"[skip] bn-b2-scratch-s0: kept in {kept / 'bn-b2-scratch-s0.json'}" in result.stdout
    assert not (tmp_path / "runs" / "bn-b2-scratch-s0" / "summary.json").exists()
    assert read_summary(tmp_path / "runs" / "gn-b2-scratch-s0")["steps"] == 1


def test_the_detection_benchmark_times_each_norm_against_bn_and_counts_the_mask_rois(tmp_path):
    out = tmp_path / "bench.md"
    result = subprocess.run(
        [
            sys.executable,
            "scripts/bench_detection.py",
            "--engines",
            "torchvision",
            "--norms",
            "bn",
            "bn-again",
            "bn-wcopy",
            "mabn",
            "--data-root",
            str(tmp_path / "scenes"),
            "--images",
            "4",
            "--batches",
            "1",
            "--warmup",
            "1",
            "--repeats",
            "2",
            "--device",
            "cpu",
            "--out",
            str(out),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [line for line in out.read_text().splitlines() if line.startswith("| torchvision |")]
    rows = {cells[1]: cells[2:] for cells in (line.strip("| ").split(" | ") for line in lines)}
    assert list(rows) == ["bn", "bn-again", "bn-wcopy", "mabn"]
    assert rows["bn"][1] == "1.00" and float(rows["mabn"][1]) > 0
    assert all(float(row[2]) >= 1 for row in rows.values())  # each image's ground truth at least
    assert rows["bn-again"][2] == rows["bn"][2]  # same start, batches and random draws: the same work
    assert rows["bn-wcopy"][2] == rows["bn"][2]  # copying the weights changes no value


@pytest.mark.skipif(
    importlib.util.find_spec("detectron2") is not None,
    reason="detectron2 is installed: tests/detectors/test_detectron2.py simulates its absence instead",
)
def test_detectron2_engine_without_detectron2_fails_at_once_with_one_line(tmp_path):
    result = cli("engine=detectron2", f"hydra.run.dir={tmp_path}", timeout=120)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert (
        last.startswith("error: detectron2 is not installed: install it from source") and "engine=torchvision" in last
    )


@pytest.mark.parametrize(
    "on_scenes,overrides,message",
    [
        (False, ["start=finetune"], "error: start=finetune needs weights=/path/to/imagenet_weights.pt"),
        (False, ["data=coco"], "error: data=coco needs data.root=/path/to/coco"),
        (False, ["data=coco", "data.root=/no/coco"], "error: no COCO split 'train' in /no/coco"),
        (
            True,
            ["start=finetune", "weights=/no/weights.pt"],
            "error: backbone weights not found: weights=/no/weights.pt",
        ),
    ],
)
def test_bad_input_fails_with_one_line(on_scenes, overrides, message, scenes, tmp_path):
    result = cli(*(scenes if on_scenes else []), *overrides, f"hydra.run.dir={tmp_path}", timeout=120)
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1].startswith(message), result.stderr
    assert "Traceback" not in result.stderr


def test_a_detection_checkpoint_evaluates_as_its_run_then_with_re_estimated_statistics(scenes, tmp_path):
    """scripts/detection_eval_statistics.py: the checkpoint's weights and step, then the run's own
    evaluation in its first column."""
    summary = train(compose_config("train_coco", [*scenes, "norm=bn", "max_steps=2"]), tmp_path / "run")
    checkpoint = tmp_path / "run" / "checkpoint.pt"
    run = load_detection_checkpoint(checkpoint, tmp_path / "scratch")
    saved = torch.load(checkpoint, map_location="cpu", weights_only=False)["model"]
    assert run.step == 2 and all(torch.equal(v, saved[k]) for k, v in run.model.state_dict().items())
    assert detection_backbone_input(run, 4).shape[:2] == (4, 3)
    out = tmp_path / "eval_statistics.md"
    result = subprocess.run(
        [
            sys.executable,
            "scripts/detection_eval_statistics.py",
            str(checkpoint),
            "--images",
            "4",
            "--groups",
            "2",
            "--out",
            str(out),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    row = out.read_text().splitlines()[-1].split(" | ")
    assert row[1:3] == ["2", f"{summary['box_AP']:.2f} / {summary['mask_AP']:.2f}"] and len(row) == 5
    bad = subprocess.run(
        [sys.executable, "scripts/detection_eval_statistics.py", "x.pt", "--images", "6", "--groups", "4"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode == 2 and "each must divide --images 6" in bad.stderr

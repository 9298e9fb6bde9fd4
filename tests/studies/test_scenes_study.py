"""The detection study: its grid and recipe, its report on made-up run summaries, and a tiny
version of the study run end to end."""

import json
import os
import shutil
import subprocess
import sys
import time

import pytest
from hydra_configs import ROOT, compose_config, sweep_jobs

from mabn.studies.scenes import write_report


def test_the_grid_is_every_one_process_norm_at_2_images_with_5_seeds():
    jobs = sweep_jobs("train_coco", ["experiment=scenes_study"])
    norms = ("bn", "brn", "gn", "mabn", "cbn", "gn_ws", "evonorm_s0", "powernorm")
    assert sorted((j[2], j[1]) for j in jobs) == sorted((f"norm={n}", f"seed={s}") for n in norms for s in range(5))
    script = (ROOT / "scripts" / "scenes_study.sh").read_text()
    assert f"NORMS=({' '.join(norms)})" in script  # the script runs the same grid, seed by seed
    cfg = compose_config("train_coco", ["experiment=scenes_study", "norm=mabn"])
    assert (cfg.batch, cfg.start, cfg.detector.name, cfg.data.name) == (2, "scratch", "r18_fpn_small", "fashion_scenes")
    assert cfg.optim.base_lr * cfg.batch / cfg.optim.reference_batch == pytest.approx(0.01)
    assert cfg.norm.options.sma_window == 16 and cfg.norm.schedule_reference_steps == 180000


def test_the_study_script_queues_the_runs_not_kept_two_at_a_time_across_seeds(tmp_path):
    """With a stand-in for Python: kept runs are skipped, the rest start in seed order, never more
    than two at once, and the next seed starts while the last run of a seed (made long) still goes."""
    log, kept = tmp_path / "log", tmp_path / "kept"
    kept.mkdir()
    for name in ("bn-b2-scratch-s0", "gn-b2-scratch-s1", "mabn-2x2-scratch-s0"):
        (kept / f"{name}.json").write_text("{}")
    stub = tmp_path / "python"
    stub.write_text(f"""#!/bin/bash
case "$*" in *scenes_report*|*train_imagenet*) exit 0;; esac
echo "start $*" >> {log}
case "$*" in *"seed=0 norm=powernorm"*) sleep 1.5;; *) sleep 0.2;; esac
echo "end $*" >> {log}
""")
    stub.chmod(0o755)
    env = {
        "PATH": "/usr/bin:/bin",
        "PYTHON": str(stub),
        "SEEDS": "0 1",
        "KEPT": str(kept),
        "OUT": str(tmp_path / "runs"),
    }
    subprocess.run(["bash", str(ROOT / "scripts" / "scenes_study.sh")], env=env, check=True, timeout=120)
    events = [line.split(" ", 1) for line in log.read_text().splitlines()]
    scratch = [args for kind, args in events if kind == "start" and "torch.distributed.run" not in args]
    expected = [
        f"seed={seed} norm={norm}"
        for seed in (0, 1)
        for norm in ("bn", "brn", "gn", "mabn", "cbn", "gn_ws", "evonorm_s0", "powernorm")
        if f"{norm}-b2-scratch-s{seed}" not in ("bn-b2-scratch-s0", "gn-b2-scratch-s1")
    ]
    started = [" ".join(a for a in args.split() if a.startswith(("seed=", "norm="))) for args in scratch]
    assert sorted(started) == sorted(expected)
    # in the queue's order, up to the order in which two runs launched together write their line
    assert all(abs(started.index(run) - i) <= 1 for i, run in enumerate(expected)), started
    running, most = 0, 0
    for kind, _ in events:
        running += 1 if kind == "start" else -1
        most = max(most, running)
    assert most == 2
    first_of_seed_1 = next(i for i, (kind, args) in enumerate(events) if kind == "start" and "seed=1" in args)
    last_of_seed_0 = max(i for i, (kind, args) in enumerate(events) if kind == "end" and "seed=0" in args)
    assert first_of_seed_1 < last_of_seed_0  # no core idles at the end of seed 0
    pairs = [args for kind, args in events if kind == "start" and "torch.distributed.run" in args]
    assert len(pairs) == 3 * 4 - 1  # 2x2 pairs: SyncBN and MABN, scratch and fine-tuned, 3 seeds, one kept


def test_the_default_run_and_the_papers_runs_keep_their_own_solvers():
    default = compose_config("train_coco")
    paper = compose_config("train_coco", ["experiment=paper_coco_scratch", "data.root=/coco"])
    assert (default.optim.base_lr, default.schedule.max_iter) == (0.08, 1000)
    assert (paper.optim.base_lr, paper.schedule.max_iter) == (0.02, 180000)


def summary(norm, start, seed, box, mask, steps=2000, world_size=1):
    config = {
        "detector": {"name": "r18_fpn_small"},
        "schedule": {"max_iter": 2000, "steps": [1500, 1800]},
        "data": {"name": "fashion_scenes", "train_images": 2000, "val_images": 200, "canvas_size": 128},
        "batch": 2,
        "optim": {"base_lr": 0.08, "reference_batch": 16},
        "norm": {"schedule_reference_steps": 180000},
    }
    metrics = {
        f"{kind}_AP{suffix}": value for kind, value in (("box", box), ("mask", mask)) for suffix in ("", "50", "75")
    }
    return {
        **metrics,
        "norm": norm,
        "label": norm,
        "start": start,
        "seed": seed,
        "steps": steps,
        "batch": 2,
        "world_size": world_size,
        "config": config,
    }


def test_the_report_tables_finished_runs_and_gives_a_verdict_per_claim(tmp_path):
    runs = tmp_path / "runs"
    rows = [
        ("bn", 1, 0, 20.0, 18.0),
        ("bn", 1, 1, 21.0, 18.5),
        ("mabn", 1, 0, 25.0, 22.0),
        ("mabn", 1, 1, 25.6, 22.4),
        ("mabn", 2, 0, 30.1, 26.0),
        ("mabn", 2, 1, 30.5, 26.2),
        ("syncbn", 2, 0, 30.2, 26.1),
        ("syncbn", 2, 1, 30.4, 26.1),
    ]
    for norm, processes, seed, box, mask in rows:
        run = runs / f"{norm}-{processes}-{seed}"
        run.mkdir(parents=True)
        (run / "summary.json").write_text(json.dumps(summary(norm, "scratch", seed, box, mask, world_size=processes)))
    evaluations = [{"step": step, "eval/box_AP": box, "eval/mask_AP": 1.0} for step, box in ((500, 10.0), (1000, 16.0))]
    (runs / "mabn-1-0" / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in evaluations) + "\n")
    (runs / "brn-cut").mkdir()  # a run cut short (preempted) is not counted
    (runs / "brn-cut" / "summary.json").write_text(json.dumps(summary("brn", "scratch", 0, 1.0, 1.0, steps=5)))
    write_report(runs, tmp_path / "results")
    text = (tmp_path / "results" / "scenes_study.md").read_text()
    assert "| scratch | mabn | 1 x 2 | 2 | 25.3 ± " in text and "| scratch | mabn | 2 x 2 | 2 | 30.3 ± " in text
    assert "| scratch | syncbn | 2 x 2 | 2 | 30.3 ± " in text
    assert "| scratch | brn |" not in text and "36.5 / 32.69" in text
    lines = text.splitlines()
    mabn_vs_bn = next(line for line in lines if line.startswith("- **MABN is better than BN from scratch"))
    assert "box AP paired +4.80 [" in mabn_vs_bn and "2 pairs" in mabn_vs_bn and mabn_vs_bn.count("**supported**") == 2
    mabn_vs_syncbn = next(line for line in lines if "within noise of SyncBN from scratch" in line)
    assert "2 vs 2 processes" in mabn_vs_syncbn and mabn_vs_syncbn.count("**supported (within noise)**") == 2
    assert any(line.startswith("- **BRN is better than BN from scratch") and "Not run yet" in line for line in lines)
    assert "| scratch | mabn | 1 x 2 | 10.0 | 16.0 |" in text and "| scratch | bn | 1 x 2 | - | - |" in text
    assert (tmp_path / "results" / "scenes_study.png").stat().st_size > 0
    kept = tmp_path / "results" / "scenes_study_runs"
    assert sorted(p.stem for p in kept.glob("*.json")) == sorted(f"{n}-{p}-{s}" for n, p, s, _, _ in rows)
    shutil.rmtree(runs)  # the run folders are gone (another session, another machine): the kept runs report
    write_report(runs, tmp_path / "results")
    assert (tmp_path / "results" / "scenes_study.md").read_text() == text


def test_the_report_names_the_fine_tuned_runs_classifiers_and_keeps_their_summaries(tmp_path):
    runs, classifiers = tmp_path / "runs", tmp_path / "pretrain"
    for norm, batch, error in (("mabn", 2, 14.91), ("bn", 32, 13.68)):
        (classifiers / f"{norm}-b{batch}-s0").mkdir(parents=True)
        (classifiers / f"{norm}-b{batch}-s0" / "summary.json").write_text(
            json.dumps({"top1_error": error, "steps": 1875, "norm": norm, "batch": batch})
        )
    for norm, pretrained in (("mabn", "mabn-b2-s0"), ("syncbn", "bn-b32-s0")):
        run = runs / f"{norm}-finetune"
        run.mkdir(parents=True)
        finetuned = summary(norm, "finetune", 0, 30.0, 26.0, world_size=2)
        finetuned["config"] = {**finetuned["config"], "weights": str(classifiers / pretrained / "model_final.pt")}
        (run / "summary.json").write_text(json.dumps(finetuned))
    later = time.time() + 60  # this classifier was replaced after the run: not the one it started from
    os.utime(classifiers / "mabn-b2-s0" / "summary.json", (later, later))
    text = write_report(runs, tmp_path / "results")
    assert "(configs/experiment/scenes_pretrain.yaml; bn-b32-s0: 13.68 % top-1 error after 1875 steps)" in text
    shutil.rmtree(runs)
    shutil.rmtree(classifiers)  # a fresh clone: the classifiers' summaries are kept in results/
    assert write_report(runs, tmp_path / "results") == text


@pytest.mark.parametrize("folder", ["scenes_study_2000it", "."])
def test_the_committed_report_regenerates_unchanged_from_the_kept_runs(folder, tmp_path):
    """A fresh clone has no run folders: the kept summaries alone give the committed report (the
    first study, 2000 iterations, in its own folder; the current one in results/)."""
    committed = ROOT / "results" / folder
    if not (committed / "scenes_study_runs").is_dir():
        pytest.skip(f"no detection runs kept in {committed} yet")
    shutil.copytree(committed / "scenes_study_runs", tmp_path / "scenes_study_runs")
    write_report(tmp_path / "no_run_folders", tmp_path)
    assert (tmp_path / "scenes_study.md").read_text() == (committed / "scenes_study.md").read_text()


def test_seed_k_gives_every_norm_of_the_study_the_same_initial_weights():
    """The pairing by seed: every conv and fc starts from the same values whatever the norm (the
    data order depends on the seed alone: mabn.engine.sampling)."""
    import torch

    from mabn.config import NormSpec
    from mabn.detectors.torchvision_maskrcnn import build_maskrcnn
    from mabn.engine.training import norm_layer_from_config

    weights = {}
    for norm in ("bn", "brn", "gn", "mabn", "cbn", "gn_ws", "evonorm_s0", "syncbn"):
        cfg = compose_config("train_coco", ["experiment=scenes_study", f"norm={norm}"])
        torch.manual_seed(3)
        model = build_maskrcnn(
            3,
            norm_layer_from_config(NormSpec.from_config(cfg.norm)),
            cfg.detector.backbone,
            None,
            128,
            128,
            cfg.detector.channels,
            cfg.detector.fc_channels,
        )
        weights[norm] = {name: p.detach() for name, p in model.named_parameters() if p.dim() > 1}
    for norm, own in weights.items():
        assert own.keys() == weights["bn"].keys(), norm
        assert all(torch.equal(own[name], weights["bn"][name]) for name in own), norm


@pytest.mark.multiprocess
def test_a_tiny_detection_study_and_its_report(tmp_path):
    """The study's config, two jobs side by side on one fresh data root, 4 iterations: the report
    pairs the seeds, gives each run's AP curve and regenerates from its kept runs alone."""
    runs, results = tmp_path / "runs", tmp_path / "results"
    tiny = [
        f"data.root={tmp_path / 'scenes'}",
        "data.train_images=8",
        "data.val_images=4",
        "schedule.max_iter=4",
        "schedule.steps=[2,3]",
        "schedule.warmup_iters=1",
        "eval_every_steps=2",
        "detector.rpn_pre_nms_test=50",
        "detector.detections_per_image=10",
        f"hydra.sweep.dir={runs}",
    ]
    for command in (
        [
            "train_coco.py",
            "-m",
            "hydra/launcher=local_parallel",
            "experiment=scenes_study",
            "norm=bn,mabn",
            "seed=0,1",
            *tiny,
        ],
        ["scripts/scenes_report.py", str(runs), "--results", str(results)],
    ):
        result = subprocess.run([sys.executable, *command], cwd=ROOT, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
    text = (results / "scenes_study.md").read_text()
    lines = text.splitlines()
    for norm in ("bn", "mabn"):
        summaries = [json.loads((runs / f"{norm}-b2-scratch-s{seed}" / "summary.json").read_text()) for seed in (0, 1)]
        assert all(s["steps"] == 4 and s["world_size"] == 1 for s in summaries)
        assert any(line.startswith(f"| scratch | {norm} | 1 x 2 | 2 | ") for line in lines), norm
        curve = next(
            line for line in lines if line.startswith(f"| scratch | {norm} | 1 x 2 | ") and line.count("|") < 12
        )
        assert len([cell for cell in curve.split("|")[4:-1] if cell.strip() != "-"]) == 2, curve  # AP at 2 and 4
    mabn_vs_bn = next(line for line in lines if line.startswith("- **MABN is better than BN from scratch"))
    assert "2 pairs" in mabn_vs_bn and "box AP paired" in mabn_vs_bn
    assert (results / "scenes_study.png").stat().st_size > 0
    assert sorted(p.stem for p in (results / "scenes_study_runs").glob("*.json")) == sorted(
        f"{n}-b2-scratch-s{s}" for n in ("bn", "mabn") for s in (0, 1)
    )
    shutil.rmtree(runs)
    write_report(runs, results)
    assert (results / "scenes_study.md").read_text() == text

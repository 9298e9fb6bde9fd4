"""Rerun kept runs from the config their summaries recorded and say whether today's code reproduces
their metrics to the last digit:

    python -m mabn.verify results/fashion_study_runs/mabn-b2-s0.json [more summaries] [--runs-dir runs/verify]
    torchrun --nproc_per_node 2 -m mabn.verify results/scenes_study_runs/mabn-2x2-s0.json   # a 2-process run

Each rerun trains in ``<runs-dir>/<folder>/<run>/`` (``rerun_dir``; a relaunch resumes it, exactly), with the recorded
config (seed, threads and kernels' run length included), W&B off and no kept-run skipping. Bit-for-bit
equality holds on the machine kind that made the run: CPU kernels differ by CPU and thread count.
Exit status 1 if any run is not reproduced."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from omegaconf import OmegaConf

from .config import ConfigError, check_numbers, register_resolvers
from .provenance import commit_label, provenance

METRICS = ("top1_error", "top5_error", "box_AP", "box_AP50", "box_AP75", "mask_AP", "mask_AP50", "mask_AP75")


def rerun(kept: dict, run_dir: Path) -> dict:
    """Train the kept run's recorded config again in ``run_dir``; its new summary."""
    processes = int(os.environ.get("WORLD_SIZE", 1))
    if kept.get("world_size", 1) != processes:
        raise ConfigError(
            f"the run had {kept['world_size']} processes and this is {processes}: "
            f"start it with torchrun --nproc_per_node {kept['world_size']} -m mabn.verify ..."
        )
    cfg = OmegaConf.create(kept["config"])
    cfg.kept_runs, cfg.logger = None, {"name": "none"}
    check_numbers(cfg)
    if "detector" not in cfg:
        from .engine.classification import train
    else:
        os.environ.setdefault("MABN_FUSED", "dynamic")  # the kernels train_coco.py runs
        from .engine.coco import train
    return train(cfg, run_dir)


def rerun_dir(runs_dir: Path, summary: Path) -> Path:
    """Where the rerun of ``summary`` trains: ``<runs_dir>/<folder>/<run>`` for a kept summary
    ``<folder>/<run>.json`` and for a run's own ``<folder>/<run>/summary.json``, so that two runs'
    summaries never share a folder."""
    run = summary.parent if summary.name == "summary.json" else summary.with_suffix("")
    return runs_dir / run.parent.name / run.name


def differences(kept: dict, new: dict) -> list[str]:
    """The metrics that differ in any digit, each as ``name kept -> new``."""
    return [f"{key} {kept[key]!r} -> {new.get(key)!r}" for key in METRICS if key in kept and kept[key] != new.get(key)]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("summaries", nargs="+", type=Path, help="kept run summaries (results/*_runs/*.json)")
    parser.add_argument("--runs-dir", type=Path, default=Path("runs/verify"), help="where the reruns train")
    args = parser.parse_args(argv)
    register_resolvers()
    main_process = int(os.environ.get("RANK", 0)) == 0
    failed = 0
    for path in args.summaries:
        kept = json.loads(path.read_text())
        try:
            new = rerun(kept, rerun_dir(args.runs_dir, path))
        except ConfigError as error:
            sys.exit(f"error: {path}: {error}")
        changed = differences(kept, new)
        failed += bool(changed)
        if main_process:
            compared = ", ".join(f"{key} {kept[key]}" for key in METRICS if key in kept)
            verdict = (
                "NOT reproduced: " + "; ".join(changed) if changed else f"reproduced to the last digit ({compared})"
            )
            today = commit_label({"provenance": provenance()})
            print(f"[verify] {path}: {verdict}; kept run's commit: {commit_label(kept)}, today's: {today}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

"""Mask R-CNN with any norm: ``python train_coco.py norm=mabn batch=2``.

Config: configs/train_coco.yaml (groups norm/, engine/, detector/, data/, optim/, schedule/,
logger/, experiment/). ``engine=torchvision`` (default) or ``engine=detectron2`` (installed
from source). Relaunching the same command resumes from the run directory's checkpoint; with
``kept_runs=<folder>`` a run whose summary a study kept there (``<run_name>.json``) is skipped.
"""

import os
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig

from mabn.config import ConfigError, check_numbers, check_overrides, kept_summary, register_resolvers

register_resolvers()
# Image sizes and RoI counts change from batch to batch: the norms' compiled kernels
# (mabn.norms.fused) in their dynamic-shape mode, graphs that serve every size; MABN_FUSED=0: eager ones.
os.environ.setdefault("MABN_FUSED", "dynamic")


@hydra.main(version_base="1.3", config_path="configs", config_name="train_coco")
def main(cfg):
    if (kept := kept_summary(cfg)) is not None:
        return kept
    try:
        check_numbers(cfg)
        from mabn.engine.coco import train

        return train(cfg, HydraConfig.get().runtime.output_dir)
    except (ConfigError, FloatingPointError) as error:
        sys.exit(f"error: {error}")


if __name__ == "__main__":
    try:
        check_overrides(sys.argv[1:], Path(__file__).parent / "configs")  # one line, before Hydra's own
    except ConfigError as error:
        sys.exit(f"error: {error}")
    main()

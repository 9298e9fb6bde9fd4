"""What both detection engines share: the start/weights check, the evaluation interval and the
data split paths."""

from __future__ import annotations

from ...config import ConfigError, NormSpec
from ...data.coco import coco_split_paths
from ...data.scenes import generate_fashion_scenes
from ...registry import TABLE
from ..distributed import barrier


def check_start(cfg, norm: NormSpec) -> None:
    """``start`` (scratch | finetune) and ``weights`` must agree; the norm must be one a detector
    can take (not MimicNorm, a classification method)."""
    if norm.mimic or getattr(TABLE.get(norm.name), "classification_only", False):
        raise ConfigError(
            "norm=mimicnorm is a classification method (no norm in the body, one BatchNorm1d on the logits) "
            "and a detector has no logits to normalize: use it with train_imagenet.py"
        )
    if cfg.start not in ("scratch", "finetune"):
        raise ConfigError(f"start={cfg.start} is not scratch or finetune")
    if (cfg.start == "finetune") != bool(cfg.get("weights")):
        raise ConfigError(
            "start=finetune needs weights=/path/to/imagenet_weights.pt, and start=scratch none: set both or neither"
        )


def eval_every_steps_due(cfg, step: int) -> bool:
    """Whether ``step`` ends an interval of ``eval_every_steps`` (0: evaluate at the end only)."""
    return bool(cfg.eval_every_steps) and step % cfg.eval_every_steps == 0


def split_paths(data_cfg, is_main: bool):
    """(image_dir, annotation_json) of the train and val splits; fashion_scenes is generated
    on first use (by the main process; the others wait)."""
    if data_cfg.name == "fashion_scenes":
        if is_main:
            for split, count in (
                (data_cfg.train_split, data_cfg.train_images),
                (data_cfg.val_split, data_cfg.val_images),
            ):
                generate_fashion_scenes(
                    data_cfg.root, split, count, data_cfg.canvas_size, fashion_root=data_cfg.fashion_root
                )
        barrier()
    elif data_cfg.name != "coco":
        raise ConfigError(f"unknown data {data_cfg.name!r} for detection: use coco or fashion_scenes")
    elif not data_cfg.root:
        raise FileNotFoundError("data=coco needs data.root=/path/to/coco (annotations/ and train2017/, val2017/)")
    return coco_split_paths(data_cfg.root, data_cfg.train_split), coco_split_paths(data_cfg.root, data_cfg.val_split)

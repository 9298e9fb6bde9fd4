"""The detectron2 engine's config: this suite's Hydra config as a detectron2 ``CfgNode`` (norm
names, data splits registered with detectron2, solver) and its lr schedule."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
import torch.distributed as dist

# first: without detectron2 it raises the one-line error, before detectron2's own imports would fail
from ...detectors.detectron2_registration import TABLE

# isort: split
from detectron2.config import CfgNode, get_cfg
from detectron2.data.datasets import register_coco_instances
from detectron2.solver import build_lr_scheduler

from ...config import ConfigError, accumulate_steps
from ..distributed import Distributed, barrier
from .common import split_paths

DEPTHS = {"resnet18": 18, "resnet34": 34, "resnet50": 50, "resnet101": 101}
# torchvision's ImageNet normalization on the 0-255 scale (RGB), as train_imagenet.py's data
PIXEL_MEAN = [123.675, 116.28, 103.53]
PIXEL_STD = [58.395, 57.12, 57.375]


def detectron2_norm(norm) -> str:
    """The detectron2 norm string for this suite's ``norm`` (``mabn.registry.TABLE``'s detectron2 name)."""
    entry = TABLE.get(norm.name)
    if entry is None or entry.detectron2 is None:
        wired = [name for name, e in TABLE.items() if e.detectron2]
        raise ConfigError(
            f'norm={norm.name} is not wired to engine=detectron2 (its "LN" is a different layer): '
            f"use norm={'|'.join(wired)}, or engine=torchvision"
        )
    if entry.detectron2 == "GN" and dict(norm.options) not in ({}, {"num_groups": 32}):
        raise ConfigError(
            f'engine=detectron2 builds GN with 32 groups (its "GN"); got norm.options='
            f"{dict(norm.options)}: use num_groups=32 or engine=torchvision"
        )
    return entry.detectron2


def _environment(env: Distributed | None, cfg) -> tuple[int, bool, str]:
    if env is not None:
        return env.world_size, env.is_main, str(env.device)
    initialized = dist.is_available() and dist.is_initialized()
    device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
    return (dist.get_world_size() if initialized else 1), (not initialized or dist.get_rank() == 0), device


def _first_images(annotation_json: Path, limit: int, out_dir: Path, is_main: bool) -> Path:
    """A COCO json with the ``limit`` lowest image ids of ``annotation_json`` (and their
    annotations), as the torchvision engine's ``val_images_limit``."""
    path = Path(out_dir) / f"{annotation_json.stem}_first{limit}.json"
    if is_main:
        data = json.loads(annotation_json.read_text())
        keep = set(sorted(image["id"] for image in data["images"])[:limit])
        data["images"] = [image for image in data["images"] if image["id"] in keep]
        data["annotations"] = [a for a in data["annotations"] if a["image_id"] in keep]
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(".tmp")
        partial.write_text(json.dumps(data))
        os.replace(partial, path)
    barrier()
    return path


def register_split(data_name: str, split: str, image_dir, annotation_json) -> str:
    """Register a COCO-format split with detectron2 under a name unique to its json file."""
    digest = hashlib.sha1(str(Path(annotation_json).resolve()).encode()).hexdigest()[:10]
    name = f"mabn_{data_name}_{split}_{digest}"
    register_coco_instances(name, {}, str(annotation_json), str(image_dir))
    return name


def build_detectron2_cfg(cfg, run_dir, env: Distributed | None = None) -> CfgNode:
    """The detectron2 config of this suite's Hydra config (registers the data splits; for
    fashion_scenes generates them first). Only detectron2's own keys, all primitives."""
    world_size, is_main, device = _environment(env, cfg)
    if cfg.detector.backbone not in DEPTHS:
        raise ConfigError(
            f"detector.backbone={cfg.detector.backbone} is not a ResNet detectron2 builds: "
            f"use one of {', '.join(DEPTHS)}"
        )
    norm = detectron2_norm(cfg.norm)
    (train_images, train_json), (val_images, val_json) = split_paths(cfg.data, is_main)
    if cfg.data.val_images_limit:
        val_json = _first_images(Path(val_json), cfg.data.val_images_limit, run_dir, is_main)
    categories = json.loads(Path(val_json).read_text())["categories"]

    d2 = get_cfg()
    d2.MODEL.DEVICE = device
    d2.MODEL.META_ARCHITECTURE = "GeneralizedRCNN"
    d2.MODEL.WEIGHTS = ""  # backbone weights are converted and loaded by load_backbone_weights
    d2.MODEL.MASK_ON = True
    d2.MODEL.PIXEL_MEAN, d2.MODEL.PIXEL_STD = list(PIXEL_MEAN), list(PIXEL_STD)
    d2.MODEL.BACKBONE.NAME = "build_resnet_fpn_backbone"
    d2.MODEL.BACKBONE.FREEZE_AT = 0
    depth = DEPTHS[cfg.detector.backbone]
    resnets = d2.MODEL.RESNETS
    resnets.DEPTH = depth
    resnets.NORM = norm
    resnets.OUT_FEATURES = ["res2", "res3", "res4", "res5"]
    resnets.STRIDE_IN_1X1 = False  # torchvision/timm ResNets (v1.5): stride in the 3x3 conv
    resnets.NUM_GROUPS, resnets.WIDTH_PER_GROUP, resnets.RES5_DILATION = 1, 64, 1
    resnets.STEM_OUT_CHANNELS = 64
    resnets.RES2_OUT_CHANNELS = 64 if depth in (18, 34) else 256  # BasicBlock for R18/R34
    d2.MODEL.FPN.IN_FEATURES = ["res2", "res3", "res4", "res5"]
    d2.MODEL.FPN.OUT_CHANNELS = cfg.detector.channels
    d2.MODEL.FPN.NORM = norm
    d2.MODEL.ANCHOR_GENERATOR.SIZES = [[32], [64], [128], [256], [512]]
    d2.MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS = [[0.5, 1.0, 2.0]]
    rpn = d2.MODEL.RPN
    rpn.IN_FEATURES = ["p2", "p3", "p4", "p5", "p6"]
    rpn.BATCH_SIZE_PER_IMAGE = cfg.detector.rpn_anchors_per_image
    rpn.PRE_NMS_TOPK_TRAIN, rpn.POST_NMS_TOPK_TRAIN = cfg.detector.rpn_pre_nms_train, cfg.detector.rpn_post_nms_train
    rpn.PRE_NMS_TOPK_TEST, rpn.POST_NMS_TOPK_TEST = cfg.detector.rpn_pre_nms_test, cfg.detector.rpn_post_nms_test
    heads = d2.MODEL.ROI_HEADS
    heads.NAME = "StandardROIHeads"
    heads.IN_FEATURES = ["p2", "p3", "p4", "p5"]
    heads.NUM_CLASSES = len(categories)
    heads.BATCH_SIZE_PER_IMAGE = cfg.detector.rois_per_image
    box = d2.MODEL.ROI_BOX_HEAD
    box.NAME = "FastRCNNConvFCHead"
    box.NUM_CONV, box.NUM_FC = 4, 1  # norm on the 4 convs, none on the fc (as the paper)
    box.CONV_DIM, box.FC_DIM = cfg.detector.channels, cfg.detector.fc_channels
    box.NORM = norm
    box.POOLER_RESOLUTION = 7
    mask = d2.MODEL.ROI_MASK_HEAD
    mask.NAME = "MaskRCNNConvUpsampleHead"
    mask.NUM_CONV, mask.CONV_DIM, mask.NORM = 4, cfg.detector.channels, norm
    mask.POOLER_RESOLUTION = 14
    d2.TEST.DETECTIONS_PER_IMAGE = cfg.detector.detections_per_image
    d2.TEST.EVAL_PERIOD = cfg.eval_every_steps or 0

    d2.INPUT.FORMAT = "RGB"
    d2.INPUT.MASK_FORMAT = "polygon" if cfg.data.name == "coco" else "bitmask"  # scenes store RLE
    d2.INPUT.MIN_SIZE_TRAIN = (cfg.data.min_size,)
    d2.INPUT.MAX_SIZE_TRAIN = cfg.data.max_size
    d2.INPUT.MIN_SIZE_TEST, d2.INPUT.MAX_SIZE_TEST = cfg.data.min_size, cfg.data.max_size
    d2.DATASETS.TRAIN = (register_split(cfg.data.name, cfg.data.train_split, train_images, train_json),)
    d2.DATASETS.TEST = (register_split(cfg.data.name, cfg.data.val_split, val_images, val_json),)
    d2.DATALOADER.NUM_WORKERS = cfg.workers

    optim, schedule = cfg.optim, cfg.schedule
    solver = d2.SOLVER
    solver.IMS_PER_BATCH = cfg.batch * world_size * accumulate_steps(cfg)  # images per optimizer step
    solver.BASE_LR = optim.base_lr * solver.IMS_PER_BATCH / optim.reference_batch
    solver.MOMENTUM, solver.NESTEROV = optim.momentum, bool(optim.get("nesterov", False))
    solver.WEIGHT_DECAY = solver.WEIGHT_DECAY_NORM = optim.weight_decay  # on all parameters
    solver.LR_SCHEDULER_NAME = {"step": "WarmupMultiStepLR", "cosine": "WarmupCosineLR"}.get(
        optim.schedule.name, optim.schedule.name
    )
    solver.GAMMA = optim.schedule.gamma
    solver.STEPS = tuple(schedule.steps)
    solver.MAX_ITER = min(schedule.max_iter, cfg.max_steps or schedule.max_iter)
    solver.WARMUP_ITERS, solver.WARMUP_FACTOR = schedule.warmup_iters, optim.schedule.warmup_factor
    solver.WARMUP_METHOD = "linear"
    solver.CHECKPOINT_PERIOD = solver.MAX_ITER  # checkpoints are this suite's (checkpoint.pt)
    solver.AMP.ENABLED = bool(cfg.amp) and device.startswith("cuda")
    d2.SEED = cfg.seed
    d2.OUTPUT_DIR = str(run_dir)
    return d2


def build_lr_schedule(d2cfg: CfgNode, optimizer, full_max_iter: int):
    """detectron2's warm-up + multi-step (or cosine) multiplier; a multi-step schedule spans
    the full schedule even when ``max_steps`` stops training earlier."""
    schedule_cfg = d2cfg.clone()
    schedule_cfg.defrost()
    if schedule_cfg.SOLVER.LR_SCHEDULER_NAME == "WarmupMultiStepLR":
        schedule_cfg.SOLVER.MAX_ITER = full_max_iter
    return build_lr_scheduler(schedule_cfg, optimizer)

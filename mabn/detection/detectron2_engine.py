"""Mask R-CNN with detectron2: ``python train_coco.py engine=detectron2 norm=mabn``.

The Hydra config becomes a plain detectron2 ``CfgNode`` (``build_detectron2_cfg``) whose norm
strings name this suite's layers (``detectron2_registration``). Training uses detectron2's
``SimpleTrainer`` (with autocast on CUDA when ``amp``) and its ``IterationTimer`` and
``LRScheduler`` hooks; a hook of this suite logs (metrics.jsonl / W&B), evaluates, saves
``checkpoint.pt`` (atomic; periodically, on preemption signals, at the end) and the run
resumes from it when relaunched in the same directory. Evaluation: detectron2's
``COCOEvaluator`` (official pycocotools) through ``inference_on_dataset``.

Choices, and where they differ from detectron2's defaults:

- norms: bn -> "BN_NB" (this suite's BN: its options apply; with ``normalization_batch:
  null`` it is ``nn.BatchNorm2d``'s kernel), syncbn -> "SyncBN_ANY" (this suite's, which runs
  on CPU/gloo as on CUDA), brn -> "BRN", mabn -> "MABN", gn -> detectron2's "GN" (32 groups);
  ln/in are not wired (detectron2's "LN" is another layer). Nothing is frozen (FREEZE_AT 0).
- optimizer: SGD with weight decay on every parameter, norms included, as the torchvision
  engine and the authors' code (detectron2's ``build_optimizer`` would exempt only the norm
  types it knows, i.e. not this suite's).
- lr schedule: detectron2's warm-up + multi-step over the full ``schedule``; ``max_steps``
  stops early without compressing it (as the torchvision engine).
- input: RGB with torchvision's ImageNet mean/std, so the ImageNet weights of
  train_imagenet.py fine-tune as they were trained; ResNet strides in the 3x3 conv.
- resume: model, optimizer, lr schedule, AMP scaler, iteration and RNG states are restored and
  the data stream continues after the images already seen. With ``workers=0`` and images of one
  aspect ratio (fashion_scenes) this repeats an uninterrupted run exactly; with loader workers
  (reseeded when they start) or mixed aspect ratios (COCO: the grouping buffers restart) the
  images and augmentations after the resume point can differ, so it is not promised exact.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import math
import os
import re
import signal
import time
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
from omegaconf.errors import OmegaConfBaseException

from .detectron2_registration import DETECTRON2_NAMES, recording_norms, register_detectron2_norms

from detectron2.config import CfgNode, get_cfg  # noqa: E402  (after the one-line ImportError)
from detectron2.data import (MetadataCatalog, build_detection_test_loader,  # noqa: E402
                             build_detection_train_loader, get_detection_dataset_dicts)
from detectron2.data.datasets import register_coco_instances  # noqa: E402
from detectron2.data.samplers import TrainingSampler  # noqa: E402
from detectron2.engine import HookBase, SimpleTrainer, create_ddp_model, hooks  # noqa: E402
from detectron2.evaluation import COCOEvaluator, inference_on_dataset  # noqa: E402
from detectron2.layers import FrozenBatchNorm2d  # noqa: E402
from detectron2.modeling import build_model  # noqa: E402
from detectron2.solver import build_lr_scheduler  # noqa: E402
from detectron2.utils import comm  # noqa: E402
from detectron2.utils.env import seed_all_rng  # noqa: E402

from ..config import ConfigError, first_line, resolved  # noqa: E402
from ..convert import Centralize, centralize_weights  # noqa: E402
from ..engine import checkpoint as ckpt  # noqa: E402
from ..engine.detection import check_start, split_paths  # noqa: E402
from ..engine.distributed import Distributed, barrier, init_distributed  # noqa: E402
from ..engine.loggers import RunLogger  # noqa: E402
from ..engine.run import load_run_checkpoint, wandb_options  # noqa: E402
from ..engine.training import (Preemption, build_sgd, check_finite, check_finite_weights,  # noqa: E402
                               unwrap)
from ..serialization import load_weights_only  # noqa: E402

DEPTHS = {"resnet18": 18, "resnet34": 34, "resnet50": 50, "resnet101": 101}
# torchvision's ImageNet normalization on the 0-255 scale (RGB), as train_imagenet.py's data
PIXEL_MEAN = [123.675, 116.28, 103.53]
PIXEL_STD = [58.395, 57.12, 57.375]
AP_METRICS = ("AP", "AP50", "AP75")


# -- config -------------------------------------------------------------------------------
def detectron2_norm(norm_cfg) -> str:
    """The detectron2 norm string for this suite's ``norm`` config."""
    name = norm_cfg.name
    if name == "gn":
        if dict(norm_cfg.options) not in ({}, {"num_groups": 32}):
            raise ConfigError(f"engine=detectron2 builds GN with 32 groups (its \"GN\"); got norm.options="
                              f"{dict(norm_cfg.options)}: use num_groups=32 or engine=torchvision")
        return "GN"
    for d2_name, ours in DETECTRON2_NAMES.items():
        if ours == name:
            return d2_name
    raise ConfigError(f"norm={name} is not wired to engine=detectron2 (its \"LN\" is a different layer): "
                      "use norm=bn|syncbn|gn|brn|mabn, or engine=torchvision")


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
        raise ConfigError(f"detector.backbone={cfg.detector.backbone} is not a ResNet detectron2 builds: "
                          f"use one of {', '.join(DEPTHS)}")
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
    solver.IMS_PER_BATCH = cfg.batch * world_size
    solver.BASE_LR = optim.base_lr * solver.IMS_PER_BATCH / optim.reference_batch
    solver.MOMENTUM, solver.NESTEROV = optim.momentum, bool(optim.get("nesterov", False))
    solver.WEIGHT_DECAY = solver.WEIGHT_DECAY_NORM = optim.weight_decay  # on all parameters
    solver.LR_SCHEDULER_NAME = {"step": "WarmupMultiStepLR", "cosine": "WarmupCosineLR"}.get(
        optim.schedule.name, optim.schedule.name)
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


# -- model --------------------------------------------------------------------------------
def build_detectron2_model(d2cfg: CfgNode, cfg) -> torch.nn.Module:
    """detectron2's Mask R-CNN with this suite's norm (options from ``cfg.norm``), backbone
    weights if given, and weight centralization of the convs feeding MABN; checks that
    detectron2 kept every layer built for the norm."""
    register_detectron2_norms({cfg.norm.name: resolved(cfg.norm.options)})
    with recording_norms() as made:
        model = build_model(d2cfg)
    if cfg.weights:
        load_backbone_weights(model.backbone.bottom_up, cfg.weights)
    if cfg.norm.get("centralize_weights", False):
        centralize_weights(model)
    check_norms_kept(model, made, d2cfg.MODEL.RESNETS.NORM)
    return model


def check_norms_kept(model: torch.nn.Module, made: list, norm: str) -> None:
    present = {id(m) for m in model.modules()}
    lost = sum(id(m) not in present for m in made)
    frozen = sum(isinstance(m, FrozenBatchNorm2d) for m in model.modules())
    if norm in DETECTRON2_NAMES and not made:
        raise RuntimeError(f"detectron2 built no {norm} layer: the norm registration did not reach its get_norm")
    if lost or frozen:
        raise RuntimeError(f"detectron2 replaced {lost} of the {len(made)} {norm} layers it built "
                           f"({frozen} FrozenBatchNorm2d in the model): check MODEL.BACKBONE.FREEZE_AT")


_STAGE_LAYER = re.compile(r"layer(\d)\.(\d+)\.(conv|bn)(\d)\.(.+)")
_STAGE_DOWNSAMPLE = re.compile(r"layer(\d)\.(\d+)\.downsample\.([01])\.(.+)")
_STEM = re.compile(r"(conv|bn)1\.(.+)")


def detectron2_resnet_key(key: str) -> str | None:
    """A torchvision/timm ResNet key in detectron2's ResNet naming (None: no counterpart)."""
    if key.startswith(("stem.", "res")) and not key.startswith("resnet"):
        return key  # already detectron2's
    if m := _STAGE_LAYER.fullmatch(key):
        stage, block, kind, index, rest = m.groups()
        return f"res{int(stage) + 1}.{block}.conv{index}.{'norm.' if kind == 'bn' else ''}{rest}"
    if m := _STAGE_DOWNSAMPLE.fullmatch(key):
        stage, block, index, rest = m.groups()
        return f"res{int(stage) + 1}.{block}.shortcut.{'norm.' if index == '1' else ''}{rest}"
    if m := _STEM.fullmatch(key):
        kind, rest = m.groups()
        return f"stem.conv1.{'norm.' if kind == 'bn' else ''}{rest}"
    return None


def detectron2_resnet_state(state: dict) -> tuple[dict, list[str]]:
    """(state in detectron2's ResNet naming, ignored keys) from an ImageNet ResNet state dict:
    train_imagenet.py's model_final.pt (timm), torchvision's, optionally under "model" or
    "state_dict" with "module."/"model." prefixes, or detectron2's own (``backbone.bottom_up.``).
    Centralized conv weights (``parametrizations.weight.original``) are stored centralized."""
    for key in ("model", "state_dict"):
        if isinstance(state.get(key), dict):
            state = state[key]
    converted, ignored = {}, []
    for key, value in state.items():
        name = key
        while name.startswith(("module.", "model.")):
            name = name.split(".", 1)[1]
        name = name.removeprefix("backbone.bottom_up.")
        if name.endswith(".parametrizations.weight.original"):
            name = name.removesuffix(".parametrizations.weight.original") + ".weight"
            value = Centralize()(value)
        if name.startswith("fc."):  # the classifier
            continue
        new = detectron2_resnet_key(name)
        if new is None:
            ignored.append(key)
        else:
            converted[new] = value
    return converted, ignored


def load_backbone_weights(bottom_up: torch.nn.Module, path: str) -> None:
    """Load ImageNet ResNet weights (see ``detectron2_resnet_state``) into detectron2's ResNet."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"backbone weights not found: weights={path}; give an existing file or null")
    state, ignored = detectron2_resnet_state(load_weights_only(path))
    own = bottom_up.state_dict()
    plain = {k.replace(".parametrizations.weight.original", ".weight"): v for k, v in own.items()}
    wrong = [f"{k} {tuple(v.shape)}!={tuple(plain[k].shape)}" for k, v in state.items()
             if k in plain and v.shape != plain[k].shape]
    if wrong:
        raise ValueError(f"weights={path} has shape mismatches {wrong[:3]}; save them from the same backbone "
                         "architecture")
    missing, unexpected = bottom_up.load_state_dict(state, strict=False)
    if missing:
        raise ValueError(f"weights={path} lacks {len(missing)} backbone keys, e.g. {missing[:3]}; use weights "
                         "trained with the same backbone and norm layer")
    ignored += unexpected
    if ignored:
        warnings.warn(f"weights={path}: ignored {len(ignored)} keys the backbone lacks, e.g. {ignored[:3]}")


# -- training -----------------------------------------------------------------------------
class ContinuedTrainingSampler(TrainingSampler):
    """detectron2's infinite shuffled sampler, skipping the first ``skip`` indices of this
    process's shard (the images a resumed run has already seen)."""

    def __init__(self, size: int, seed: int, skip: int = 0):
        super().__init__(size, shuffle=True, seed=seed)
        self.skip = skip

    def __iter__(self):
        iterator = super().__iter__()
        for _ in range(self.skip):
            next(iterator)
        yield from iterator


class _QuietFloatingPointError(logging.Filter):
    """detectron2 logs a traceback for any training exception; a non-finite loss is reported
    in one line by the entry point instead."""

    def filter(self, record):
        return not (record.exc_info and isinstance(record.exc_info[1], FloatingPointError))


class Trainer(SimpleTrainer):
    """detectron2's SimpleTrainer with this suite's step: autocast + gradient scaling when
    ``amp`` (as AMPTrainer), and a stop on a non-finite loss before any weight changes."""

    def __init__(self, model, data_loader, optimizer, amp: bool, device_type: str, checkpoint_path: Path):
        super().__init__(model, data_loader, optimizer)
        self.amp, self.device_type, self.checkpoint_path = amp, device_type, checkpoint_path
        self.scaler = torch.amp.GradScaler(device_type, enabled=amp)
        self.last_losses: dict = {}
        self.last_loss = None
        train_loop_logger = logging.getLogger("detectron2.engine.train_loop")
        if not any(isinstance(f, _QuietFloatingPointError) for f in train_loop_logger.filters):
            train_loop_logger.addFilter(_QuietFloatingPointError())

    def run_step(self):
        assert self.model.training, "the model was switched to eval mode during training"
        if self.iter == self.start_iter:  # creating the loader's iterator draws a seed from torch's RNG:
            state = torch.get_rng_state()  # undone, so that a resumed run draws as an uninterrupted one
            data = next(self._data_loader_iter)
            torch.set_rng_state(state)
        else:
            data = next(self._data_loader_iter)
        with torch.autocast(self.device_type, enabled=self.amp):
            try:
                loss_dict = self.model(data)
            except FloatingPointError as error:  # detectron2's check of boxes and scores
                raise FloatingPointError(
                    f"{str(error).rstrip('.')} at step {self.iter}: stopped before updating the weights; the last "
                    f"good checkpoint is kept at {self.checkpoint_path}; lower optim.base_lr or check the data"
                ) from None
            loss = sum(loss_dict.values())
        check_finite(loss.detach(), self.iter, self.checkpoint_path)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.after_backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.last_loss, self.last_losses = loss.detach(), {k: v.detach() for k, v in loss_dict.items()}


class RunHook(HookBase):
    """This suite's logging, evaluation, checkpoints and preemption handling, after each step."""

    def __init__(self, run: "Detectron2Run"):
        self.run = run

    def before_train(self):
        self.start_iter, self.started, self.excluded = self.trainer.start_iter, time.perf_counter(), 0.0
        self.last_save = time.monotonic()

    def after_step(self):
        run, cfg = self.run, self.run.cfg
        done = self.trainer.iter + 1
        if done % cfg.log_every_steps == 0 or done == self.trainer.max_iter:
            elapsed = time.perf_counter() - self.started - self.excluded
            run.images_per_second = (done - self.start_iter) * run.images_per_step / max(elapsed, 1e-9)
            trainer = self.trainer
            run.logger.log({"train/loss": trainer.last_loss.item(),
                            **{f"train/{k}": v.item() for k, v in trainer.last_losses.items()},
                            "train/lr": run.scheduler.get_last_lr()[0],
                            "train/images_per_second": run.images_per_second}, done)
        if cfg.debug.preempt_at_step == done:
            run.preemption.signum = signal.SIGTERM
        if run.preemption.requested(run.env.device):
            run.save(done)
            run.preemption.stop()
        tic = time.perf_counter()
        if cfg.eval_every_steps and done % cfg.eval_every_steps == 0 and done != self.trainer.max_iter:
            run.logger.log(run.evaluate(), done)
            run.save(done)
            self.last_save = time.monotonic()
        elif time.monotonic() - self.last_save > 60 * cfg.checkpoint_every_minutes:
            run.save(done)
            self.last_save = time.monotonic()
        self.excluded += time.perf_counter() - tic

    def after_train(self):
        if self.trainer.iter == self.trainer.max_iter:  # finished, not stopped by an exception
            self.run.save(self.trainer.max_iter)


class Detectron2Run:
    """One detectron2 Mask R-CNN run in ``run_dir``; relaunching in the same directory resumes."""

    def __init__(self, cfg, run_dir: Path, env: Distributed):
        self.cfg, self.run_dir, self.env = cfg, Path(run_dir), env
        self.checkpoint_path = ckpt.checkpoint_path(self.run_dir)
        try:
            check_start(cfg)
            self.d2cfg = build_detectron2_cfg(cfg, self.run_dir, env)
            torch.manual_seed(cfg.seed)
            self.model = build_detectron2_model(self.d2cfg, cfg)
            seed_all_rng(cfg.seed + env.rank)  # data augmentation draws from numpy/random (workers=0)
            self.train_dicts = get_detection_dataset_dicts(self.d2cfg.DATASETS.TRAIN, filter_empty=True)
        except (FileNotFoundError, ValueError, TypeError, KeyError, OmegaConfBaseException) as error:
            raise ConfigError(first_line(error, 1000)) from error
        classes = MetadataCatalog.get(self.d2cfg.DATASETS.TRAIN[0]).get("thing_classes", [])
        if len(classes) != self.d2cfg.MODEL.ROI_HEADS.NUM_CLASSES:
            raise ConfigError(f"the train split has {len(classes)} categories and the val split "
                              f"{self.d2cfg.MODEL.ROI_HEADS.NUM_CLASSES}: use splits of the same data set")
        self.images_per_step = self.d2cfg.SOLVER.IMS_PER_BATCH
        self.total_steps = self.d2cfg.SOLVER.MAX_ITER
        self.optimizer = build_sgd(self.model, cfg.optim, self.images_per_step)
        self.scheduler = build_lr_schedule(self.d2cfg, self.optimizer, cfg.schedule.max_iter)
        self.amp = self.d2cfg.SOLVER.AMP.ENABLED
        self.scaler_state = self.rng_states = None
        self.step, self.images_per_second = 0, 0.0
        self.logger = self.preemption = self.wandb_run_id = None

    def save(self, step: int) -> None:
        check_finite_weights(self.model, step, self.checkpoint_path)
        if self.env.is_main:
            ckpt.save_atomic({
                "model": unwrap(self.model).state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "scaler": self.trainer.scaler.state_dict(),
                "iteration": step, "rng": ckpt.rng_states(), "config": resolved(self.cfg),
                "images_per_second": self.images_per_second, "wandb_run_id": self.wandb_run_id},
                self.checkpoint_path, keep_previous=True)
        barrier()

    def resume(self) -> bool:
        state = load_run_checkpoint(self.run_dir, self.cfg)
        if state is None:
            return False
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.rng_states = state["rng"]  # restored in fit, after everything that draws from them
        self.scaler_state = state["scaler"]
        self.step, self.images_per_second = state["iteration"], state["images_per_second"]
        self.wandb_run_id = state["wandb_run_id"]
        return True

    def evaluate(self) -> dict:
        """COCO box and mask AP (%) on the validation split ("eval/" keys; undefined AP is 0)."""
        name = self.d2cfg.DATASETS.TEST[0]
        evaluator = COCOEvaluator(name, tasks=("bbox", "segm"), distributed=True, use_fast_impl=False)
        results = inference_on_dataset(unwrap(self.model), build_detection_test_loader(self.d2cfg, name), evaluator)
        metrics = {}
        for ours, theirs in (("box", "bbox"), ("mask", "segm")):
            for metric in AP_METRICS:
                value = float((results or {}).get(theirs, {}).get(metric, float("nan")))
                metrics[f"eval/{ours}_{metric}"] = value if math.isfinite(value) else 0.0
        if dist.is_initialized():  # COCOEvaluator returns the results on the main process only
            shared = [metrics]
            dist.broadcast_object_list(shared, src=0)
            metrics = shared[0]
        return metrics

    def fit(self) -> None:
        """Train from ``self.step`` to ``total_steps`` with detectron2's trainer and hooks."""
        device = self.env.device
        if self.env.world_size > 1:
            ddp_options = inspect.signature(torch.nn.parallel.DistributedDataParallel).parameters
            # statistics stay per process (the paper's per-GPU statistics); syncbn syncs itself
            no_buffer_sync = ({"forward_sync_buffers": False} if "forward_sync_buffers" in ddp_options
                              else {"broadcast_buffers": False})
            self.model = create_ddp_model(self.model, device_ids=[device.index] if device.type == "cuda" else None,
                                          **no_buffer_sync)
        sampler = ContinuedTrainingSampler(len(self.train_dicts), self.cfg.seed, self.step * self.cfg.batch)
        loader = build_detection_train_loader(self.d2cfg, dataset=self.train_dicts, sampler=sampler)
        if self.rng_states is not None:
            ckpt.restore_rng_states(self.rng_states)
        self.trainer = Trainer(self.model, loader, self.optimizer, self.amp, device.type, self.checkpoint_path)
        if self.scaler_state is not None:
            self.trainer.scaler.load_state_dict(self.scaler_state)
        self.trainer.register_hooks([hooks.IterationTimer(), hooks.LRScheduler(self.optimizer, self.scheduler),
                                     RunHook(self)])
        if self.step < self.total_steps:
            self.trainer.train(self.step, self.total_steps)
            self.step = self.total_steps

    def summary(self, metrics: dict) -> dict:
        cfg = self.cfg
        return {**{k.removeprefix("eval/"): v for k, v in metrics.items()}, "start": cfg.start,
                "engine": "detectron2", "images_per_second": self.images_per_second, "steps": self.step,
                "world_size": self.env.world_size, "norm": cfg.norm.name, "batch": cfg.batch, "seed": cfg.seed}


def _local_world_size(world_size: int) -> int:
    return int(os.environ.get("LOCAL_WORLD_SIZE", world_size))


def train(cfg, run_dir) -> dict:
    """Run (or resume) Mask R-CNN training with detectron2 in ``run_dir``; write summary.json
    and model_final.pt and return the summary (keys as the torchvision engine's)."""
    run_dir = Path(run_dir)
    env = init_distributed(cfg.device)
    # detectron2's launch() would create the per-machine group; torchrun/SLURM start us instead
    if env.world_size > 1 and comm._LOCAL_PROCESS_GROUP is None:
        comm.create_local_process_group(_local_world_size(env.world_size))
    logger = preemption = None
    try:
        run = Detectron2Run(cfg, run_dir, env)
        resumed = run.resume()
        summary_path = run_dir / "summary.json"
        if resumed and run.step >= run.total_steps and summary_path.is_file():
            return json.loads(summary_path.read_text())
        run.logger = logger = RunLogger(run_dir, env.is_main, wandb_options(cfg), resolved(cfg), run.wandb_run_id)
        run.wandb_run_id = logger.run_id
        run.preemption = preemption = Preemption()
        if resumed and env.is_main:
            print(f"resumed from step {run.step} of {run.total_steps} ({run.checkpoint_path})", flush=True)
        run.fit()
        metrics = run.evaluate()
        logger.log(metrics, run.step)
        summary = run.summary(metrics)
        logger.log({f"final/{k}": v for k, v in metrics.items()}, run.step)
        logger.summary({k: v for k, v in summary.items() if isinstance(v, float)})
        summary["config"] = resolved(cfg)
        if env.is_main:
            ckpt.save_atomic(unwrap(run.model).state_dict(), run_dir / "model_final.pt")
            summary_path.write_text(json.dumps(summary, indent=2))
        return summary
    finally:
        if preemption is not None:
            preemption.restore()
        if logger is not None:
            logger.finish()

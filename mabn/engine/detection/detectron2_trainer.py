"""Mask R-CNN with detectron2: ``python train_coco.py engine=detectron2 norm=mabn``.

The Hydra config becomes a plain detectron2 ``CfgNode`` (``detectron2_config``) whose norm
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
  and ``stop_at_step`` stop early without compressing it (as the torchvision engine).
- norm schedules: BRN's and MABN's counts scaled by ``norm.schedule_reference_steps`` and CBN's
  burn-in set from ``norm.run_fractions``, over the full schedule (mabn/schedules.py, as the
  torchvision engine).
- input: RGB with torchvision's ImageNet mean/std, so the ImageNet weights of
  train_imagenet.py fine-tune as they were trained; ResNet strides in the 3x3 conv.
- resume: model, optimizer, lr schedule, AMP scaler, iteration and RNG states are restored and
  the data stream continues after the images already seen. With ``workers=0`` and images of one
  aspect ratio (fashion_scenes) this repeats an uninterrupted run exactly; with loader workers
  (reseeded when they start) or mixed aspect ratios (COCO: the grouping buffers restart) the
  images and augmentations after the resume point can differ, so it is not promised exact.
"""

from __future__ import annotations

import inspect
import logging
import math
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist

# first: without detectron2 it raises the one-line error, before detectron2's own imports would fail
from ...detection.detectron2_registration import building_with, detectron2_names

# isort: split
from detectron2.config import CfgNode
from detectron2.data import (
    DatasetFromList,
    DatasetMapper,
    MetadataCatalog,
    build_detection_test_loader,
    build_detection_train_loader,
    get_detection_dataset_dicts,
)
from detectron2.data.samplers import TrainingSampler
from detectron2.engine import HookBase, SimpleTrainer, create_ddp_model, hooks
from detectron2.evaluation import COCOEvaluator, inference_on_dataset
from detectron2.layers import FrozenBatchNorm2d
from detectron2.modeling import build_model
from detectron2.utils import comm
from detectron2.utils.env import seed_all_rng
from omegaconf.errors import OmegaConfBaseException

from ...config import ConfigError, NormSpec, first_line
from ...data.faults import SkipUnreadable
from ...schedules import schedule_norms
from .. import checkpoint as ckpt
from ..distributed import Distributed, init_distributed
from ..run import (
    StepRules,
    announce_start,
    end_run,
    resume_run,
    save_run,
    start_run,
    stop_step,
    summary_keys,
)
from ..training import (
    Preemption,
    build_sgd,
    check_finite,
    unwrap,
    wire,
)
from .common import check_start
from .detectron2_config import build_detectron2_cfg, build_lr_schedule
from .detectron2_weights import load_backbone_weights

AP_METRICS = ("AP", "AP50", "AP75")


# -- model --------------------------------------------------------------------------------
def build_detectron2_model(d2cfg: CfgNode, cfg, norm: NormSpec) -> torch.nn.Module:
    """detectron2's Mask R-CNN with this suite's ``norm`` (its name and options), backbone
    weights if given, its norms wired (``mabn.wire_norms``), and weight centralization of the convs feeding MABN;
    checks that
    detectron2 kept every layer built for the norm."""
    with building_with({norm.name: norm.options}) as made:
        model = build_model(d2cfg)
    if cfg.weights:
        load_backbone_weights(model.backbone.bottom_up, cfg.weights)
    wire(model, norm)
    check_norms_kept(model, made, d2cfg.MODEL.RESNETS.NORM)
    return model


def check_norms_kept(model: torch.nn.Module, made: list, norm: str) -> None:
    present = {id(m) for m in model.modules()}
    lost = sum(id(m) not in present for m in made)
    frozen = sum(isinstance(m, FrozenBatchNorm2d) for m in model.modules())
    if norm in detectron2_names() and not made:
        raise RuntimeError(f"detectron2 built no {norm} layer: the norm registration did not reach its get_norm")
    if lost or frozen:
        raise RuntimeError(
            f"detectron2 replaced {lost} of the {len(made)} {norm} layers it built "
            f"({frozen} FrozenBatchNorm2d in the model): check MODEL.BACKBONE.FREEZE_AT"
        )


# -- data ---------------------------------------------------------------------------------
class MappedDicts(torch.utils.data.Dataset):
    """detectron2's dataset dicts through its ``DatasetMapper`` (which reads the image), as a
    data set that ``SkipUnreadable`` wraps: an image that cannot be read is replaced by the
    next readable one, as in the torchvision engine."""

    def __init__(self, dicts: list, mapper: DatasetMapper):
        # serialized, as detectron2's loaders keep them: forked loader workers share the bytes
        self.dicts, self.mapper = DatasetFromList(dicts, copy=False), mapper

    def __len__(self) -> int:
        return len(self.dicts)

    def __getitem__(self, index: int) -> dict:
        return self.mapper(self.dicts[index])  # the mapper copies the dict

    def image_path(self, index: int) -> str:
        return self.dicts[index]["file_name"]


def as_is(sample):
    """The loader's mapper: samples come mapped from ``MappedDicts``."""
    return sample


def detection_dataset(d2cfg: CfgNode, cfg, run_dir: Path, split: str, dicts: list) -> SkipUnreadable:
    """A split's images and annotations, read by detectron2's mapper, with unreadable images
    replaced and listed in ``unreadable_{split}.txt`` (at most ``data.max_bad_fraction``)."""
    mapper = DatasetMapper(d2cfg, is_train=split == "train")
    return SkipUnreadable(MappedDicts(dicts, mapper), cfg.data.max_bad_fraction, run_dir / f"unreadable_{split}.txt")


class OncePerImageEvaluator(COCOEvaluator):
    """COCOEvaluator that counts each image once: an unreadable image's stand-in (the next
    image) is predicted twice, possibly on two processes."""

    def _eval_predictions(self, predictions, img_ids=None):
        unique = {}
        for prediction in predictions:
            unique.setdefault(prediction["image_id"], prediction)
        return super()._eval_predictions(list(unique.values()), img_ids)


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
    """This suite's step rules (``mabn.engine.run.StepRules``: logging, evaluation, checkpoints,
    preemption) after each of detectron2's steps; the final evaluation follows training."""

    def __init__(self, run: Detectron2Run):
        self.run = run

    def before_train(self):
        self.start_iter, self.started, self.excluded = self.trainer.start_iter, time.perf_counter(), 0.0
        self.rules = StepRules(self.run.cfg, self.run.preemption, self.trainer.max_iter, self.run.env.device)

    def after_step(self):
        run, cfg = self.run, self.run.cfg
        done = self.trainer.iter + 1
        if self.rules.log_due(done):
            elapsed = time.perf_counter() - self.started - self.excluded
            run.images_per_second = (done - self.start_iter) * run.images_per_step / max(elapsed, 1e-9)
            trainer = self.trainer
            run.logger.log(
                {
                    "train/loss": trainer.last_loss.item(),
                    **{f"train/{k}": v.item() for k, v in trainer.last_losses.items()},
                    "train/lr": run.scheduler.get_last_lr()[0],
                    "train/images_per_second": run.images_per_second,
                },
                done,
            )
        tic = time.perf_counter()
        due = bool(cfg.eval_every_steps) and done % cfg.eval_every_steps == 0 and done != self.trainer.max_iter
        self.rules.after_step(done, due, lambda: run.logger.log(run.evaluate(), done), lambda: run.save(done))
        self.excluded += time.perf_counter() - tic

    def after_train(self):
        if self.trainer.iter == self.trainer.max_iter:  # finished, not stopped by an exception
            self.run.save(self.trainer.max_iter)


class Detectron2Run:
    """One detectron2 Mask R-CNN run in ``run_dir``; relaunching in the same directory resumes."""

    def __init__(self, cfg, run_dir: Path, env: Distributed):
        self.cfg, self.run_dir, self.env = cfg, Path(run_dir), env
        self.norm = NormSpec.from_config(cfg.norm)  # the norm group, read once
        self.checkpoint_path = ckpt.checkpoint_path(self.run_dir)
        try:
            check_start(cfg, self.norm)
            self.d2cfg = build_detectron2_cfg(cfg, self.run_dir, env)
            torch.manual_seed(cfg.seed)
            self.model = build_detectron2_model(self.d2cfg, cfg, self.norm)
            seed_all_rng(cfg.seed + env.rank)  # data augmentation draws from numpy/random (workers=0)
            self.train_dicts = get_detection_dataset_dicts(self.d2cfg.DATASETS.TRAIN, filter_empty=True)
        except (FileNotFoundError, ValueError, TypeError, KeyError, OmegaConfBaseException) as error:
            raise ConfigError(first_line(error, 1000)) from error
        classes = MetadataCatalog.get(self.d2cfg.DATASETS.TRAIN[0]).get("thing_classes", [])
        if len(classes) != self.d2cfg.MODEL.ROI_HEADS.NUM_CLASSES:
            raise ConfigError(
                f"the train split has {len(classes)} categories and the val split "
                f"{self.d2cfg.MODEL.ROI_HEADS.NUM_CLASSES}: use splits of the same data set"
            )
        self.images_per_step = self.d2cfg.SOLVER.IMS_PER_BATCH
        self.total_steps = self.d2cfg.SOLVER.MAX_ITER
        self.stop_step = stop_step(cfg, self.total_steps)
        self.norm_schedule = schedule_norms(self.model, self.total_steps, self.norm)
        self.optimizer = build_sgd(self.model, cfg.optim, self.images_per_step, self.norm.gamma_lr_factor)
        self.scheduler = build_lr_schedule(self.d2cfg, self.optimizer, cfg.schedule.max_iter)
        self.amp = self.d2cfg.SOLVER.AMP.ENABLED
        self.scaler_state = self.rng_states = None
        self.step, self.images_per_second = 0, 0.0
        self.logger = self.preemption = self.wandb_run_id = None

    def save(self, step: int) -> None:
        save_run(self, step, self.trainer.scaler)

    def resume(self) -> bool:
        return resume_run(self, self.keep_states)

    def keep_states(self, state: dict) -> None:
        """The AMP scaler's and RNG states, restored in fit, after everything that draws from them."""
        self.scaler_state, self.rng_states = state["scaler"], state["rng"]

    def evaluate(self) -> dict:
        """COCO box and mask AP (%) on the validation split ("eval/" keys; undefined AP is 0)."""
        name = self.d2cfg.DATASETS.TEST[0]
        evaluator = OncePerImageEvaluator(name, tasks=("bbox", "segm"), distributed=True, use_fast_impl=False)
        dataset = detection_dataset(
            self.d2cfg, self.cfg, self.run_dir, "val", get_detection_dataset_dicts(name, filter_empty=False)
        )
        loader = build_detection_test_loader(
            dataset=dataset, mapper=as_is, num_workers=self.d2cfg.DATALOADER.NUM_WORKERS
        )
        results = inference_on_dataset(unwrap(self.model), loader, evaluator)
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
        """Train from ``self.step`` to ``stop_step`` with detectron2's trainer and hooks."""
        device = self.env.device
        if self.env.world_size > 1:
            ddp_options = inspect.signature(torch.nn.parallel.DistributedDataParallel).parameters
            # statistics stay per process (the paper's per-GPU statistics); syncbn syncs itself
            no_buffer_sync = (
                {"forward_sync_buffers": False}
                if "forward_sync_buffers" in ddp_options
                else {"broadcast_buffers": False}
            )
            self.model = create_ddp_model(
                self.model, device_ids=[device.index] if device.type == "cuda" else None, **no_buffer_sync
            )
        sampler = ContinuedTrainingSampler(len(self.train_dicts), self.cfg.seed, self.step * self.cfg.batch)
        dataset = detection_dataset(self.d2cfg, self.cfg, self.run_dir, "train", self.train_dicts)
        loader = build_detection_train_loader(self.d2cfg, dataset=dataset, mapper=as_is, sampler=sampler)
        if self.rng_states is not None:
            ckpt.restore_rng_states(self.rng_states)
        self.trainer = Trainer(self.model, loader, self.optimizer, self.amp, device.type, self.checkpoint_path)
        if self.scaler_state is not None:
            self.trainer.scaler.load_state_dict(self.scaler_state)
        self.trainer.register_hooks(
            [hooks.IterationTimer(), hooks.LRScheduler(self.optimizer, self.scheduler), RunHook(self)]
        )
        if self.step < self.stop_step:
            self.trainer.train(self.step, self.stop_step)
            self.step = self.stop_step

    def summary(self, metrics: dict) -> dict:
        cfg = self.cfg
        return {
            **{k.removeprefix("eval/"): v for k, v in metrics.items()},
            "start": cfg.start,
            "engine": "detectron2",
            "images_per_second": self.images_per_second,
            "steps": self.step,
            **summary_keys(cfg, self.norm, self.env, self.norm_schedule),
        }


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
        finished, run.logger = start_run(run)
        if finished is not None:
            return finished
        logger = run.logger
        run.preemption = preemption = Preemption()
        announce_start(cfg, run.norm, run.stop_step, run.step, env, run_dir, estimate="detectron2's log gives the ETA")
        run.fit()
        metrics = run.evaluate()
        logger.log(metrics, run.step)
        return end_run(run, logger, metrics, run.summary(metrics))
    finally:
        if preemption is not None:
            preemption.restore()
        if logger is not None:
            logger.finish()

"""Mask R-CNN with detectron2: ``python train_coco.py engine=detectron2 norm=mabn``.

The Hydra config becomes a plain detectron2 ``CfgNode`` (``detectron2_config``) whose norm
strings name this suite's layers (``detectron2_registration``). Training uses detectron2's
``SimpleTrainer`` (with autocast on CUDA when ``amp``) and its ``IterationTimer`` and
``LRScheduler`` hooks, followed in its hook list by the suite's hooks, the same as every engine's
(``mabn.engine.hooks``: logging, the probe, progress, the time estimate, preemption,
evaluation, checkpoints, the non-finite-loss stop); the run resumes from ``checkpoint.pt``
when relaunched in the same directory. Evaluation: detectron2's
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

import logging
import math
import os
from pathlib import Path

import torch
import torch.distributed as dist

# first: without detectron2 it raises the one-line error, before detectron2's own imports would fail
from ...detectors.detectron2_registration import building_with, detectron2_names

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
from detectron2.engine import HookBase, SimpleTrainer, hooks
from detectron2.evaluation import COCOEvaluator, inference_on_dataset
from detectron2.layers import FrozenBatchNorm2d
from detectron2.modeling import build_model
from detectron2.utils import comm
from detectron2.utils.env import seed_all_rng
from omegaconf.errors import OmegaConfBaseException

from ...config import ConfigError, NormSpec, accumulate_steps, first_line
from ...data.faults import SkipUnreadable
from ...schedules import schedule_norms
from .. import checkpoint as ckpt
from ..distributed import Distributed, init_distributed
from ..run import Run, slices, stop_step
from ..training import build_sgd, unwrap, wire, wrap_ddp
from .common import check_start, eval_every_steps_due
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
    """detectron2's SimpleTrainer with this suite's step for ``run`` (``mabn.engine.run.Run``):
    the step through the run's ``optimizer_step`` (autocast and gradient scaling when ``amp``, as
    AMPTrainer; gradient accumulation; the loss and its parts for the hooks), and detectron2's own
    check of non-finite boxes reported as the suite's non-finite-loss stop."""

    def __init__(self, run, data_loader):
        super().__init__(run.model, data_loader, run.optimizer)
        self.run = run
        train_loop_logger = logging.getLogger("detectron2.engine.train_loop")
        if not any(isinstance(f, _QuietFloatingPointError) for f in train_loop_logger.filters):
            train_loop_logger.addFilter(_QuietFloatingPointError())

    def run_step(self):
        assert self.model.training, "the model was switched to eval mode during training"
        run = self.run
        if self.iter == self.start_iter:  # creating the loader's iterator draws a seed from torch's RNG:
            state = torch.get_rng_state()  # undone, so that a resumed run draws as an uninterrupted one
            data = next(self._data_loader_iter)
            torch.set_rng_state(state)
        else:
            data = next(self._data_loader_iter)
        run.optimizer_step(slices(data, run.accumulate_steps), self.loss, self.after_backward)

    def loss(self, data) -> tuple[torch.Tensor, dict]:
        try:
            loss_dict = self.model(data)
        except FloatingPointError as error:  # detectron2's check of boxes and scores
            raise FloatingPointError(
                f"{str(error).rstrip('.')} at step {self.iter}: stopped before updating the weights; the last "
                f"good checkpoint is kept at {self.run.checkpoint_path}; lower optim.base_lr or check the data"
            ) from None
        return sum(loss_dict.values()), {f"train/{name}": v.detach() for name, v in loss_dict.items()}


class AsDetectron2Hook(HookBase):
    """One of the suite's hooks (``mabn.engine.hooks``) in detectron2's trainer: the run's step
    is the trainer's iteration, and after a step the count of steps done."""

    def __init__(self, run, hook):
        self.run, self.hook = run, hook
        hook.run = run

    def before_train(self):
        self.run.step = self.trainer.iter
        self.hook.before_train()

    def before_step(self):
        self.run.step = self.trainer.iter
        self.hook.before_step()

    def after_backward(self):
        self.hook.after_backward()

    def after_step(self):
        self.run.step = self.trainer.iter + 1
        self.hook.after_step()

    def after_train(self):
        self.hook.after_train()


class Detectron2Run(Run):
    """One detectron2 Mask R-CNN run in ``run_dir``; relaunching in the same directory resumes."""

    def __init__(self, cfg, run_dir: Path, env: Distributed):
        self.cfg, self.run_dir, self.env = cfg, Path(run_dir), env
        self.norm = NormSpec.from_config(cfg.norm)  # the norm group, read once
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
        self.accumulate_steps = accumulate_steps(cfg)
        self.images_per_step = self.d2cfg.SOLVER.IMS_PER_BATCH  # accumulate_steps micro-batches of batch
        self.per_device_batch = cfg.batch
        self.total_steps = self.d2cfg.SOLVER.MAX_ITER
        self.stop_step = stop_step(cfg, self.total_steps)
        self.norm_schedule = schedule_norms(self.model, self.total_steps, self.norm)
        self.optimizer = build_sgd(self.model, cfg.optim, self.images_per_step, self.norm.gamma_lr_factor)
        self.scheduler = build_lr_schedule(self.d2cfg, self.optimizer, cfg.schedule.max_iter)
        self.amp = self.d2cfg.SOLVER.AMP.ENABLED
        self.scaler = torch.amp.GradScaler(env.device.type, enabled=self.amp)
        self.rng_states = None

    def restore_rng(self, states: dict) -> None:
        """Kept, and restored in ``fit`` after everything that draws from them."""
        self.rng_states = states

    def evaluation_due(self) -> bool:
        return eval_every_steps_due(self.cfg, self.step)

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
        """Train from ``self.step`` to ``stop_step`` with detectron2's trainer and the run's hooks."""
        self.model = wrap_ddp(self.model, self.env)
        seen = self.step * self.cfg.batch * self.accumulate_steps  # this process's images so far
        sampler = ContinuedTrainingSampler(len(self.train_dicts), self.cfg.seed, seen)
        dataset = detection_dataset(self.d2cfg, self.cfg, self.run_dir, "train", self.train_dicts)
        loader = build_detection_train_loader(self.d2cfg, dataset=dataset, mapper=as_is, sampler=sampler)
        if self.rng_states is not None:
            ckpt.restore_rng_states(self.rng_states)
        trainer = Trainer(self, loader)
        trainer.register_hooks(
            [
                hooks.IterationTimer(),
                hooks.LRScheduler(self.optimizer, self.scheduler),
                *(AsDetectron2Hook(self, hook) for hook in self.hooks()),
            ]
        )
        if self.step < self.stop_step:
            trainer.train(self.step, self.stop_step)
            self.step = self.stop_step

    def summary(self, metrics: dict) -> dict:
        return {
            **{k.removeprefix("eval/"): v for k, v in metrics.items()},
            "start": self.cfg.start,
            "engine": "detectron2",
        }


def _local_world_size(world_size: int) -> int:
    return int(os.environ.get("LOCAL_WORLD_SIZE", world_size))


def train(cfg, run_dir) -> dict:
    """Run (or resume) Mask R-CNN training with detectron2 in ``run_dir``; write summary.json
    and model_final.pt and return the summary (keys as the torchvision engine's)."""
    env = init_distributed(cfg.device)
    # detectron2's launch() would create the per-machine group; torchrun/SLURM start us instead
    if env.world_size > 1 and comm._LOCAL_PROCESS_GROUP is None:
        comm.create_local_process_group(_local_world_size(env.world_size))
    return Detectron2Run(cfg, run_dir, env).execute()

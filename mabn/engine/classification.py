"""ResNet classification: build from the config, train with resume, evaluate top-1/top-5 error."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import torch
from omegaconf.errors import OmegaConfBaseException
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from ..config import ConfigError, check_normalization_batch, resolved
from ..data.fashion_mnist import FashionMNIST
from ..data.imagenet import imagenet_datasets
from ..data.synthetic import SyntheticImages
from ..models import build_classifier
from . import checkpoint as ckpt
from .distributed import Distributed, all_reduce_sum, barrier, init_distributed, shutdown
from .loggers import RunLogger
from .sampling import EpochSampler, SeededSamples
from .training import (Preemption, build_sgd, check_finite, check_finite_weights, lr_factor,
                       norm_layer_from_config, prepare_model, unwrap)

# config keys a resumed run may change (they do not change what is computed)
OPERATIONAL_KEYS = ("debug", "workers", "log_every_steps", "checkpoint_every_minutes", "logger", "device")


def build_datasets(data_cfg):
    """(train, val, num_classes, in_chans) for the configured data set."""
    if data_cfg.name == "imagenet":
        if not data_cfg.root:
            raise FileNotFoundError("data=imagenet needs data.root=/path/to/imagenet (with train/ and val/)")
        train, val = imagenet_datasets(data_cfg.root)
        return train, val, len(train.classes), 3
    if data_cfg.name == "fashion_mnist":
        train = FashionMNIST(data_cfg.root, train=True, augment=data_cfg.augment)
        val = FashionMNIST(data_cfg.root, train=False)
        return train, val, FashionMNIST.num_classes, 1
    if data_cfg.name == "synthetic":
        make = lambda n, seed: SyntheticImages(n, data_cfg.num_classes, data_cfg.image_size, data_cfg.channels, seed)
        return make(data_cfg.train_samples, 0), make(data_cfg.val_samples, 1), data_cfg.num_classes, data_cfg.channels
    raise ConfigError(f"unknown data {data_cfg.name!r}: use imagenet, fashion_mnist or synthetic")


def subset(dataset, size):
    return dataset if not size or size >= len(dataset) else torch.utils.data.Subset(dataset, range(size))


class ClassificationRun:
    """One training run in ``run_dir``; relaunching in the same directory resumes it."""

    def __init__(self, cfg, run_dir: str | Path):
        self.cfg, self.run_dir = cfg, Path(run_dir)
        self.env = init_distributed(cfg.device)
        torch.manual_seed(cfg.seed)
        try:
            check_normalization_batch(cfg, cfg.per_device_batch)
            train, val, num_classes, in_chans = build_datasets(cfg.data)
            self.model = build_classifier(cfg.model.name, num_classes, in_chans,
                                          norm_layer_from_config(cfg.norm), **cfg.model.options)
        except (FileNotFoundError, ValueError, TypeError, OmegaConfBaseException) as error:
            raise ConfigError(str(error).splitlines()[0]) from error
        self.train_set = SeededSamples(subset(train, cfg.data.train_samples_limit), cfg.seed)
        self.val_set = subset(val, cfg.data.val_samples_limit)
        self.model = prepare_model(self.model, cfg.norm, self.env, cfg.channels_last)
        self.amp = cfg.amp and self.env.device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp)
        images_per_step = cfg.per_device_batch * self.env.world_size
        self.optimizer = build_sgd(self.model, cfg.optim, images_per_step)
        self.sampler = EpochSampler(len(self.train_set), cfg.per_device_batch, True, cfg.seed,
                                    self.env.rank, self.env.world_size)
        self.steps_per_epoch = self.sampler.batches_per_epoch()
        if self.steps_per_epoch == 0:
            raise ConfigError(f"the training set ({len(self.train_set)} images) is smaller than one step "
                              f"of {images_per_step} images: lower per_device_batch")
        self.total_steps = cfg.epochs * self.steps_per_epoch
        if cfg.max_steps:
            self.total_steps = min(self.total_steps, cfg.max_steps)
        schedule = cfg.optim.schedule
        milestones = [m * self.steps_per_epoch for m in schedule.milestones_epochs]
        warmup = round(schedule.warmup_epochs * self.steps_per_epoch)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda step: lr_factor(
            step, self.total_steps, schedule.name, milestones, schedule.gamma, warmup, schedule.warmup_factor))
        self.criterion = nn.CrossEntropyLoss(label_smoothing=cfg.optim.label_smoothing)
        self.step = 0
        self.images_per_second = 0.0

    # -- checkpoints -------------------------------------------------------------------
    def state(self) -> dict:
        return {"model": unwrap(self.model).state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
                "step": self.step, "rng": ckpt.rng_states(), "config": resolved(self.cfg),
                "images_per_second": self.images_per_second}

    def save(self) -> None:
        check_finite_weights(self.model, self.step, ckpt.checkpoint_path(self.run_dir))
        if self.env.is_main:
            ckpt.save_atomic(self.state(), ckpt.checkpoint_path(self.run_dir))
        barrier()

    def resume(self) -> bool:
        state = ckpt.load_checkpoint(self.run_dir)
        if state is None:
            return False
        if run_identity(state["config"]) != run_identity(resolved(self.cfg)):
            raise ConfigError(f"{self.run_dir} holds a checkpoint of a different config: use another run "
                              "directory (hydra.run.dir=...) or delete it to start over")
        unwrap(self.model).load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        ckpt.restore_rng_states(state["rng"])
        self.step, self.images_per_second = state["step"], state["images_per_second"]
        return True

    # -- training ----------------------------------------------------------------------
    def loader(self, dataset, sampler) -> DataLoader:
        return DataLoader(dataset, batch_size=self.cfg.per_device_batch, sampler=sampler,
                          num_workers=self.cfg.workers, pin_memory=self.env.device.type == "cuda",
                          drop_last=sampler.drop_last)

    def train_step(self, images, labels) -> torch.Tensor:
        images = images.to(self.env.device, non_blocking=True)
        labels = labels.to(self.env.device, non_blocking=True)
        if self.cfg.channels_last and self.env.device.type == "cuda":
            images = images.contiguous(memory_format=torch.channels_last)
        with torch.autocast(self.env.device.type, enabled=self.amp):
            loss = self.criterion(self.model(images), labels)
        check_finite(loss.detach(), self.step, ckpt.checkpoint_path(self.run_dir))
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.step += 1
        return loss.detach()

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Top-1 and top-5 error (%) on the validation set, over all processes."""
        self.model.eval()
        sampler = EpochSampler(len(self.val_set), self.cfg.per_device_batch, False, 0,
                               self.env.rank, self.env.world_size, drop_last=False)
        counts = torch.zeros(3, device=self.env.device)
        for images, labels in self.loader(self.val_set, sampler):
            images, labels = images.to(self.env.device), labels.to(self.env.device)
            with torch.autocast(self.env.device.type, enabled=self.amp):
                logits = self.model(images)
            top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices
            hits = top5 == labels[:, None]
            counts += torch.stack([hits[:, 0].sum(), hits.any(dim=1).sum(), torch.tensor(len(labels))]).to(counts)
        counts = all_reduce_sum(counts)
        self.model.train()
        return {"eval/top1_error": 100 * (1 - counts[0].item() / counts[2].item()),
                "eval/top5_error": 100 * (1 - counts[1].item() / counts[2].item())}

    def fit(self, logger: RunLogger, preemption: Preemption) -> dict:
        """Train to ``total_steps`` and return the final metrics; on a preemption signal,
        save a checkpoint and exit (``Preemption.stop``)."""
        cfg = self.cfg
        self.model.train()
        metrics = {}
        progress = tqdm(total=self.total_steps, initial=self.step, disable=not self.env.is_main,
                        desc=cfg.run_name, mininterval=5, dynamic_ncols=True)
        last_save = time.monotonic()
        while self.step < self.total_steps:
            epoch, start_batch = divmod(self.step, self.steps_per_epoch)
            self.sampler.set_epoch(epoch, start_batch)
            self.train_set.set_epoch(epoch)
            tic, images_seen = time.perf_counter(), 0
            for images, labels in self.loader(self.train_set, self.sampler):
                loss = self.train_step(images, labels)
                images_seen += len(images) * self.env.world_size
                progress.update()
                if self.step % cfg.log_every_steps == 0 or self.step == self.total_steps:
                    self.images_per_second = images_seen / (time.perf_counter() - tic)
                    logger.log({"train/loss": loss.item(), "train/lr": self.scheduler.get_last_lr()[0],
                                "train/images_per_second": self.images_per_second, "epoch": epoch}, self.step)
                    progress.set_postfix(loss=f"{loss.item():.3f}")
                if cfg.debug.preempt_at_step == self.step:
                    preemption.signum = signal.SIGTERM
                if preemption.requested(self.env.device):
                    self.save()
                    preemption.stop()
                if time.monotonic() - last_save > 60 * cfg.checkpoint_every_minutes:
                    self.save()
                    last_save = time.monotonic()
                if self.step == self.total_steps:
                    break
            epoch_done = self.step % self.steps_per_epoch == 0
            if self.step == self.total_steps or (epoch_done and (epoch + 1) % cfg.eval_every_epochs == 0):
                metrics = self.evaluate()
                logger.log(metrics, self.step)
            self.save()
        progress.close()
        return metrics or self.evaluate()


def train(cfg, run_dir: str | Path) -> dict:
    """Run (or resume) training in ``run_dir``; write summary.json and return it."""
    run = ClassificationRun(cfg, run_dir)
    run_dir = Path(run_dir)
    resumed = run.resume()
    summary_path = run_dir / "summary.json"
    if resumed and run.step >= run.total_steps and summary_path.is_file():
        return json.loads(summary_path.read_text())
    logger = RunLogger(run_dir, run.env.is_main, wandb_options(cfg), resolved(cfg))
    if resumed and run.env.is_main:
        print(f"resumed from step {run.step} of {run.total_steps} ({ckpt.checkpoint_path(run_dir)})", flush=True)
    preemption = Preemption()
    try:
        metrics = run.fit(logger, preemption)
        summary = {"top1_error": metrics["eval/top1_error"], "top5_error": metrics["eval/top5_error"],
                   "images_per_second": run.images_per_second, "steps": run.step,
                   "world_size": run.env.world_size,
                   "norm": cfg.norm.name, "batch": cfg.batch, "seed": cfg.seed, "config": resolved(cfg)}
        logger.log({f"final/{k}": v for k, v in metrics.items()}, run.step)
        logger.summary({k: summary[k] for k in ("top1_error", "top5_error", "images_per_second")})
        if run.env.is_main:
            ckpt.save_atomic(unwrap(run.model).state_dict(), run_dir / "model_final.pt")
            summary_path.write_text(json.dumps(summary, indent=2))
        return summary
    finally:
        preemption.restore()
        logger.finish()
        shutdown()


def run_identity(config: dict) -> dict:
    """The part of a resolved config that a resumed run must share with its checkpoint."""
    return {k: v for k, v in config.items() if k not in OPERATIONAL_KEYS}


def wandb_options(cfg) -> dict | None:
    """W&B init options from ``logger`` (None: W&B off); name, group and tags from the run."""
    if cfg.logger.name != "wandb":
        return None
    return {"project": cfg.logger.project, "entity": cfg.logger.entity, "mode": cfg.logger.mode,
            "group": cfg.logger.group, "job_type": cfg.task, "name": cfg.run_name,
            "tags": [f"norm={cfg.norm.name}", f"batch={cfg.batch}", f"seed={cfg.seed}", *cfg.logger.tags]}

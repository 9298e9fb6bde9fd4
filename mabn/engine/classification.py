"""ResNet classification: data and model from the config, top-1/top-5 error."""

from __future__ import annotations

import torch
from torch import nn

from ..config import ConfigError, NormSpec, check_normalization_batch
from ..data.fashion_mnist import FashionMNIST
from ..data.faults import SkipUnreadable
from ..data.imagenet import imagenet_datasets
from ..data.synthetic import SyntheticImages
from ..mimicnorm import center_after_steps, mimic
from ..models import build_classifier
from ..precise_statistics import precise_statistics
from .distributed import all_reduce_sum
from .run import TrainingRun
from .sampling import EpochSampler
from .training import norm_layer_from_config, unwrap


def build_datasets(data_cfg, run_dir=None):
    """(train, val, num_classes, in_chans) for the configured data set (ImageNet's unreadable
    files are listed in ``run_dir``)."""
    if data_cfg.name == "imagenet":
        if not data_cfg.root:
            raise FileNotFoundError("data=imagenet needs data.root=/path/to/imagenet (with train/ and val/)")
        train, val = imagenet_datasets(data_cfg.root, data_cfg.max_bad_fraction, run_dir)
        return train, val, len(train.classes), 3
    if data_cfg.name == "fashion_mnist":
        train = FashionMNIST(data_cfg.root, train=True, augment=data_cfg.augment)
        val = FashionMNIST(data_cfg.root, train=False)
        return train, val, FashionMNIST.num_classes, 1
    if data_cfg.name == "synthetic":
        make = lambda n, seed: SyntheticImages(n, data_cfg.num_classes, data_cfg.image_size, data_cfg.channels, seed)
        return make(data_cfg.train_samples, 0), make(data_cfg.val_samples, 1), data_cfg.num_classes, data_cfg.channels
    raise ConfigError(f"unknown data {data_cfg.name!r} for classification: use imagenet, fashion_mnist or synthetic")


def subset(dataset, size):
    """The first ``size`` samples (all if None or 0); unreadable images are replaced from among them."""
    if isinstance(dataset, SkipUnreadable):
        return dataset.first(size)
    return dataset if not size or size >= len(dataset) else torch.utils.data.Subset(dataset, range(size))


def build_model(cfg, norm: NormSpec, num_classes: int, in_chans: int) -> nn.Module:
    """The run's classifier with its norm, as it starts training (before wiring and the device)."""
    model = build_classifier(cfg.model.name, num_classes, in_chans, norm_layer_from_config(norm), **cfg.model.options)
    if norm.mimic:  # a method of the whole model (mabn.mimicnorm)
        mimic(model, num_classes, norm.logits_normalization_batch)
    return model


class ClassificationRun(TrainingRun):
    """ResNet on ImageNet / Fashion-MNIST / synthetic data; schedule in epochs."""

    def __init__(self, cfg, run_dir):
        super().__init__(cfg, run_dir, cfg.per_device_batch)
        if self.norm.mimic:
            center_after_steps(self.optimizer, unwrap(self.model))
        self.criterion = nn.CrossEntropyLoss(label_smoothing=cfg.optim.label_smoothing)

    def build(self):
        cfg = self.cfg
        check_normalization_batch(cfg, cfg.per_device_batch)
        train, val, num_classes, in_chans = build_datasets(cfg.data, self.run_dir)
        model = build_model(cfg, self.norm, num_classes, in_chans)
        return model, subset(train, cfg.data.train_samples_limit), subset(val, cfg.data.val_samples_limit)

    def schedule(self):
        schedule = self.cfg.optim.schedule
        milestones = [m * self.steps_per_epoch for m in schedule.milestones_epochs]
        return (
            self.cfg.epochs * self.steps_per_epoch,
            milestones,
            round(schedule.warmup_epochs * self.steps_per_epoch),
        )

    def evaluation_due(self) -> bool:
        return self.step % (self.cfg.eval_every_epochs * self.steps_per_epoch) == 0

    def loss(self, batch):
        images, labels = (t.to(self.env.device, non_blocking=True) for t in batch)
        if self.cfg.channels_last and self.env.device.type == "cuda":
            images = images.contiguous(memory_format=torch.channels_last)
        return self.criterion(self.model(images), labels), {}

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Top-1 and top-5 error (%) on the validation set, over all processes."""
        self.model.eval()
        counts = torch.zeros(3, device=self.env.device)
        for images, labels in self.loader(self.val_set, self.val_sampler()):
            images, labels = images.to(self.env.device), labels.to(self.env.device)
            with torch.autocast(self.env.device.type, enabled=self.amp):
                logits = self.model(images)
            hits = logits.topk(min(5, logits.shape[1]), dim=1).indices == labels[:, None]
            counts += torch.stack([hits[:, 0].sum(), hits.any(dim=1).sum(), torch.tensor(len(labels))]).to(counts)
        counts = all_reduce_sum(counts)
        self.model.train()
        return {
            "eval/top1_error": 100 * (1 - counts[0].item() / counts[2].item()),
            "eval/top5_error": 100 * (1 - counts[1].item() / counts[2].item()),
        }

    def final_metrics(self) -> dict:
        """With ``precise_stats.batches`` N: top-1/top-5 error with every norm's population statistics
        recomputed over N training batches of the normalization batch (``mabn.precise_statistics``)."""
        batches = self.cfg.get("precise_stats", {}).get("batches")
        if not batches:
            return {}
        size = self.norm.options.get("normalization_batch") or self.per_device_batch
        sampler = EpochSampler(len(self.train_set), size, True, self.cfg.seed, self.env.rank, self.env.world_size)
        sampler.set_epoch(self.step // self.steps_per_epoch, 0)
        inputs = (images.to(self.env.device) for images, _ in self.loader(self.train_set, sampler))
        with precise_statistics(unwrap(self.model), inputs, batches) as used:
            metrics = self.evaluate()
        return {"eval/precise_batches": used, **{k.replace("eval/", "eval/precise_"): v for k, v in metrics.items()}}

    def summary(self, metrics):
        summary = {"top1_error": metrics["eval/top1_error"], "top5_error": metrics["eval/top5_error"]}
        precise = {k.removeprefix("eval/"): v for k, v in metrics.items() if k.startswith("eval/precise_")}
        return summary | precise


def train(cfg, run_dir) -> dict:
    """Run (or resume) classification training in ``run_dir``; returns the summary."""
    return ClassificationRun(cfg, run_dir).execute()

"""Which running statistics should a trained model evaluate with? Re-estimate them from
training images with a chosen estimator and measure the error each one gives: a diagnosis of
a norm that trains well and evaluates badly (REPORT.md: CBN at normalization batch 2).

Estimators, per channel of every norm that evaluates with ``running_mean``/``running_var``
(BN, BRN, CBN, SyncBN): the mean of the layer's input over all the images; for the variance,
``group=None`` the population's (biased, over all the images at once), ``group=b`` the mean
over consecutive groups of b images of each group's variance (unbiased with ``unbiased``):
what an exponential average of a norm's per-group variances estimates.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from ..norms.batch_norm import _GroupedBatchStats
from ..serialization import load_weights_only

RUNNING_STAT_NORMS = (nn.modules.batchnorm._BatchNorm, _GroupedBatchStats)


def reestimate(model: nn.Module, images: torch.Tensor, group: int | None = None, unbiased: bool = True) -> int:
    """Set the running statistics of every such norm of ``model`` from ``images`` (one eval-mode
    forward: each layer sees its input normalized by the statistics already re-estimated
    upstream). Returns the number of layers set."""
    if group is not None and len(images) % group:
        raise ValueError(f"{len(images)} images do not split into groups of {group}: use a multiple of {group}")

    def set_statistics(layer, args):
        x = args[0].float()
        size = group or len(x)  # (C, groups, size * HW): all the images as one group when group is None
        x = x.transpose(0, 1).reshape(x.shape[1], len(x) // size, size * x[0, 0].numel())
        layer.running_mean.copy_(x.mean((1, 2)))
        layer.running_var.copy_(x.var(-1, correction=int(unbiased and group is not None)).mean(1))

    layers = [m for m in model.modules() if isinstance(m, RUNNING_STAT_NORMS) and m.running_var is not None]
    hooks = [layer.register_forward_pre_hook(set_statistics) for layer in layers]
    try:
        model.eval()
        with torch.no_grad():
            model(images)
    finally:
        for hook in hooks:
            hook.remove()
    return len(layers)


@torch.no_grad()
def top1_error(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch: int = 500) -> float:
    """Top-1 error (%) of the eval-mode model in fp32 (as a run evaluates on CPU)."""
    model.eval()
    wrong = 0
    for start in range(0, len(images), batch):
        wrong += (model(images[start : start + batch]).argmax(1) != labels[start : start + batch]).sum().item()
    return 100 * wrong / len(images)


def load_run(run_dir: Path):
    """(model with the run's final weights, its summary) of a classification run folder."""
    from omegaconf import OmegaConf

    from ..config import NormSpec
    from ..engine.distributed import Distributed
    from ..engine.training import norm_layer_from_config, prepare_model
    from ..models import build_classifier

    summary = json.loads((run_dir / "summary.json").read_text())
    cfg = OmegaConf.create(summary["config"])
    if cfg.data.name != "fashion_mnist":
        raise ValueError(f"{run_dir}: data {cfg.data.name!r}; this check reads Fashion-MNIST runs")
    norm = NormSpec.from_config(cfg.norm)
    model = build_classifier(cfg.model.name, 10, 1, norm_layer_from_config(norm), **cfg.model.options)
    model = prepare_model(model, norm, Distributed(0, 1, 0, torch.device("cpu")))
    model.load_state_dict(torch.load(run_dir / "model_final.pt", map_location="cpu", weights_only=True))
    return model, summary


def load_detection_checkpoint(checkpoint: Path, scratch: Path):
    """A torchvision-engine DetectionRun (in the folder ``scratch``) holding the weights of a
    detection run's ``checkpoint.pt``, at any step: evaluate it with ``run.evaluate()``."""
    from omegaconf import OmegaConf

    from ..engine.coco.torchvision_engine import DetectionRun
    from ..engine.training import unwrap

    state = load_weights_only(checkpoint)  # a checkpoint runs no code when read
    cfg = OmegaConf.create(state["config"])
    if cfg.engine.name != "torchvision":
        raise ValueError(f"{checkpoint}: engine {cfg.engine.name!r}; this check reads torchvision-engine runs")
    run = DetectionRun(cfg, scratch)
    unwrap(run.model).load_state_dict(state["model"])
    run.step = state["step"]
    return run


def detection_backbone_input(run, images: int, seed: int = 0) -> torch.Tensor:
    """``images`` training images of a DetectionRun (a fixed draw, augmented as in training),
    resized, normalized and batched as the model's backbone sees them."""
    from ..engine.training import unwrap

    order = torch.randperm(len(run.train_set), generator=torch.Generator().manual_seed(seed))[:images].tolist()
    with torch.no_grad():
        return unwrap(run.model).transform([run.train_set[i][0] for i in order])[0].tensors

"""What each norm of a study costs in memory, for the price columns of the reports: the bytes one
training step of the study's model keeps for its backward, at the run's per-device batch, per
image and over BN's (``mabn.benchmark.saved_bytes``: saved-tensor hooks, exact and the same on
any machine of a kind, so a report regenerates to the same numbers). Each label is measured from
the recorded config of its kept run at the largest normalization batch, in fp32 on the CPU, seeded:
a classifier on random images, and of Mask R-CNN (torchvision's engine) the backbone with its FPN.
The model's own parameters and buffers are not counted; weights computed from them in the step
are (MABN's centralized and GN+WS's standardized conv weights, kept unless a run recomputes them:
``mabn.norms.reparametrized_conv``)."""

from __future__ import annotations

from functools import cache

import torch
from omegaconf import OmegaConf
from torch import nn

from ..benchmark import saved_bytes, training_step_saved_bytes
from ..config import NormSpec
from ..data.fashion_mnist import CLASSES
from ..engine.classification import build_model
from ..engine.coco.torchvision_engine import build_detector
from ..engine.distributed import Distributed
from ..engine.training import prepare_model

PRICE_HEADER = " saved for backward, vs bn |"
PRICE_NOTE = (
    "Saved for backward: the bytes a training step of the model keeps for its backward, over BN's (mabn.studies.price)."
)
# data set -> (classes, channels, image size) of a batch as the model sees it
INPUTS = {"fashion_mnist": (10, 1, 28), "imagenet": (1000, 3, 224)}


def inputs(cfg) -> tuple[int, int, int]:
    """(classes, channels, image size) of the run's data (a ViT's own ``img_size`` where it has one)."""
    data = cfg.data
    classes, channels, size = (
        (data.num_classes, data.channels, data.image_size) if data.name == "synthetic" else INPUTS[data.name]
    )
    return classes, channels, cfg.model.options.get("img_size", size)


# detection data set -> its class count with the background (raw category ids as labels)
DETECTION_CLASSES = {"fashion_scenes": len(CLASSES) + 1, "coco": 91}
CPU = Distributed(0, 1, 0, torch.device("cpu"))


@cache
def _saved_per_image(config: str) -> float:
    cfg = OmegaConf.create(config)
    torch.manual_seed(0)
    if "detector" in cfg:
        return _detection_saved_per_image(cfg)
    classes, channels, size = inputs(cfg)
    norm = NormSpec.from_config(cfg.norm)
    model = prepare_model(build_model(cfg, norm, classes, channels), norm, CPU)
    images = torch.randn(cfg.per_device_batch, channels, size, size)
    labels = torch.randint(0, classes, (cfg.per_device_batch,))
    return training_step_saved_bytes(model, images, labels) / cfg.per_device_batch


class _Features(nn.Module):
    """The sum of a detector's backbone (trunk and FPN) outputs, each level's mean: a loss whose
    backward reaches every norm of the backbone."""

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone

    def forward(self, images):
        return sum(level.mean() for level in self.backbone(images).values())


def _detection_saved_per_image(cfg) -> float:
    """The detector's backbone (trunk and FPN) only: the heads' work follows the proposals, which
    follow the weights, so it would change with the seed and not with the norm alone."""
    size = cfg.data.max_size
    cfg.weights = None  # the same model from scratch: a fine-tuned run's starting weights change no size
    norm = NormSpec.from_config(cfg.norm)
    model = prepare_model(build_detector(cfg, norm, DETECTION_CLASSES[cfg.data.name]), norm, CPU)
    images = torch.randn(cfg.batch, 3, size, size)
    return saved_bytes(_Features(model.backbone), images, torch.ones(())) / cfg.batch


def saved_per_image(summaries: list[dict], labels) -> dict[str, float]:
    """{label: bytes saved for the backward per image} of the ``labels`` that have kept runs whose
    recorded config names their norm (a diverged run, kept with its reason only, has none; made-up
    summaries in tests may not)."""
    recorded = [s for s in summaries if "name" in s.get("config", {}).get("norm", {})]
    configs = {}
    for summary in sorted(recorded, key=lambda s: -s["batch"]):
        configs.setdefault(summary.get("label") or summary["norm"], summary["config"])
    return {label: _saved_per_image(OmegaConf.to_yaml(configs[label])) for label in labels if label in configs}


def price_cells(summaries: list[dict], labels, base: str = "bn") -> dict[str, str]:
    """{label: its bytes saved for the backward over ``base``'s, as a table cell}."""
    measured = saved_per_image(summaries, (base, *labels))
    if base not in measured:
        return {}
    return {label: f"{value / measured[base]:.2f}" for label, value in measured.items()}


def memory_table(summaries: list[dict], labels, base: str = "bn") -> list[str]:
    """Markdown rows: each label's bytes saved for the backward per image (KiB) and over ``base``'s."""
    measured = saved_per_image(summaries, (base, *labels))
    lines = [f"| norm | saved for the backward per image (KiB) | vs {base} |", "|---|---|---|"]
    for label in labels:
        if label in measured:
            lines.append(f"| {label} | {measured[label] / 1024:.1f} | {measured[label] / measured[base]:.2f} |")
    return lines

"""MimicNorm (Fei, Dai, Li, Zou, Xiong, AAAI 2021), docs/papers.md: a ResNet without normalization
in its body, as the authors build it (github Kid-key/MimicNorm, ``ImageNet/models/resnet_nobn.py``,
``meanweigh`` in ``ImageNet/main.py`` and ``Cifar100/main.py``):

- every norm replaced by a per-channel bias (the bias their convs have instead);
- each residual branch's output multiplied by a learnable scalar started at 1.2^2 / i (basic
  block) or 1.2^3 / i (bottleneck), i the block's 1-based index in the network, and each
  downsampling shortcut by one started at 1.2;
- one ``BatchNorm1d(num_classes, affine=False)`` on the logits (here with a normalization batch,
  as BN's: ``LogitNorm``);
- He-normal weights (fan-in) and zero biases;
- every conv's weight mean removed per output channel (over in-channels and kernel), in place, at
  the start and after every optimizer step: their ImageNet code centres every conv with
  ``groups == 1``, their CIFAR code those whose fan-in ``in * kh * kw / groups`` exceeds 50 (not a
  3-channel 3x3 stem); both rules at once, ``groups == 1`` and fan-in > 50, give theirs on their
  models.

A classification method: it changes the model, not one layer. ``norm=mimicnorm`` builds the
ResNet with ``norm_layer=ChannelBias``, then ``mimic`` adapts it and ``center_after_steps`` hooks the
optimizer. Detection has no logits to normalize: ``train_coco.py`` refuses it in one line.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .norms import BatchNorm2d

CENTER_MIN_FAN_IN = 50


class ChannelBias(nn.Module):
    """A per-channel bias in place of a norm: the bias of the conv before it."""

    def __init__(self, num_features, device=None, dtype=None):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(num_features, device=device, dtype=dtype))

    def forward(self, x):
        return x + self.bias.view(1, -1, *[1] * (x.dim() - 2))


class Scale(nn.Module):
    """A learnable scalar factor (the authors' ``MyScaleLayer``)."""

    def __init__(self, value: float):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor([float(value)]))

    def forward(self, x):
        return x * self.scale


class LogitNorm(nn.Module):
    """``BatchNorm1d(num_classes, affine=False)`` on (N, classes) logits, with a normalization batch
    (``mabn.BatchNorm2d`` over (N, classes, 1, 1), gamma 1 and beta 0 frozen)."""

    def __init__(self, num_classes: int, normalization_batch: int | None = None):
        super().__init__()
        self.norm = BatchNorm2d(num_classes, normalization_batch)
        self.norm.weight.requires_grad_(False)
        self.norm.bias.requires_grad_(False)

    def forward(self, logits):
        return self.norm(logits[:, :, None, None]).flatten(1)


def residual_blocks(model: nn.Module) -> list[nn.Module]:
    """The model's residual blocks (timm's and torchvision's BasicBlock / Bottleneck), in order."""
    return [m for m in model.modules() if hasattr(m, "conv2") and hasattr(m, "bn2") and hasattr(m, "downsample")]


def mimic(model: nn.Module, num_classes: int, normalization_batch: int | None = None) -> nn.Module:
    """Adapt, in place, a ResNet built with ``norm_layer=ChannelBias`` to MimicNorm (see the module);
    ``normalization_batch``: the logits' norm's."""
    for index, block in enumerate(residual_blocks(model), start=1):
        last = "bn3" if hasattr(block, "bn3") else "bn2"
        power = 3 if last == "bn3" else 2
        setattr(block, last, nn.Sequential(getattr(block, last), Scale(1.2**power / index)))
        if block.downsample is not None:
            block.downsample.append(Scale(1.2))
    model.fc = nn.Sequential(model.fc, LogitNorm(num_classes, normalization_batch))
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            fan_in = module.weight[0].numel()
            nn.init.normal_(module.weight, 0.0, math.sqrt(2.0 / fan_in))
            if module.bias is not None:
                nn.init.zeros_(module.bias)
    center_weights_(model)
    return model


@torch.no_grad()
def center_weights_(model: nn.Module) -> None:
    """Remove each centred conv's weight mean per output channel, in place (no autograd)."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d) and module.groups == 1 and module.weight[0].numel() > CENTER_MIN_FAN_IN:
            module.weight.sub_(module.weight.mean(dim=(1, 2, 3), keepdim=True))


def center_after_steps(optimizer: torch.optim.Optimizer, model: nn.Module):
    """Centre the weights after every ``optimizer.step()``; returns the hook's handle."""
    return optimizer.register_step_post_hook(lambda *_: center_weights_(model))

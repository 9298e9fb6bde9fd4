"""Classifiers of the comparison: timm ResNets built with any norm."""

from __future__ import annotations

from collections.abc import Callable

import timm
from timm.models.resnet import BasicBlock, ResNet
from torch import nn


def small_resnet(
    num_classes: int, in_chans: int, norm_layer: Callable, widths=(32, 64, 128, 256), stem_stride: int = 1
) -> ResNet:
    """A ResNet-10 (one basic block per stage) for 28x28 inputs: timm's ResNet with a 3x3 stem
    and no max-pool, so the four stages see 28, 14, 7 and 4 pixels (14, 7, 4 and 2 with
    ``stem_stride=2``, a quarter of the cost)."""
    model = ResNet(
        BasicBlock,
        (1, 1, 1, 1),
        num_classes=num_classes,
        in_chans=in_chans,
        channels=tuple(widths),
        norm_layer=norm_layer,
    )
    model.conv1 = nn.Conv2d(in_chans, model.conv1.out_channels, 3, stride=stem_stride, padding=1, bias=False)
    model.maxpool = nn.Identity()
    return model


def build_classifier(name: str, num_classes: int, in_chans: int, norm_layer: Callable, **options) -> nn.Module:
    """``small_resnet`` or any timm model name (resnet50 as in the paper, resnet18, ...)."""
    if name == "small_resnet":
        return small_resnet(num_classes, in_chans, norm_layer, **options)
    if name not in timm.list_models():
        raise ValueError(f"unknown model {name!r}: use small_resnet or a timm model name such as resnet50")
    return timm.create_model(
        name, pretrained=False, num_classes=num_classes, in_chans=in_chans, norm_layer=norm_layer, **options
    )

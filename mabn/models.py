"""Classifiers of the comparison: timm ResNets and a timm Vision Transformer built with any norm."""

from __future__ import annotations

from collections.abc import Callable

import timm
from timm.models.resnet import BasicBlock, ResNet
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from .norms import LayerNorm2d, TokenNorm


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
        zero_init_last=zero_init_last(norm_layer),
    )
    model.conv1 = nn.Conv2d(in_chans, model.conv1.out_channels, 3, stride=stem_stride, padding=1, bias=False)
    model.maxpool = nn.Identity()
    return model


def zero_init_last(norm_layer: Callable) -> bool:
    """timm's ResNets start each block's last gamma at 0, unless the norm was given its own initial
    gamma (``gamma_init``, Davis and Frank's 0.1 for every gamma): then every gamma starts there."""
    return getattr(norm_layer, "keywords", {}).get("gamma_init") is None


def token_norm_layer(norm_layer: Callable) -> Callable[[int], nn.Module]:
    """A transformer's ``norm_layer(dim)`` from a (N, C, H, W) norm's: ``ln`` is the transformer's own
    LayerNorm, over each token's channels (timm's, eps 1e-6); every other norm normalizes each channel
    over the batch and the tokens (``TokenNorm``), with its normalization batch."""
    if getattr(norm_layer, "func", norm_layer) is LayerNorm2d:
        return lambda dim, **factory: nn.LayerNorm(dim, eps=1e-6, **factory)
    return lambda dim, **factory: TokenNorm(norm_layer(dim, **factory))


def vit_tiny(num_classes: int, in_chans: int, norm_layer: Callable, **options) -> VisionTransformer:
    """timm's Vision Transformer (ViT-Ti: 192 channels, 12 blocks, 3 heads unless ``options`` say
    otherwise) with every LayerNorm replaced by the norm (``token_norm_layer``)."""
    shape = {"embed_dim": 192, "depth": 12, "num_heads": 3} | options
    return VisionTransformer(
        num_classes=num_classes, in_chans=in_chans, norm_layer=token_norm_layer(norm_layer), **shape
    )


def build_classifier(name: str, num_classes: int, in_chans: int, norm_layer: Callable, **options) -> nn.Module:
    """``small_resnet``, ``vit_tiny`` or any timm model name (resnet50 as in the paper, resnet18, ...)."""
    if name == "small_resnet":
        return small_resnet(num_classes, in_chans, norm_layer, **options)
    if name == "vit_tiny":
        return vit_tiny(num_classes, in_chans, norm_layer, **options)
    if name not in timm.list_models():
        raise ValueError(f"unknown model {name!r}: use small_resnet or a timm model name such as resnet50")
    if name.startswith(("resnet", "resnext", "wide_resnet")):  # timm's ResNet family
        options = {"zero_init_last": zero_init_last(norm_layer)} | options
    return timm.create_model(
        name, pretrained=False, num_classes=num_classes, in_chans=in_chans, norm_layer=norm_layer, **options
    )

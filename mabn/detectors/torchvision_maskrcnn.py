"""Mask R-CNN R-FPN from torchvision pieces, with a pluggable norm layer everywhere the paper puts one."""

from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import nn
from torchvision.models import resnet
from torchvision.models.detection import MaskRCNN
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead, FastRCNNPredictor
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from ..convert import load_backbone_state, plain_state_dict
from ..serialization import load_weights_only

TRUNKS: dict[str, Callable[..., resnet.ResNet]] = {
    "resnet18": resnet.resnet18,
    "resnet34": resnet.resnet34,
    "resnet50": resnet.resnet50,
    "resnet101": resnet.resnet101,
}


def build_maskrcnn(
    num_classes: int,
    norm_layer: Callable[[int], nn.Module],
    backbone: str = "resnet50",
    backbone_weights: str | None = None,
    min_size: int = 800,
    max_size: int = 1333,
    channels: int = 256,
    fc_channels: int = 1024,
    **maskrcnn_kwargs: Any,
) -> MaskRCNN:
    """Build Mask R-CNN with `norm_layer` in trunk, FPN, 4conv1fc box head and 4conv mask head.

    Nothing is frozen. `channels` is the width of the FPN and the head convs (256 in the
    paper), `fc_channels` that of the box head's fc (1024). The RPN head (one 3x3 conv) and
    the box/mask predictors have no norm. `maskrcnn_kwargs` go to `MaskRCNN`.
    """
    if backbone not in TRUNKS:
        raise ValueError(f"unknown backbone {backbone!r}; use one of: {', '.join(TRUNKS)}")
    trunk = TRUNKS[backbone](weights=None, norm_layer=norm_layer)
    c5 = trunk.fc.in_features
    fpn_backbone = BackboneWithFPN(
        trunk,
        return_layers={f"layer{i + 1}": str(i) for i in range(4)},
        in_channels_list=[c5 // 8, c5 // 4, c5 // 2, c5],
        out_channels=channels,
        extra_blocks=LastLevelMaxPool(),
        norm_layer=norm_layer,
    )
    if backbone_weights is not None:
        load_trunk_weights(fpn_backbone.body, backbone_weights)
    return MaskRCNN(
        fpn_backbone,
        num_classes=None,  # given by the predictors
        min_size=min_size,
        max_size=max_size,
        box_head=FastRCNNConvFCHead((channels, 7, 7), [channels] * 4, [fc_channels], norm_layer=norm_layer),
        box_predictor=FastRCNNPredictor(fc_channels, num_classes),
        mask_head=MaskRCNNHeads(channels, [channels] * 4, 1, norm_layer=norm_layer),
        mask_predictor=MaskRCNNPredictor(channels, channels, num_classes),
        **maskrcnn_kwargs,
    )


def load_trunk_weights(body: nn.Module, path: str) -> None:
    """Load a ResNet classifier checkpoint (``mabn.convert.plain_state_dict``) into the FPN
    body; its `fc` is dropped, and a stem trained on gray images (Fashion-MNIST) takes RGB
    with the same response to a gray image."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"backbone weights not found: weights={path}; give an existing file or null")
    state = plain_state_dict(load_weights_only(path))
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    channels = body.state_dict()["conv1.weight"].shape[1]
    stem = state.get("conv1.weight")
    if stem is not None and stem.shape[1] == 1 and channels > 1:  # trained on gray images
        state["conv1.weight"] = stem.repeat(1, channels, 1, 1) / channels  # same response to gray
    load_backbone_state(body, state, path)

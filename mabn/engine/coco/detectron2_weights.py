"""The detectron2 engine's weight conversion: ImageNet ResNet weights (timm, torchvision or
detectron2 naming) loaded into detectron2's ResNet. Needs no detectron2 itself."""

from __future__ import annotations

import re
from pathlib import Path

import torch

from ...convert import load_backbone_state, plain_state_dict
from ...serialization import load_weights_only

_STAGE_LAYER = re.compile(r"layer(\d)\.(\d+)\.(conv|bn)(\d)\.(.+)")
_STAGE_DOWNSAMPLE = re.compile(r"layer(\d)\.(\d+)\.downsample\.([01])\.(.+)")
_STEM = re.compile(r"(conv|bn)1\.(.+)")


def detectron2_resnet_key(key: str) -> str | None:
    """A torchvision/timm ResNet key in detectron2's ResNet naming (None: no counterpart)."""
    if key.startswith(("stem.", "res")) and not key.startswith("resnet"):
        return key  # already detectron2's
    if m := _STAGE_LAYER.fullmatch(key):
        stage, block, kind, index, rest = m.groups()
        return f"res{int(stage) + 1}.{block}.conv{index}.{'norm.' if kind == 'bn' else ''}{rest}"
    if m := _STAGE_DOWNSAMPLE.fullmatch(key):
        stage, block, index, rest = m.groups()
        return f"res{int(stage) + 1}.{block}.shortcut.{'norm.' if index == '1' else ''}{rest}"
    if m := _STEM.fullmatch(key):
        kind, rest = m.groups()
        return f"stem.conv1.{'norm.' if kind == 'bn' else ''}{rest}"
    return None


def detectron2_resnet_state(state: dict) -> tuple[dict, list[str]]:
    """(state in detectron2's ResNet naming, ignored keys) from an ImageNet ResNet state dict:
    train_imagenet.py's model_final.pt (timm), torchvision's, optionally under "model" or
    "state_dict" with "module."/"model." prefixes, or detectron2's own (``backbone.bottom_up.``).
    Centralized conv weights are stored centralized (``mabn.convert.plain_state_dict``)."""
    converted, ignored = {}, []
    for key, value in plain_state_dict(state).items():
        name = key.removeprefix("backbone.bottom_up.")
        if name.startswith("fc."):  # the classifier
            continue
        new = detectron2_resnet_key(name)
        if new is None:
            ignored.append(key)
        else:
            converted[new] = value
    return converted, ignored


def load_backbone_weights(bottom_up: torch.nn.Module, path: str) -> None:
    """Load ImageNet ResNet weights (see ``detectron2_resnet_state``) into detectron2's ResNet."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"backbone weights not found: weights={path}; give an existing file or null")
    state, ignored = detectron2_resnet_state(load_weights_only(path))
    load_backbone_state(bottom_up, state, path, ignored)

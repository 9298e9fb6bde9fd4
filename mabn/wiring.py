"""Give each norm what it needs from the model around it: ``wire_norms(model)``.

- The conv that feeds it: GN+WS standardizes that conv's weight, CBN reads its weight and
  input (``bind_conv``). "The conv that feeds a norm" is found in registration order: the most
  recent ``nn.Conv2d`` (any subclass, e.g. detectron2's) registered before the norm with as
  many output channels as the norm has channels, and no other norm in between. This holds for
  timm, torchvision and detectron2 ResNets, FPNs and ROI heads (conv, then its norm, or a conv
  owning ``.norm``).
- Its conv's weight centralized: MABN subtracts no mean, so the conv feeding it trains with
  W - mean(W) per output channel (``centralize_weights``, ``mabn.centralization``).
- The ReLU after it: a norm + activation layer (EvoNorm, FRN + TLU) replaces a norm and the
  ReLU that follows it. Where a ReLU follows the norm directly, the block stops applying it;
  everywhere else (before a residual add, whose ReLU stays, in FPNs, in shortcuts) the layer's
  own activation is turned off. Blocks decide by their type (``ACTIVATED_BLOCKS``: timm's and
  torchvision's ResNets, ``nn.Sequential`` conv-norm-ReLU runs; detectron2's blocks are added
  by ``mabn.detection.detectron2_registration``); a norm + activation layer in a module of
  another type keeps its activation, with a warning.

A norm that needs any of these (``mabn.norms.wired.NeedsWiring``) refuses to train until
``wire_norms`` has run: a model built with ``norm_layer=`` (timm, torchvision, detectron2's
``build_model``) and trained unwired would otherwise be a different model than the paper's.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import timm.models.resnet as timm_resnet
import torchvision.models.resnet as tv_resnet
from torch import nn
from torch.nn.utils import parametrize
from torchvision.models._utils import IntermediateLayerGetter

from . import norms
from .centralization import Centralize, is_centralized
from .norms.group_norm import load_plain_weight
from .norms.norm_act import NORM_ACT_LAYERS, drop_activation
from .norms.wired import NeedsWiring
from .reparametrized_conv import recompute_weight

BATCH_STAT_NORMS = (
    nn.modules.batchnorm._BatchNorm,
    norms.BatchNorm2d,
    norms.BatchRenorm2d,
    norms.MABN2d,
    norms.CrossIterationBatchNorm2d,
    norms.PowerNorm2d,
)
PAIRED_NORMS = BATCH_STAT_NORMS + (nn.GroupNorm,) + NORM_ACT_LAYERS


def conv_norm_pairs(model: nn.Module):
    """(conv name, conv, norm name, norm) for each norm fed directly by a conv."""
    pairs, last_conv = [], None
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            last_conv = (name, module)
        elif isinstance(module, norms.TokenNorm):  # over a transformer's tokens: no conv feeds it
            last_conv = None
        elif isinstance(module, PAIRED_NORMS):
            channels = getattr(module, "num_features", getattr(module, "num_channels", None))
            if channels is None:
                channels = len(module.weight)
            if last_conv is not None and last_conv[1].out_channels == channels:
                pairs.append((*last_conv, name, module))
            last_conv = None
    return pairs


def bind_convs(model: nn.Module) -> nn.Module:
    """Hand every norm that needs its conv (``bind_conv``: GN+WS, CBN) that conv."""
    for _, conv, _, norm in conv_norm_pairs(model):
        if hasattr(norm, "bind_conv"):
            norm.bind_conv(conv)
    for name, module in model.named_modules():
        if isinstance(module, norms.CrossIterationBatchNorm2d) and module._conv is None:
            raise ValueError(f"cbn at {name} is not fed by a conv of its width: use another norm there")
    return model


def centralize_weights(model: nn.Module) -> nn.Module:
    """Centralize (as a parametrization, so gradients flow through it) the weight of every
    conv feeding a layer whose class asks for it (``centralize_conv = True``: MABN, which subtracts
    no mean). Idempotent. State dicts of the plain model still load."""
    for _, conv, _, norm in conv_norm_pairs(model):
        if not getattr(norm, "centralize_conv", False) or is_centralized(conv):
            continue
        parametrize.register_parametrization(conv, "weight", Centralize())
        conv.register_load_state_dict_pre_hook(load_plain_weight)
    for module in model.modules():
        if getattr(module, "centralize_conv", False):
            module.wired = True  # a layer no conv feeds (over tokens) needs nothing more
    return model


# ---- norm + activation layers: which ReLU each takes over ----


def _is_norm_act(module) -> bool:
    return isinstance(module, NORM_ACT_LAYERS)


class TorchvisionBasicBlock(tv_resnet.BasicBlock):
    """torchvision's BasicBlock whose first norm applies the activation itself."""

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(self.bn2(self.conv2(self.bn1(self.conv1(x)))) + identity)


class TorchvisionBottleneck(tv_resnet.Bottleneck):
    """torchvision's Bottleneck whose first two norms apply the activation themselves."""

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.bn3(self.conv3(self.bn2(self.conv2(self.bn1(self.conv1(x))))))
        return self.relu(out + identity)


def _swap_class(new_class, *norm_paths):
    """A rule that gives the block ``new_class`` (same state) if its norms at ``norm_paths``
    all activate, and returns those norms."""

    def rule(block):
        taken = [block.get_submodule(path) for path in norm_paths]
        if not all(_is_norm_act(n) for n in taken):
            return []
        block.__class__ = new_class
        return taken

    return rule


def _identity_after(*pairs):
    """A rule that replaces the activation module after each (norm, activation) attribute pair."""

    def rule(block):
        taken = []
        for norm_name, act_name in pairs:
            norm = getattr(block, norm_name, None)
            if _is_norm_act(norm) and isinstance(getattr(block, act_name, None), (nn.ReLU, nn.Identity)):
                setattr(block, act_name, nn.Identity())
                taken.append(norm)
        return taken

    return rule


def _sequential(block):
    """conv-norm-ReLU runs of an ``nn.Sequential`` (torchvision's Conv2dNormActivation)."""
    children, taken = list(block.named_children()), []
    for (_, module), (name, after) in zip(children, children[1:]):
        if _is_norm_act(module) and isinstance(after, nn.ReLU):
            setattr(block, name, nn.Identity())
            taken.append(module)
    return taken


ACTIVATED_BLOCKS: dict[type, Callable[[nn.Module], list]] = {
    timm_resnet.ResNet: _identity_after(("bn1", "act1")),
    timm_resnet.BasicBlock: _identity_after(("bn1", "act1")),
    timm_resnet.Bottleneck: _identity_after(("bn1", "act1"), ("bn2", "act2")),
    tv_resnet.ResNet: _identity_after(("bn1", "relu")),
    IntermediateLayerGetter: _identity_after(("bn1", "relu")),  # a torchvision trunk inside an FPN backbone
    tv_resnet.BasicBlock: _swap_class(TorchvisionBasicBlock, "bn1"),
    tv_resnet.Bottleneck: _swap_class(TorchvisionBottleneck, "bn1", "bn2"),
}


def register_activated_block(block_type: type, rule: Callable[[nn.Module], list]) -> None:
    """Teach ``wire_norms`` a block type: ``rule(block)`` makes the block stop applying the ReLU
    after its norm + activation layers and returns those layers."""
    ACTIVATED_BLOCKS[block_type] = rule


def fuse_activations(model: nn.Module) -> nn.Module:
    """Let each norm + activation layer take the place of the ReLU after it (see the module
    docstring); idempotent."""
    taken, kept = set(), set()
    for module in list(model.modules()):
        rule = ACTIVATED_BLOCKS.get(type(module))
        if rule is None and isinstance(module, nn.Sequential):
            rule = _sequential
        if rule is not None:
            taken.update(id(layer) for layer in rule(module))
        else:
            new = [child for child in module.children() if _is_norm_act(child) and not getattr(child, "wired", False)]
            if new:
                kept.add(type(module).__name__)
                taken.update(id(child) for child in new)
    for module in model.modules():
        if _is_norm_act(module) and not getattr(module, "wired", False):
            if id(module) not in taken:
                drop_activation(module)
            module.wired = True
    if kept:
        warnings.warn(
            f"norm + activation layers in {sorted(kept)} keep their activation: check that these "
            "modules apply no other after them (or teach mabn.wiring.register_activated_block)",
            stacklevel=2,
        )
    return model


def wire_norms(model: nn.Module, centralize: bool = True, recompute_weights: bool = False) -> nn.Module:
    """Give every norm what it needs of the model around it: ``bind_convs``, then
    ``centralize_weights`` (``centralize=False``: the ablation that trains MABN without it),
    then ``fuse_activations``; every layer that needs wiring is then marked ``wired`` (until then
    it refuses to train). ``recompute_weights``: the convs whose weight is computed (MABN's
    centralized, GN+WS's standardized) recompute it in the backward instead of keeping it
    (``mabn.reparametrized_conv``: BN's memory, at a time cost where weights outweigh activations).
    Call once a model is built with any norm (``convert_model`` and the suite's entry points do);
    idempotent. Returns the model."""
    bind_convs(model)
    if centralize:
        centralize_weights(model)
    fuse_activations(model)
    for module in model.modules():
        if isinstance(module, NeedsWiring):
            module.wired = True
        if recompute_weights:
            recompute_weight(module)
    return model

"""Model surgery: swap BatchNorm2d layers for any norm (then wire them, ``mabn.wiring``), and
fold norms into convs for inference.

"The conv that feeds a norm" is ``mabn.wiring.conv_norm_pairs``'s: by the dataflow, and a norm no
conv feeds (a pre-activation block's first, DenseNet's) is left unfolded.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn
from torch.nn.utils import parametrize

from . import norms
from .norms.centralization import Centralize
from .registry import build_norm
from .wiring import conv_norm_pairs, foldable_norms, wire_norms

SHARED_STATE = ("running_mean", "running_var", "num_batches_tracked")


def convert_model(model: nn.Module, norm: str, centralize: bool | None = None, **options) -> nn.Module:
    """Replace every trainable ``nn.BatchNorm2d`` (incl. SyncBatchNorm) of ``model`` by
    ``norm`` built with ``options``, sharing the affine parameters (and, where the new layer
    has them, the running statistics), like ``nn.SyncBatchNorm.convert_sync_batchnorm``. A norm +
    activation layer of timm (``BatchNormAct2d``: EfficientNet, ...) becomes
    ``nn.Sequential(new norm, its dropout, its activation)``, so the activation stays.
    Then ``wire_norms`` (CBN and GN+WS get their convs, EvoNorm and FRN the ReLU after them,
    MABN centralized convs unless ``centralize`` is False). Returns the new root module."""

    def swap(module):
        if isinstance(module, (nn.BatchNorm2d, nn.SyncBatchNorm)) and module.affine:
            new = build_norm(norm, module.num_features, **options)
            new.to(device=module.weight.device, dtype=module.weight.dtype)  # the model's dtype: buffers too
            new.weight, new.bias = module.weight, module.bias
            for name in SHARED_STATE:
                if hasattr(new, name) and getattr(module, name, None) is not None:
                    setattr(new, name, getattr(module, name))
            if not hasattr(module, "act"):
                return new
            after = [getattr(module, name, nn.Identity()) for name in ("drop", "act")]  # timm's BatchNormAct2d
            return nn.Sequential(new, *[m for m in after if not isinstance(m, nn.Identity)])
        for name, child in module.named_children():
            module.add_module(name, swap(child))
        return module

    return wire_norms(swap(model), centralize=centralize is not False)


def plain_state_dict(state: dict) -> dict:
    """A classifier checkpoint's weights as a plain ResNet state dict: unwrapped from "model" or
    "state_dict", without "module."/"model." prefixes, and centralized conv weights
    (``parametrizations.weight.original``) stored centralized under ``weight``."""
    for key in ("model", "state_dict"):
        if isinstance(state.get(key), dict):
            state = state[key]
    plain = {}
    for name, value in state.items():
        while name.startswith(("module.", "model.")):
            name = name.split(".", 1)[1]
        if name.endswith(".parametrizations.weight.original"):
            name, value = name.removesuffix(".parametrizations.weight.original") + ".weight", Centralize()(value)
        plain[name] = value
    return plain


def load_backbone_state(module: nn.Module, state: dict, path, ignored: list | None = None) -> None:
    """Load ``state`` (the backbone weights given as ``weights=path``) into ``module``: a shape
    that differs or a key of the module that ``state`` lacks is refused in one line; the keys the
    module lacks (and ``ignored``, keys dropped before) are named in one warning."""
    own = {k.replace(".parametrizations.weight.original", ".weight"): v for k, v in module.state_dict().items()}
    wrong = [
        f"{k} {tuple(v.shape)}!={tuple(own[k].shape)}" for k, v in state.items() if k in own and v.shape != own[k].shape
    ]
    if wrong:
        raise ValueError(
            f"weights={path} has shape mismatches {wrong[:3]}; save them from the same backbone architecture"
        )
    missing, unexpected = module.load_state_dict(state, strict=False)
    if missing:
        raise ValueError(
            f"weights={path} lacks {len(missing)} backbone keys, e.g. {missing[:3]}; "
            "use weights trained with the same backbone and norm layer"
        )
    ignored = [*(ignored or []), *unexpected]
    if ignored:
        warnings.warn(
            f"weights={path}: ignored {len(ignored)} keys the backbone lacks, e.g. {ignored[:3]}", stacklevel=3
        )


def bake_parametrization(module: nn.Module, name: str) -> None:
    """Make ``module``'s parametrized ``name`` a plain parameter holding its current value. torch's
    ``remove_parametrizations`` deletes ``name`` from the module's class, which every deep copy of
    the module shares (baking a copy broke its original): the module gets a class of its own first."""
    cls = type(module)
    module.__class__ = type(cls.__name__, cls.__bases__, dict(cls.__dict__))
    parametrize.remove_parametrizations(module, name, leave_parametrized=True)


def inference_affine(norm: nn.Module):
    """(scale, shift) of an eval-mode BN-like norm, or None if it is not a per-channel affine."""
    if isinstance(norm, norms.MABN2d) or (isinstance(norm, norms.PowerNorm2d) and norm.scaling_groups is None):
        return norm.inference_scale(), norm.bias
    if isinstance(norm, norms.CrossIterationBatchNorm2d):
        return norm.inference_affine()
    if isinstance(norm, foldable_norms()) and getattr(norm, "running_var", None) is not None:
        weight = norm.weight if norm.weight is not None else torch.ones_like(norm.running_var)
        bias = norm.bias if norm.bias is not None else torch.zeros_like(norm.running_var)
        scale = weight * torch.rsqrt(norm.running_var + norm.eps)
        return scale, bias - norm.running_mean * scale
    return None


@torch.no_grad()
def fold_norms(model: nn.Module) -> nn.Module:
    """Fold every BN/BRN/MABN/CBN that a conv feeds (``conv_norm_pairs``) into that conv, in place: the conv gets the
    eval-mode affine in its weight and bias, the norm becomes ``nn.Identity``. Only valid for
    inference (call on an eval-mode model); outputs equal the unfolded eval-mode model."""
    for _, conv, norm_name, norm in conv_norm_pairs(model):
        affine = inference_affine(norm)
        if affine is None:
            continue
        scale, shift = affine
        if parametrize.is_parametrized(conv, "weight"):
            bake_parametrization(conv, "weight")
        conv.weight.mul_(scale.view(-1, 1, 1, 1))
        bias = conv.bias * scale + shift if conv.bias is not None else shift.clone()
        conv.bias = nn.Parameter(bias.detach())
        parent_name, _, attr = norm_name.rpartition(".")
        setattr(model.get_submodule(parent_name), attr, nn.Identity())
    return model

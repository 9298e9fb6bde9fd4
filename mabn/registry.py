"""Norms by name: ``build_norm("mabn", 64, sma_window=16)``, ``norm_layer("gn")`` for timm,
torchvision and detectron2, and ``register_norm`` for new names."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable

import torch
from torch import nn

from . import norms
from .mimicnorm import ChannelBias

NormFactory = Callable[..., nn.Module]

NORMS: dict[str, NormFactory] = {
    "bn": norms.BatchNorm2d,
    "syncbn": norms.SyncBatchNorm,
    "gn": norms.GroupNorm,
    "ln": norms.LayerNorm2d,
    "in": norms.InstanceNorm2d,
    "brn": norms.BatchRenorm2d,
    "mabn": norms.MABN2d,
    "cbn": norms.CrossIterationBatchNorm2d,
    "evonorm_b0": norms.EvoNormB0,
    "evonorm_s0": norms.evonorm_s0,
    "frn": norms.frn,
    "gn_ws": norms.GroupNormWS,
    "powernorm": norms.PowerNorm2d,
    "mimicnorm": ChannelBias,  # the layer MimicNorm leaves in a norm's place (mabn.mimicnorm)
}


def register_norm(name: str, factory: NormFactory, overwrite: bool = False) -> None:
    """Make ``name`` available everywhere a norm is chosen; ``factory(channels, **options)``."""
    if name in NORMS and NORMS[name] is not factory and not overwrite:
        raise ValueError(f"norm {name!r} is already registered: pass overwrite=True to replace it")
    NORMS[name] = factory


def get_norm_factory(name: str) -> NormFactory:
    """The factory registered under ``name``; a clear error for unknown names."""
    try:
        return NORMS[name]
    except KeyError:
        raise ValueError(f"unknown norm {name!r}: choose one of {', '.join(sorted(NORMS))}") from None


def norm_layer(name: str | NormFactory, gamma_init: float | None = None, **options) -> Callable[[int], nn.Module]:
    """A callable ``f(channels)`` building the norm, accepted by timm, torchvision and
    detectron2. Options are checked now, so a misspelled one fails before the model is built.
    ``gamma_init``, for any norm: its gamma starts at this value instead of the layer's own
    (Davis and Frank's revisited initialization: 0.1, docs/papers.md)."""
    factory = get_norm_factory(name) if isinstance(name, str) else name
    try:
        inspect.signature(factory).bind_partial(0, **options)
    except TypeError as error:
        label = name if isinstance(name, str) else getattr(factory, "__name__", repr(factory))
        raise TypeError(f"norm {label!r} does not take these options {sorted(options)}: {error}") from None
    make = functools.partial(factory, **options)
    return make if gamma_init is None else functools.partial(_with_gamma, make=make, gamma_init=gamma_init)


def _with_gamma(*args, make: Callable[..., nn.Module], gamma_init: float, **kwargs) -> nn.Module:
    """``make(*args, **kwargs)`` with its gamma set to ``gamma_init`` (keywords only: timm rebuilds
    a partial from its function and keywords)."""
    layer = make(*args, **kwargs)
    with torch.no_grad():
        layer.weight.fill_(gamma_init)
    return layer


def build_norm(name: str | NormFactory, num_channels: int, **options) -> nn.Module:
    """Build one norm layer for ``num_channels`` channels."""
    return norm_layer(name, **options)(num_channels)

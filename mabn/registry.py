"""Norms by name: ``build_norm("mabn", 64, sma_window=16)``, ``norm_layer("gn")`` for timm,
torchvision and detectron2, and ``register_norm`` for new names."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable

from torch import nn

from . import norms

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


def norm_layer(name: str | NormFactory, **options) -> Callable[[int], nn.Module]:
    """A callable ``f(channels)`` building the norm, accepted by timm, torchvision and
    detectron2. Options are checked now, so a misspelled one fails before the model is built."""
    factory = get_norm_factory(name) if isinstance(name, str) else name
    try:
        inspect.signature(factory).bind_partial(0, **options)
    except TypeError as error:
        label = name if isinstance(name, str) else getattr(factory, "__name__", repr(factory))
        raise TypeError(f"norm {label!r} does not take these options {sorted(options)}: {error}") from None
    return functools.partial(factory, **options)


def build_norm(name: str | NormFactory, num_channels: int, **options) -> nn.Module:
    """Build one norm layer for ``num_channels`` channels."""
    return norm_layer(name, **options)(num_channels)

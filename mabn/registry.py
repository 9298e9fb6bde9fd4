"""Norms by name: ``build_norm("mabn", 64, sma_window=16)``, ``norm_layer("gn")`` for timm,
torchvision and detectron2, and ``register_norm`` for new names.

``TABLE`` declares each norm once (its name, factory, layer class, detectron2 name and traits);
every list of norms in the library derives from it (``layers``): which norms a conv feeds and
folds (``mabn.wiring``), which the probe reads (``mabn.probes``), the detectron2 names
(``mabn.detectors.detectron2_registration``)."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from . import norms
from .mimicnorm import ChannelBias
from .norms.norm_act import EvoNormS0, FilterResponseNormTlu

NormFactory = Callable[..., nn.Module]


@dataclass(frozen=True)
class NormEntry:
    """One norm of the suite, declared once: what every list of norms derives from."""

    factory: NormFactory  # factory(channels, **options) -> the layer
    layer: type | None  # the class it builds (None: not known to the lists below)
    detectron2: str | None = None  # its name in a detectron2 config (detectron2's own "GN", or one this suite adds)
    batch_statistics: bool = False  # normalizes with statistics over the samples of a (normalization) batch
    foldable: bool = False  # in eval mode a per-channel affine: folds into the conv that feeds it
    classification_only: bool = False  # a method of a classifier (MimicNorm): a detector refuses it


TABLE: dict[str, NormEntry] = {
    "bn": NormEntry(norms.BatchNorm2d, norms.BatchNorm2d, "BN_NB", batch_statistics=True, foldable=True),
    "syncbn": NormEntry(norms.SyncBatchNorm, norms.SyncBatchNorm, "SyncBN_ANY", batch_statistics=True, foldable=True),
    "gn": NormEntry(norms.GroupNorm, norms.GroupNorm, "GN"),
    "ln": NormEntry(norms.LayerNorm2d, norms.LayerNorm2d),
    "in": NormEntry(norms.InstanceNorm2d, norms.InstanceNorm2d),
    "brn": NormEntry(norms.BatchRenorm2d, norms.BatchRenorm2d, "BRN", batch_statistics=True, foldable=True),
    "mabn": NormEntry(norms.MABN2d, norms.MABN2d, "MABN", batch_statistics=True, foldable=True),
    "cbn": NormEntry(
        norms.CrossIterationBatchNorm2d, norms.CrossIterationBatchNorm2d, "CBN", batch_statistics=True, foldable=True
    ),
    "evonorm_b0": NormEntry(norms.EvoNormB0, norms.EvoNormB0, "EvoNormB0", batch_statistics=True),  # not affine
    "evonorm_s0": NormEntry(norms.evonorm_s0, EvoNormS0, "EvoNormS0"),
    "frn": NormEntry(norms.frn, FilterResponseNormTlu, "FRN"),
    "gn_ws": NormEntry(norms.GroupNormWS, norms.GroupNormWS, "GN_WS"),
    # folds without group scaling (scaling_groups=None), not its default: mabn.convert.inference_affine decides
    "powernorm": NormEntry(norms.PowerNorm2d, norms.PowerNorm2d, "PowerNorm", batch_statistics=True, foldable=True),
    # the layer MimicNorm leaves in a norm's place (mabn.mimicnorm)
    "mimicnorm": NormEntry(ChannelBias, ChannelBias, classification_only=True),
}


class _Factories(Mapping):
    """``TABLE``'s factories by name: a view, so a row added or removed shows here too."""

    def __getitem__(self, name: str) -> NormFactory:
        return TABLE[name].factory

    def __iter__(self):
        return iter(TABLE)

    def __len__(self) -> int:
        return len(TABLE)


NORMS: Mapping[str, NormFactory] = _Factories()


def layers(trait: str | None = None) -> tuple[type, ...]:
    """The layer classes of the table's norms (with ``trait`` true, where given)."""
    chosen = (e.layer for e in TABLE.values() if e.layer is not None and (trait is None or getattr(e, trait)))
    return tuple(dict.fromkeys(chosen))


def register_norm(
    name: str, factory: NormFactory, overwrite: bool = False, layer: type | None = None, **traits
) -> None:
    """Make ``name`` available everywhere a norm is chosen: a row of ``TABLE`` with
    ``factory(channels, **options)``, the ``layer`` class it builds (the factory itself if a
    class) and ``traits`` (``NormEntry``'s fields: ``foldable=True``, ...)."""
    if name in NORMS and NORMS[name] is not factory and not overwrite:
        raise ValueError(f"norm {name!r} is already registered: pass overwrite=True to replace it")
    TABLE[name] = NormEntry(factory, layer or (factory if isinstance(factory, type) else None), **traits)


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

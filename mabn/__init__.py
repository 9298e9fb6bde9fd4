"""MABN: the normalization layers of Yan et al. (ICLR 2020) and its baselines, by name."""

from .convert import centralize_weights, convert_model, fold_norms
from .norms import (BatchNorm2d, BatchRenorm2d, CrossIterationBatchNorm2d, EvoNormB0, GroupNorm, GroupNormWS,
                    InstanceNorm2d, LayerNorm2d, MABN2d, SyncBatchNorm)
from .registry import NORMS, build_norm, norm_layer, register_norm
from .wiring import wire_norms

__all__ = [
    "BatchNorm2d", "BatchRenorm2d", "GroupNorm", "InstanceNorm2d", "LayerNorm2d", "MABN2d",
    "SyncBatchNorm", "CrossIterationBatchNorm2d", "EvoNormB0", "GroupNormWS", "NORMS", "build_norm",
    "norm_layer", "register_norm", "convert_model", "centralize_weights", "fold_norms", "wire_norms",
]

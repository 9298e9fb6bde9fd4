"""MABN: the normalization layers of Yan et al. (ICLR 2020) and its baselines, by name.

The names below load on first use (PEP 562), so ``import mabn.config`` stays light: an entry
point checks its config and fails on bad input before torch, timm and the layers load."""

import importlib

_HOMES = {
    ".convert": ("convert_model", "fold_norms"),
    ".norms": (
        "BatchNorm2d",
        "BatchRenorm2d",
        "CrossIterationBatchNorm2d",
        "EvoNormB0",
        "GroupNorm",
        "GroupNormWS",
        "InstanceNorm2d",
        "LayerNorm2d",
        "MABN2d",
        "PowerNorm2d",
        "SyncBatchNorm",
        "TokenNorm",
        "set_micro_batch",
    ),
    ".registry": ("NORMS", "build_norm", "norm_layer", "register_norm"),
    ".wiring": ("centralize_weights", "wire_norms"),
}
_HOME = {name: module for module, names in _HOMES.items() for name in names}
__all__ = list(_HOME)


def __getattr__(name: str):
    if name not in _HOME:
        raise AttributeError(f"module 'mabn' has no attribute {name!r}")
    value = getattr(importlib.import_module(_HOME[name], __name__), name)
    globals()[name] = value
    return value

"""Reading checkpoints and weights files without running code (``torch.load(weights_only=True)``)."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import torch

from .config import ConfigError, first_line

# what our checkpoints hold besides tensors and plain values: numpy's RNG state (a uint32 array)
NUMPY_STATE = [
    getattr(np, "_core", getattr(np, "core", None)).multiarray._reconstruct,
    np.ndarray,
    np.dtype,
    type(np.dtype(np.uint32)),
]


def load_weights_only(path: str | Path):
    """``torch.load`` with ``weights_only=True``: tensors, plain values and numpy's RNG state
    only, so opening a file from elsewhere runs no code. A file that needs more is refused
    with one line (``ConfigError``); one that cannot be read (truncated, corrupted, not a
    checkpoint) is a one-line ``ValueError`` naming it."""
    try:
        with torch.serialization.safe_globals(NUMPY_STATE):
            return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as error:
        if "Unsupported global" not in str(error):  # a broken file, not a refused object: unreadable
            raise ValueError(f"{path} is not a readable torch checkpoint ({first_line(error, 120)})") from None
        raise ConfigError(
            f"{path} holds more than tensors and plain Python values, so it is not loaded "
            "(it could run code): save plain state_dicts, or load it yourself if you trust it"
        ) from None

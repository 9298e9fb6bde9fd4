"""Atomic checkpoints in the run directory (the previous one kept), read without running
code (``weights_only``), and the RNG states that exact resume needs."""

from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path

import numpy as np
import torch

from ..config import ConfigError, first_line
from ..serialization import load_weights_only

CHECKPOINT, PREVIOUS = "checkpoint.pt", "checkpoint.prev.pt"


def checkpoint_path(run_dir: str | Path) -> Path:
    return Path(run_dir) / CHECKPOINT


def save_atomic(obj, path: str | Path, keep_previous: bool = False) -> Path:
    """torch.save to a temporary file in the same folder, then rename over ``path``: a
    crash mid-write leaves the previous file intact. ``keep_previous``: the file it replaces
    becomes checkpoint.prev.pt (the fallback of ``load_checkpoint``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path.parent, prefix=path.name, suffix=".tmp", delete=False) as f:
        tmp = Path(f.name)
    try:
        torch.save(obj, tmp)
        if keep_previous and path.is_file():
            os.replace(path, path.with_name(PREVIOUS))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def load_checkpoint(run_dir: str | Path) -> dict | None:
    """The newest readable checkpoint of the run (checkpoint.pt, else checkpoint.prev.pt), or
    None. One that cannot be read (truncated, corrupted) is reported in one line and skipped."""
    paths = [p for p in (Path(run_dir) / CHECKPOINT, Path(run_dir) / PREVIOUS) if p.is_file()]
    for path in paths:
        try:
            return load_weights_only(path)
        except ConfigError:  # readable, but refused: not a reason to fall back
            raise
        except (OSError, ValueError) as error:  # load_weights_only's ValueError names the file
            reason = first_line(error) if str(path) in str(error) else f"cannot read {path} ({first_line(error)})"
            print(f"warning: {reason}: skipping it", flush=True)
    if paths:
        print(f"warning: no readable checkpoint in {run_dir}: starting the run over", flush=True)
    return None


def rng_states() -> dict:
    states = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng_states(states: dict) -> None:
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])

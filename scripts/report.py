"""Shared by the benchmark and results scripts: where a benchmark ran, and printing a
markdown report that is also written to ``--out``."""

from __future__ import annotations

import platform
from pathlib import Path

import torch


def machine(device: str) -> str:
    """The GPU's name, or the CPU and the number of threads torch uses."""
    if str(device).startswith("cuda"):
        return torch.cuda.get_device_name()
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def publish(text: str, out: Path | None) -> None:
    print(text)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n")

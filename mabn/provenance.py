"""Which code, packages and machine made a result: recorded in every run's summary, checkpoint and
W&B config, so a kept result can be traced to its commit and rerun (``python -m mabn.verify``)."""

from __future__ import annotations

import functools
import importlib.metadata
import platform
import subprocess
from pathlib import Path

import torch

PACKAGES = ("torch", "torchvision", "timm", "detectron2")
NOT_RECORDED = "not recorded"


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else the architecture."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine(device) -> str:
    """The GPU's name, or the CPU, the instruction set torch's CPU kernels use (CPU results differ
    bit for bit between AVX2 and AVX512 machines) and the number of threads torch uses."""
    if str(device).startswith("cuda"):
        return torch.cuda.get_device_name()
    return f"CPU ({cpu_name()}, {torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} threads)"


@functools.cache
def source() -> dict:
    """The git commit of the checkout this package is imported from, and whether tracked files
    differ from it (``dirty``; the reports and kept summaries under ``results/``, which a study
    rewrites as its runs finish, do not count); both None for an installed copy outside a checkout."""
    root = Path(__file__).resolve().parents[1]

    def git(*args) -> str | None:
        try:
            done = subprocess.run(["git", "-C", root, *args], capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    if git("rev-parse", "--show-toplevel") != str(root):
        return {"commit": None, "dirty": None}
    changed = git("status", "--porcelain", "--untracked-files=no", "--", ".", ":(exclude)results")
    return {"commit": git("rev-parse", "HEAD"), "dirty": bool(changed)}


def version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def provenance(device="cpu") -> dict:
    """Commit (and uncommitted changes), Python and package versions, device and threads."""
    return {
        **source(),
        "python": platform.python_version(),
        **{package: version(package) for package in PACKAGES},
        "device": machine(device),
        "threads": torch.get_num_threads(),
    }


def commit_label(summary: dict) -> str:
    """A run summary's commit in a report: the short hash, ``+changes`` if the tree was dirty."""
    recorded = summary.get("provenance") or {}
    if not recorded.get("commit"):
        return NOT_RECORDED
    return recorded["commit"][:10] + ("+changes" if recorded.get("dirty") else "")

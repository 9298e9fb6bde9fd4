"""Measuring what a norm costs: bytes saved for the backward (counted with saved-tensor hooks, so
exact and device independent), for one layer or a model's whole training step, and the peak memory
a step adds; and the one timing loop and table pieces every ``scripts/bench_*.py`` uses (round
robin, medians, ratios taken in the same run, the machine line, markdown)."""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import math
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from torch import nn

from .provenance import machine


def saved_bytes(layer, x, dy, dtype=None) -> int:
    """Bytes of the tensors the layer saves for its backward beyond its own parameters and buffers,
    which live on anyway (each storage counted once; values kept as attributes of an autograd
    Function's ctx are not seen). A weight computed from a parameter in the forward (a
    parametrization's: MABN's centralized conv weights, GN+WS's standardized ones) counts."""
    storages = {}
    own = (
        {t.untyped_storage().data_ptr() for t in (*layer.parameters(), *layer.buffers())}
        if isinstance(layer, nn.Module)
        else set()
    )

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in own:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with (
        torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor),
        torch.autocast(x.device.type, dtype=dtype, enabled=dtype is not None),
    ):
        out = layer(x)
    out.backward(dy)
    if x.is_cuda:
        torch.cuda.synchronize()
    return sum(storages.values())


def training_step_saved_bytes(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> int:
    """Bytes a classifier's training step (forward, cross-entropy, backward) saves for its backward."""
    loss = _Loss(model, labels)
    return saved_bytes(loss, images, torch.ones(()))


def peak_bytes(call: Callable[[], object], device) -> int | None:
    """The peak memory ``call`` adds above what was in use before it: CUDA's
    ``max_memory_allocated`` on a GPU; on Linux CPUs, the peak of the process's resident memory
    (``VmHWM``, reset through ``/proc/self/clear_refs``), once ``follow_live_memory`` has made the
    resident memory follow the live tensors: call it first thing in the process (memory the heap
    already holds is reused unseen). None where neither is available."""
    gc.collect()
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        call()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    if not follow_live_memory():
        return None
    before = _process_memory("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # the peak restarts from the present
    call()
    return _process_memory("VmHWM") - before


def _process_memory(field: str) -> int:
    """A field of /proc/self/status (VmRSS, VmHWM), in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def follow_live_memory() -> bool:
    """Make glibc's ``malloc`` give every block of 64 KiB or more back to the system when it is freed
    (its mmap threshold set, which also turns its adjustment off; trim threshold 0), so that the
    process's resident memory follows the live tensors; whether that, and the /proc files
    ``peak_bytes`` reads, are available."""
    if not Path("/proc/self/clear_refs").exists():
        return False
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(mallopt(m_mmap_threshold, 64 * 1024)) and bool(mallopt(m_trim_threshold, 0))


class _Loss(nn.Module):
    def __init__(self, model: nn.Module, labels: torch.Tensor):
        super().__init__()
        self.model, self.labels = model, labels

    def forward(self, images):
        return nn.functional.cross_entropy(self.model(images), self.labels)


# ---- timing: one loop for every benchmark script ----


def round_robin(
    cases: Mapping[str, Callable[[int], object]], rounds: int, warmup: int = 1, device: str = "cpu"
) -> dict[str, list[float]]:
    """Seconds of each case's call in each of ``rounds`` timed rounds, after ``warmup`` untimed
    ones: the cases in turn, the order rotating each round, so that drift and cache effects fall
    on all alike; CUDA synchronized around each call. A case is called with the round's index
    (warm-ups first), e.g. to seed it so that every case does the same work in a round."""
    labels, times = list(cases), {label: [] for label in cases}
    for index in range(warmup + rounds):
        shift = index % len(labels)
        for label in labels[shift:] + labels[:shift]:
            _synchronize(device)
            start = time.perf_counter()
            cases[label](index)
            _synchronize(device)
            if index >= warmup:
                times[label].append(time.perf_counter() - start)
    return times


def _synchronize(device) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def paired_ratios(values, baseline) -> list[float]:
    """Each round's value over the baseline's in that round."""
    return [v / b for v, b in zip(values, baseline)]


def paired_ratio(values, baseline) -> float:
    """The median over rounds of ``paired_ratios``."""
    return statistics.median(paired_ratios(values, baseline))


def median_interval(samples, level: float = 0.95) -> tuple[float, float]:
    """A distribution-free interval for the median: the k-th smallest and k-th largest sample,
    with the largest k whose coverage, ``1 - 2 P(Binomial(n, 1/2) < k)``, is at least ``level``
    (no assumption on the noise's shape); (nan, nan) when even the extremes cover less (n < 6 at
    95 %)."""
    ordered, n = sorted(samples), len(samples)
    k, below = 0, 0.0  # below: P(Binomial(n, 1/2) <= k)
    while k < n // 2:
        below += math.comb(n, k) / 2**n
        if 1 - 2 * below < level:
            break
        k += 1
    return (ordered[k - 1], ordered[n - k]) if k else (math.nan, math.nan)


def paired_ratio_text(values, baseline) -> str:
    """``paired_ratio`` and the 95 % ``median_interval`` of the rounds' ratios: "0.91 [0.88, 0.95]"."""
    ratios = paired_ratios(values, baseline)
    low, high = median_interval(ratios)
    interval = "" if math.isnan(low) else f" [{low:.2f}, {high:.2f}]"
    return f"{statistics.median(ratios):.2f}{interval}"


def setting(device) -> str:
    """The machine and the torch version, for a table's title."""
    return f"{machine(str(device))}, torch {torch.__version__}"


def command(argv=None) -> str:
    """The line that says which command made a table."""
    return f"Command: `python {shlex.join(sys.argv if argv is None else argv)}`"


def markdown_table(columns, rows) -> list[str]:
    """A markdown table: its header, its rule and one line per row (cells as given)."""
    return [
        "| " + " | ".join(columns) + " |",
        "|---" * len(columns) + "|",
        *("| " + " | ".join(str(cell) for cell in row) + " |" for row in rows),
    ]


def training_step(model: nn.Module, optimizer, images: torch.Tensor, labels: torch.Tensor, amp: bool = False) -> None:
    """One training step of a classifier: forward (under autocast if ``amp``), cross-entropy,
    backward, update."""
    with torch.autocast(images.device.type, enabled=amp):
        loss = nn.functional.cross_entropy(model(images), labels)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def training_case(model: nn.Module, optimizer, images, labels, steps: int = 1, amp: bool = False):
    """A ``round_robin`` case: ``steps`` training steps on one fixed batch."""

    def case(_round: int) -> None:
        for _ in range(steps):
            training_step(model, optimizer, images, labels, amp)

    return case

"""The norms' training math compiled by inductor on CPU: BN, BRN and MABN (with groups), CBN's
statistics and backward, GN+WS's weight standardization, PowerNorm, and the norm + activation
layers (EvoNorm-B0/S0, FRN + TLU).

In eager PyTorch a grouped BN/BRN/MABN call is 75-125 small ops around torch's batch-norm
kernels, which costs up to 2x ``nn.BatchNorm2d`` at small maps. Written as plain tensor
functions and compiled with static shapes, the same math becomes a statistics reduction and one
pass that writes y (a reduction and one pass that writes dx in the backward), faster than
``nn.BatchNorm2d`` on this CPU (``scripts/bench_norms.py``).

Compiling is opt-in, as it pays only over long runs: a library user gets the eager kernels unless
``MABN_FUSED`` (1 or dynamic) is set or the program calls ``use``; the entry points compile for runs of
at least ``fused_min_steps`` steps (``choose_for_run``), the benchmarks always (``use("1")``).

Once on, the layers call ``Fused`` functions where ``applies``: fp32 tensors on CPU (on CUDA, where inductor
generates Triton kernels, only with ``MABN_FUSED_CUDA=1``: off until measured there), outside an outer
``torch.compile``, without ``MABN_FUSED=0`` in the environment, for the first ``SHAPES`` input
shapes (each costs a few seconds to compile once; with ``MABN_FUSED=dynamic``, for inputs whose
size changes from batch to batch as in detection, a graph for the first size, then ones dynamic in
the sizes that change, for ungrouped layers), and until a compilation failed here (a missing C++
compiler, say: one warning, then the eager kernels for the rest of the process).
"""

from __future__ import annotations

import os
import warnings

import torch

_broken = False
SHAPES = 64  # distinct input shapes compiled per process; new ones beyond go to the eager kernels
_shapes = set()


_chosen = None  # what the program chose (use, choose_for_run); MABN_FUSED overrides it


def mode() -> str:
    """``MABN_FUSED``: "0" (off), "dynamic" (a graph for the first input size, then ones dynamic in
    the sizes that change, for inputs whose size changes from batch to batch; ungrouped layers
    only) or "1" (static shapes); without it, what the program chose (``use``, ``choose_for_run``),
    else "0": a library user's first steps compile nothing."""
    return os.environ.get("MABN_FUSED") or _chosen or "0"


def use(chosen: str) -> str:
    """Choose the kernels for this process ("0", "1" or "dynamic"; ``MABN_FUSED`` still wins);
    returns the mode in force."""
    global _chosen
    _chosen = chosen
    return mode()


def choose_for_run(planned_steps: int, min_steps: int) -> str:
    """Compile only where it pays: without ``MABN_FUSED``, a run of fewer than ``min_steps``
    training steps keeps the eager kernels (compiling costs about 30 s on a cold cache, which
    the compiled kernels save back only after about 2000 steps of the quick start's model);
    returns the mode in force."""
    return use("1" if planned_steps >= min_steps else "0")


def enabled() -> bool:
    """Whether this process runs fused functions at all (see the module)."""
    return not _broken and mode() != "0" and not torch.compiler.is_compiling()


def applies(x: torch.Tensor, groups: int) -> bool:
    """Whether the fused functions run for input ``x`` split into ``groups``."""
    on_device = x.device.type == "cpu" or (x.device.type == "cuda" and os.environ.get("MABN_FUSED_CUDA") == "1")
    if not on_device or x.dtype != torch.float32 or not enabled():
        return False
    if mode() == "dynamic":  # dynamic shapes make slow grouped reductions: those stay eager
        return groups == 1
    key = (x.shape, x.stride(), groups)
    if key not in _shapes and len(_shapes) < SHAPES:
        _shapes.add(key)
    return key in _shapes


class Fused:
    """``fn`` compiled with static shapes, one graph per distinct call signature, or with
    torch.compile's automatic dynamic shapes (``mode`` "dynamic"): a static graph for the first
    call, then one dynamic in the sizes that changed. Unlike ``dynamic=True``, that keeps the
    Python numbers (momentum, eps, BRN's schedule) constants of the graph instead of inputs,
    which made each call of BRN's forward about 1.5x slower at detection's small tensors.

    Dynamo's recompile limit (8 graphs per function by default) would send a ninth shape
    (ResNet-50 has nine norm shapes) to eager execution of the plain formulas, so it is raised
    during these calls (``SHAPES`` bounds them). Where compiling fails, the call runs ``fn``
    eagerly (slow, same result) and ``applies`` is False from then on.
    """

    def __init__(self, fn):
        self.fn, self.compiled = fn, {}

    def __call__(self, *args):
        global _broken
        dynamic = mode() == "dynamic"
        if dynamic not in self.compiled:  # wrapped at the first call: importing mabn loads no compiler
            self.compiled[dynamic] = torch.compile(self.fn) if dynamic else torch.compile(self.fn, dynamic=False)
        config = torch._dynamo.config
        limit = config.recompile_limit
        config.recompile_limit = max(limit, 4 * SHAPES)
        try:
            return self.compiled[dynamic](*args)
        except Exception as error:
            _broken = True
            first_line = str(error).splitlines()[0] if str(error) else ""
            warnings.warn(
                f"mabn: inductor could not compile the fused norms ({type(error).__name__}: "
                f"{first_line}); using the eager kernels. Set MABN_FUSED=0 to skip the attempt.",
                RuntimeWarning,
                stacklevel=2,
            )
            return self.fn(*args)
        finally:
            config.recompile_limit = limit


class Kernels:
    """A norm's plain training functions (its forward's and its backward's) and their ``Fused``
    versions: ``pick`` gives the pair to run for ``x`` split into ``groups`` (``applies``)."""

    def __init__(self, train, backward):
        self.plain = train, backward
        self.compiled = Fused(train), Fused(backward)

    def pick(self, x: torch.Tensor, groups: int):
        return self.compiled if applies(x, groups) else self.plain

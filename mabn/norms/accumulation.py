"""Gradient accumulation as the layers see it: micro-batch ``index`` of ``count`` in one
optimizer step (``set_micro_batch``, which the entry points call before each micro-batch).

The paper's protocol normalizes the groups of a per-device batch one after the other, each group
a step of the running statistics and windows, while the counts of iterations (warm-ups,
schedules, burn-in) and MABN's EMA advance once per optimizer step. Accumulating k micro-batches
of one group each is the same computation if every layer keeps that split: what advances per
normalization batch advances per micro-batch, and what advances per iteration advances once per
step. The layers whose state counts iterations (BRN, MABN, CBN) are ``StepCounted``."""

from __future__ import annotations

from torch import nn


class StepCounted:
    """A layer with counts in optimizer steps; ``micro_batch`` is (index, count) in the current
    step, (0, 1) without accumulation."""

    micro_batch = (0, 1)

    def first_micro_batch(self) -> bool:
        return self.micro_batch[0] == 0

    def last_micro_batch(self) -> bool:
        return self.micro_batch[0] == self.micro_batch[1] - 1


def set_micro_batch(model: nn.Module, index: int, count: int) -> None:
    """Tell every ``StepCounted`` layer of ``model`` that micro-batch ``index`` of ``count`` of the
    optimizer step comes next."""
    if not 0 <= index < count:
        raise ValueError(f"micro-batch {index} of {count} does not exist: use 0 <= index < count")
    for module in model.modules():
        if isinstance(module, StepCounted):
            module.micro_batch = (index, count)

"""Iteration schedules of the norms (BRN's relaxation, MABN's warm-ups, CBN's burn-in) for runs
of any length.

The counts in the configs are the paper's, written for its ImageNet runs of
``PAPER_STEPS`` = 120 epochs x 5000 iterations. A run that sets
``norm.schedule_reference_steps`` to N says "these counts were written for a run of N
steps": every count is then multiplied by ``total_steps / N`` (rounded, at least 1 where it
was at least 1), so each phase keeps its fraction of the run. Left at null (the default, and
every paper experiment), the counts are used exactly as written. Per-iteration rates (EMA
momenta) are not scaled: they belong to the noise of one normalization batch, not to the run.

A count given as a fraction of the run instead (``norm.run_fractions``, e.g. CBN's burn-in,
which its authors give in epochs of the schedule: 8 of 12) is set to that fraction of the run's
steps, whatever the reference.
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import nn

PAPER_STEPS = 600_000


def scaled_count(count: int, total_steps: int, reference_steps: int) -> int:
    """``count`` iterations of a ``reference_steps`` run, for a run of ``total_steps``."""
    if reference_steps <= 0:
        raise ValueError(f"schedule_reference_steps must be positive, got {reference_steps}")
    if count <= 0:
        return count
    return max(1, round(count * total_steps / reference_steps))


def scale_schedules(
    model: nn.Module, total_steps: int, reference_steps: int | None, fractions: Mapping[str, float] | None = None
) -> dict:
    """Set, in place, the ``schedule_options`` of every norm layer of ``model``: one named in
    ``fractions`` to that fraction of ``total_steps`` (rounded); the others rescaled from a run of
    ``reference_steps`` (kept for None). Returns {layer class: {option: count}} as used."""
    fractions = dict(fractions or {})
    for name, fraction in fractions.items():
        if not 0 <= fraction <= 1:
            raise ValueError(
                f"norm.run_fractions.{name}={fraction} is not a fraction of the run: give a number in [0, 1]"
            )
    used = {}
    for module in model.modules():
        options = getattr(module, "schedule_options", ())
        for name in options:
            if name in fractions:
                setattr(module, name, round(fractions[name] * total_steps))
            elif reference_steps is not None:
                setattr(module, name, scaled_count(getattr(module, name), total_steps, reference_steps))
        if options:
            used[type(module).__name__] = {name: getattr(module, name) for name in options}
    return used


def schedule_norms(model: nn.Module, total_steps: int, norm) -> dict:
    """``scale_schedules`` with a run's norm spec (``mabn.config.NormSpec``: its
    ``schedule_reference_steps`` and ``run_fractions``)."""
    return scale_schedules(model, total_steps, norm.schedule_reference_steps, norm.run_fractions)

"""Precise statistics (Wu and Johnson, "Rethinking 'Batch' in BatchNorm", 2021): each norm's
population statistics recomputed with the final weights, in place of the running averages that
training left.

The estimator is fvcore's ``update_bn_stats`` (the one detectron2's and mmpretrain's PreciseBN
hooks use): every layer's update rate set so that one training forward sets its statistics to
that batch's, the model run in training mode without gradients over N batches, and the
population statistics those of all the batches' samples together (the batches' means and second
moments averaged, weighted by their sizes; the variance is the second moment less the squared
mean, the paper's population variance). fvcore finds torch's BatchNorm layers only; here the
same estimator serves every layer with population statistics, each through the option that
makes one forward set them:

- BN, SyncBN, BRN and CBN (``running_mean``, ``running_var``): ``momentum`` 1;
- MABN (its second moment ``ema_chi2``): ``momentum`` 1, and its warm-up extended so that a
  batch's own second moment, not the window's average, is what the EMA takes;
- PowerNorm (its second moment ``running_phi``): ``alpha_fwd`` 0.

EvoNorm-B0 keeps a running variance without its mean, from which the population variance of all
the samples cannot be formed: it keeps its running average. Feed batches of the normalization
batch's size (the statistics the layers normalize with in training). ``precise_statistics``
restores every buffer, option and RNG state afterwards, so a run that evaluates this way trains
on unchanged.
"""

from __future__ import annotations

import itertools
import math
from contextlib import contextmanager

import torch
from torch import nn

from .engine.checkpoint import restore_rng_states, rng_states
from .engine.distributed import all_reduce_sum

# (population buffers: a mean and a variance, or a second moment; the options with which one
# training forward sets them to its batch's values)
RULES = (
    (("running_mean", "running_var"), {"momentum": 1.0}),
    (("ema_chi2",), {"momentum": 1.0, "warmup_iters": math.inf}),
    (("running_phi",), {"alpha_fwd": 0.0}),
)


def population_layers(model: nn.Module) -> list[tuple[nn.Module, tuple[str, ...], dict]]:
    """(layer, its population buffers, its one-batch options) for every layer that has them."""
    return [
        (module, buffers, options)
        for module in model.modules()
        for buffers, options in RULES
        if all(isinstance(getattr(module, name, None), torch.Tensor) for name in buffers)
        and all(hasattr(module, option) for option in options)
    ]


@contextmanager
def precise_statistics(model: nn.Module, inputs, batches: int):
    """Within the block, ``model``'s population statistics are those of ``batches`` batches of
    ``inputs`` (an iterable of model inputs), over every process; on exit every buffer, option
    and RNG state is as before. Returns the number of batches used."""
    layers = population_layers(model)
    saved_buffers = [b.clone() for b in model.buffers()]
    saved_options = [{name: getattr(layer, name) for name in options} for layer, _, options in layers]
    saved_rng, was_training = rng_states(), model.training
    sizes = {}  # the samples (times positions) each layer saw in the current batch, as fvcore counts
    hooks = [
        layer.register_forward_pre_hook(lambda m, args: sizes.__setitem__(m, args[0].numel() // args[0].shape[1]))
        for layer, _, _ in layers
    ]
    try:
        for layer, _, options in layers:
            for name, value in options.items():
                setattr(layer, name, value)
        # per layer: samples seen, then the size-weighted sums of its first and second moments
        sums = [
            torch.zeros(1 + 2 * getattr(layer, names[0]).numel(), dtype=torch.float64) for layer, names, _ in layers
        ]
        used = 0
        model.train()
        with torch.no_grad():
            for x in itertools.islice(inputs, batches):
                sizes.clear()
                model(x)
                used += 1
                for (layer, names, _), total in zip(layers, sums):
                    if layer in sizes:  # used in this forward
                        total += batch_moments(layer, names, sizes[layer])
            if used == 0:
                raise ValueError("precise statistics need at least one batch: the data gave none")
            for (layer, names, _), total in zip(layers, sums):
                set_population(layer, names, all_reduce_sum(total.to(getattr(layer, names[0]).device)))
        model.train(was_training)
        yield used
    finally:
        for hook in hooks:
            hook.remove()
        for (layer, _, _), options in zip(layers, saved_options):
            for name, value in options.items():
                setattr(layer, name, value)
        with torch.no_grad():
            for buffer, value in zip(model.buffers(), saved_buffers):
                buffer.copy_(value)
        model.train(was_training)
        restore_rng_states(saved_rng)


def batch_moments(layer: nn.Module, names: tuple[str, ...], size: int) -> torch.Tensor:
    """[n, n * first moment, n * second moment] of the batch a one-batch forward just left in the
    layer's buffers (its unbiased variance undone, as fvcore does; a second-moment layer's own)."""
    values = [getattr(layer, name).detach().double().cpu() for name in names]
    if len(values) == 2:
        mean, var = values
        second = mean.square() + var * ((size - 1) / size)
    else:
        (second,) = values
        mean = torch.zeros_like(second)
    return torch.cat([torch.tensor([float(size)], dtype=torch.float64), size * mean, size * second])


def set_population(layer: nn.Module, names: tuple[str, ...], total: torch.Tensor) -> None:
    """The layer's population statistics from its summed ``batch_moments``."""
    count, (mean, second) = total[0], total[1:].chunk(2)
    mean, second = mean / count, second / count
    values = (mean, second - mean.square()) if len(names) == 2 else (second,)
    for name, value in zip(names, values):
        getattr(layer, name).copy_(value)

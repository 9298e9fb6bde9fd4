"""Pieces of a training loop shared by classification and detection: model preparation,
SGD and its learning-rate schedule, preemption signals, and the non-finite-loss stop."""

from __future__ import annotations

import inspect
import math
import signal
import time

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from .. import registry
from ..config import NormSpec
from ..probes import norm_layers
from ..wiring import wire_norms
from .distributed import Distributed


def norm_layer_from_config(norm: NormSpec):
    """``norm_layer(channels)`` for the configured norm (``norm.name`` + ``norm.options``)."""
    return registry.norm_layer(norm.name, **norm.options)


def norm_gammas(model: nn.Module) -> list[nn.Parameter]:
    """The per-channel weights (gamma) of the model's norm layers."""
    return [module.weight for _, module in norm_layers(model)]


def wire(model: nn.Module, norm: NormSpec) -> nn.Module:
    """``mabn.wire_norms`` as a run's norm config asks (``centralize_weights: false``: the ablation
    that trains MABN uncentralized; ``norm.recompute_weights=true``: computed conv weights
    recomputed in the backward, ``mabn.norms.reparametrized_conv``)."""
    return wire_norms(model, centralize=norm.centralize_weights, recompute_weights=norm.recompute_weights)


def prepare_model(model: nn.Module, norm: NormSpec, env: Distributed, channels_last: bool = False) -> nn.Module:
    """Wire the norms to their convs and activations (``mabn.wire_norms``), centralize conv
    weights for MABN (if configured), move to the device and wrap in DDP (``wrap_ddp``)."""
    wire(model, norm)
    model.to(env.device)
    if channels_last and env.device.type == "cuda":
        model.to(memory_format=torch.channels_last)
    return wrap_ddp(model, env)


def wrap_ddp(model: nn.Module, env: Distributed) -> nn.Module:
    """``model`` in DDP over the processes (itself in one process), its buffers not synchronized:
    every process keeps its own normalization statistics (the paper's per-GPU statistics);
    syncbn synchronizes them itself."""
    if env.world_size == 1:
        return model
    device_ids = [env.device.index] if env.device.type == "cuda" else None
    no_buffer_sync = (
        {"forward_sync_buffers": False}
        if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
        else {"broadcast_buffers": False}
    )
    return DistributedDataParallel(model, device_ids=device_ids, **no_buffer_sync)


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, DistributedDataParallel) else model


def build_sgd(model: nn.Module, optim_cfg, images_per_step: int, gamma_lr_factor: float = 1.0) -> torch.optim.Optimizer:
    """SGD (``optim.name`` sgd, the default) or AdamW (adamw: ``betas``; the transformers' usual
    choice) with lr = base_lr * images_per_step / reference_batch (linear scaling); weight decay on
    all parameters, as the authors' code. With ``gamma_lr_factor`` (``norm.gamma_lr_factor``:
    Davis and Frank's 1/100), the norms' gammas learn at that fraction of the lr."""
    lr = optim_cfg.base_lr * images_per_step / optim_cfg.reference_batch
    parameters = model.parameters()
    if gamma_lr_factor != 1:
        gammas = norm_gammas(unwrap(model))
        others = [p for p in model.parameters() if all(p is not gamma for gamma in gammas)]
        parameters = [{"params": others}, {"params": gammas, "lr": lr * gamma_lr_factor}]
    if optim_cfg.get("name", "sgd") == "adamw":
        return torch.optim.AdamW(parameters, lr=lr, betas=tuple(optim_cfg.betas), weight_decay=optim_cfg.weight_decay)
    return torch.optim.SGD(
        parameters,
        lr=lr,
        momentum=optim_cfg.momentum,
        weight_decay=optim_cfg.weight_decay,
        nesterov=optim_cfg.get("nesterov", False),
    )


def lr_factor(
    step: int,
    total_steps: int,
    schedule: str,
    milestones=(),
    gamma: float = 0.1,
    warmup_steps: int = 0,
    warmup_factor: float = 1.0,
) -> float:
    """Multiplier of the base lr at ``step``: linear warm-up from ``warmup_factor``, then
    ``step`` (x gamma at each milestone) or ``cosine`` (to 0 at total_steps)."""
    if schedule == "step":
        factor = gamma ** sum(step >= m for m in milestones)
    elif schedule == "cosine":
        factor = 0.5 * (1 + math.cos(math.pi * min(step, total_steps) / max(total_steps, 1)))
    else:
        raise ValueError(f"unknown lr schedule {schedule!r}: use step or cosine")
    if step < warmup_steps:
        factor *= warmup_factor + (1 - warmup_factor) * step / warmup_steps
    return factor


class CheckpointTimer:
    """A checkpoint every ``minutes`` of wall time, by this process's clock (``hooks.any_process``
    makes it one decision for all processes)."""

    def __init__(self, minutes: float):
        self.seconds = 60 * minutes
        self.reset()

    def reset(self) -> None:
        self.last = time.monotonic()

    def expired(self) -> bool:
        return time.monotonic() - self.last > self.seconds


class Preemption:
    """SIGTERM (SLURM preemption, ``scontrol requeue``), SIGUSR1 and SIGUSR2 (submitit's
    time-limit signal) become a flag that the loop checks between steps; it then saves a
    checkpoint and calls ``stop()``. For a signal that had a handler before ours (submitit's
    USR2 handler requeues the job) that handler runs then; in any case the process exits
    without a result, so a requeued job starts again and resumes from the checkpoint."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)

    def __init__(self):
        self.signum = None
        self._previous = {}
        for sig in self.SIGNALS:
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: no signal handling
                pass

    def _handle(self, signum, frame):
        self.signum = signum

    def stop(self):
        """Exit after the checkpoint is saved, handing the signal to the previous handler."""
        signum = self.signum or signal.SIGTERM
        previous = self._previous.get(signum)
        self.restore()
        if callable(previous):
            previous(signum, None)
        raise SystemExit(
            f"stopped by signal {signal.Signals(signum).name} after saving a checkpoint: "
            "relaunch the same command (or let the scheduler requeue it) to resume"
        )

    def restore(self):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def check_finite(loss: torch.Tensor, step: int, checkpoint) -> None:
    """Stop on a NaN/inf loss before it reaches the weights or a checkpoint."""
    if not torch.isfinite(loss).all():
        raise FloatingPointError(
            f"loss is {loss.item()} at step {step}: stopped before updating the weights; the last good "
            f"checkpoint is kept at {checkpoint}; lower optim.base_lr or check the data"
        )


def check_finite_weights(model: nn.Module, step: int, checkpoint) -> None:
    """Refuse to checkpoint non-finite weights (e.g. after an lr blow-up with a finite loss)."""
    if not all(torch.isfinite(p).all() for p in model.parameters()):
        raise FloatingPointError(
            f"weights are not finite after step {step}: not saving them; the last good checkpoint is "
            f"kept at {checkpoint}; lower optim.base_lr"
        )

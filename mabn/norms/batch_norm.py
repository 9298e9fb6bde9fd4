"""BN with a normalization batch, Batch Renormalization (Ioffe, 2017) and SyncBN: their eager
layers and the plain formulas that ``mabn.norms.fused`` compiles."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from . import fused
from .accumulation import StepCounted
from .kernels import (
    _GroupBatchNormFunction,
    accumulation_dtype,
    ema_states,
    group_view,
    kernel_moments,
    kernel_view,
    num_groups,
)


def relaxed(done: torch.Tensor, final: float, start: float, warmup: float, end: float) -> torch.Tensor:
    """BRN's limit after ``done`` iterations: ``start`` until ``warmup``, then linear to ``final`` at ``end``."""
    if end > warmup:
        frac = ((done - warmup) / (end - warmup)).clamp(0, 1)
    else:
        frac = (done >= warmup).to(done.dtype)
    return start + (final - start) * frac


def schedule_limits(num_iterations: torch.Tensor, schedule, dtype: torch.dtype):
    """BRN's (r_max, d_max) after ``num_iterations`` under ``schedule`` (r_max, d_max,
    warmup_iters, r_max_iters, d_max_iters), as tensors of ``dtype`` (no host synchronization)."""
    r_max, d_max, warmup, r_max_iters, d_max_iters = schedule
    done = num_iterations.to(dtype)
    return relaxed(done, r_max, 1.0, warmup, r_max_iters), relaxed(done, d_max, 0.0, warmup, d_max_iters)


def renorm_factors(var, mean, running_mean, running_var, r_max, d_max, eps: float):
    """BRN's r and d per (group, channel): each group's statistics against the running ones
    before it, clipped to the limits."""
    sigma_running = torch.sqrt(running_var + eps)
    # minimum/maximum, not clamp with tensor bounds: in this layer the latter gave gamma
    # gradients that differed from eager under torch.compile (aot_eager, torch 2.14)
    r = torch.minimum(torch.maximum(torch.sqrt(var + eps) / sigma_running, 1.0 / r_max), r_max)
    d = torch.minimum(torch.maximum((mean - running_mean) / sigma_running, -d_max), d_max)
    return r, d


def batch_norm_train(
    x,
    weight,
    bias,
    running_mean,
    running_var,
    num_batches_tracked,
    groups: int,
    momentum: float,
    eps: float,
    num_iterations=None,
    schedule=None,
):
    """BatchNorm2d's grouped training forward (BatchRenorm2d's with ``num_iterations`` and its
    ``schedule`` (r_max, d_max, warmup_iters, r_max_iters, d_max_iters)) in plain tensor ops:
    y, the group statistics (mean, var) and BRN's (r, d), (G, C) each (1 and 0 for BN); the
    running statistics are updated in place, as the layers' eager code does (BRN counts its
    iterations itself)."""
    channels = x.shape[1]
    xg = group_view(x, groups)
    var, mean = torch.var_mean(xg, dim=(1, 3), correction=0)
    count = xg.shape[1] * xg.shape[3]
    stats = torch.cat([mean, var * (count / max(count - 1, 1))], 1)
    states = ema_states(torch.cat([running_mean, running_var]), stats, momentum, last_only=schedule is None)
    running_mean.copy_(states[-1, :channels])
    running_var.copy_(states[-1, channels:])
    num_batches_tracked.add_(groups)
    r, d = torch.ones_like(var), torch.zeros_like(var)
    if schedule is not None:
        r_max, d_max = schedule_limits(num_iterations, schedule, running_var.dtype)
        r, d = renorm_factors(var, mean, states[:-1, :channels], states[:-1, channels:], r_max, d_max, eps)
    gain = torch.rsqrt(var + eps) * weight * r
    y = (xg - mean[:, None, :, None]) * gain[:, None, :, None] + (bias + weight * d)[:, None, :, None]
    return y.view(x.shape), mean, var, r, d


def batch_norm_backward(dy, x, weight, mean, var, r, d, eps: float):
    """The backward of ``batch_norm_train`` (batch normalization's, through the statistics, with
    per-group weight gamma * r and bias beta + gamma * d): dx, d gamma, d beta."""
    groups = mean.shape[0]
    xg, dyg = group_view(x, groups), group_view(dy, groups)
    inv_std = torch.rsqrt(var + eps)
    x_hat = (xg - mean[:, None, :, None]) * inv_std[:, None, :, None]
    count = xg.shape[1] * xg.shape[3]
    sum_dy, sum_dy_xhat = dyg.sum(dim=(1, 3)), (dyg * x_hat).sum(dim=(1, 3))
    gain = (weight * r * inv_std)[:, None, :, None]
    dx = gain * (dyg - (sum_dy / count)[:, None, :, None] - x_hat * (sum_dy_xhat / count)[:, None, :, None])
    return dx.view(x.shape), (sum_dy_xhat * r + sum_dy * d).sum(0), sum_dy.sum(0)


def group_moments(x, groups: int):
    """Biased variance and mean per (group, channel), (G, C) each, in plain tensor ops (compiled by
    ``mabn.norms.fused`` for the layers that take their statistics apart from their step: CBN)."""
    return torch.var_mean(group_view(x, groups), dim=(1, 3), correction=0)


class _FusedBatchNormFunction(torch.autograd.Function):
    """``batch_norm_train`` and its backward, compiled (``mabn.norms.fused``); saves x and (G, C) values."""

    fused_forward, fused_backward = fused.Fused(batch_norm_train), fused.Fused(batch_norm_backward)

    @staticmethod
    def forward(
        ctx,
        x,
        weight,
        bias,
        running_mean,
        running_var,
        num_batches_tracked,
        groups,
        momentum,
        eps,
        num_iterations=None,
        schedule=None,
    ):
        y, mean, var, r, d = _FusedBatchNormFunction.fused_forward(
            x,
            weight,
            bias,
            running_mean,
            running_var,
            num_batches_tracked,
            groups,
            momentum,
            eps,
            num_iterations,
            schedule,
        )
        ctx.save_for_backward(x, weight.detach(), mean, var, r, d)  # a plain tensor: one compiled graph
        ctx.eps = eps
        return y

    @staticmethod
    def backward(ctx, dy):
        dx, dweight, dbias = _FusedBatchNormFunction.fused_backward(dy, *ctx.saved_tensors, ctx.eps)
        return dx, dweight, dbias, *[None] * (len(ctx.needs_input_grad) - 3)


class _GroupedBatchStats(nn.Module):
    """Parameters and running statistics shared by BN and BRN (named as in nn.BatchNorm2d)."""

    def __init__(self, num_features, normalization_batch=None, eps=1e-5, momentum=0.1, device=None, dtype=None):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.num_features = num_features
        self.normalization_batch = normalization_batch
        self.eps = eps
        self.momentum = momentum
        self.weight = nn.Parameter(torch.ones(num_features, **factory))
        self.bias = nn.Parameter(torch.zeros(num_features, **factory))
        self.register_buffer("running_mean", torch.zeros(num_features, **factory))
        self.register_buffer("running_var", torch.ones(num_features, **factory))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long, device=device))

    def extra_repr(self):
        return (
            f"{self.num_features}, normalization_batch={self.normalization_batch}, "
            f"eps={self.eps}, momentum={self.momentum}"
        )

    def _eval_forward(self, x):
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)

    fused_moments = fused.Fused(group_moments)

    @torch.no_grad()
    def _group_stats(self, x, groups):
        """Biased variance and mean per (group, channel), shaped (G, C), and the group size
        (the gradient through them is _GroupBatchNormFunction's); compiled where ``mabn.norms.fused``
        applies."""
        channels, count = x.shape[1], x.numel() // (groups * x.shape[1])
        if fused.applies(x, groups):
            return *_GroupedBatchStats.fused_moments(x, groups), count
        dtype = accumulation_dtype(x)
        flat = kernel_view(x, groups)
        if flat is None:  # channels_last with several groups: mean, then squares about it
            xg = group_view(x, groups)
            mean = xg.sum(dim=(1, 3), dtype=dtype) / count
            var = (xg - mean[:, None, :, None]).square_().sum(dim=(1, 3)) / count
            return var, mean, count
        means, variances = kernel_moments(flat, dtype)
        if groups == 1:
            return variances.view(1, channels), means.view(1, channels), count
        means = means.view(groups, -1, channels)
        mean = means.mean(1)
        # within the samples of a group plus between their means (equal counts)
        var = variances.view(groups, -1, channels).mean(1) + (means - mean[:, None]).square().mean(1)
        return var, mean, count

    @torch.no_grad()
    def _running_states(self, var, mean, count, last_only=False):
        """Running (mean, var) before each group and after the last: (G + 1, C) each (with
        ``last_only``, after the last: (1, C))."""
        unbiased = var * (count / max(count - 1, 1))
        running = torch.cat([self.running_mean, self.running_var]).to(mean.dtype)
        means, vars_ = ema_states(running, torch.cat([mean, unbiased], 1), self.momentum, last_only).chunk(2, dim=1)
        self.running_mean.copy_(means[-1])
        self.running_var.copy_(vars_[-1])
        self.num_batches_tracked.add_(mean.shape[0])
        return means, vars_


class BatchNorm2d(_GroupedBatchStats):
    """BatchNorm2d with a normalization batch.

    With b >= N this is ``nn.BatchNorm2d`` (same kernel). With b < N each group of b
    consecutive samples is normalized with its own batch mean and variance, and the running
    statistics are updated once per group, in order: exactly what ``nn.BatchNorm2d`` applied
    to each group in turn would do (``num_batches_tracked`` counts groups).
    ``momentum=None`` (cumulative average) is supported only for b >= N.
    """

    def forward(self, x):
        if not self.training:
            return self._eval_forward(x)
        groups = num_groups(x.shape[0], self.normalization_batch)
        if groups == 1:
            self.num_batches_tracked.add_(1)
            momentum = self.momentum
            if momentum is None:
                momentum = 1.0 / self.num_batches_tracked.item()
            return F.batch_norm(
                x, self.running_mean, self.running_var, self.weight, self.bias, True, momentum, self.eps
            )
        if self.momentum is None:
            raise ValueError("momentum=None (cumulative average) needs normalization_batch >= batch")
        if fused.applies(x, groups):
            return _FusedBatchNormFunction.apply(
                x,
                self.weight,
                self.bias,
                self.running_mean,
                self.running_var,
                self.num_batches_tracked,
                groups,
                self.momentum,
                self.eps,
            )
        var, mean, count = self._group_stats(x, groups)
        self._running_states(var, mean, count, last_only=True)
        return _GroupBatchNormFunction.apply(
            x, mean, var, self.weight.expand(groups, -1), self.bias.expand(groups, -1), self.eps
        )


class BatchRenorm2d(StepCounted, _GroupedBatchStats):
    """Batch Renormalization (Ioffe, 2017) with a normalization batch.

    Per group: ``y = gamma * ((x - mu_B) / sigma_B * r + d) + beta`` with
    ``r = clip(sigma_B / sigma, 1/r_max, r_max)`` and ``d = clip((mu_B - mu) / sigma,
    -d_max, d_max)``, both without gradient; ``sigma = sqrt(running_var + eps)``. Running
    statistics follow BatchNorm2d's rule (once per group, in order) and each group's r, d use
    the running statistics as they stand before that group. Schedule (docs/papers.md, training setups):
    r_max = 1, d_max = 0 until ``warmup_iters`` training iterations, then both relax linearly
    to ``r_max`` at ``r_max_iters`` and ``d_max`` at ``d_max_iters``. With r_max = 1 and
    d_max = 0 it is BatchNorm2d. The iteration counts scale with the run length on request
    (``mabn.schedules``).
    """

    schedule_options = ("warmup_iters", "r_max_iters", "d_max_iters")

    def __init__(
        self,
        num_features,
        normalization_batch=None,
        eps=1e-5,
        momentum=0.01,
        r_max=3.0,
        d_max=5.0,
        warmup_iters=5000,
        r_max_iters=40000,
        d_max_iters=25000,
        device=None,
        dtype=None,
    ):
        super().__init__(num_features, normalization_batch, eps, momentum, device, dtype)
        if momentum is None:
            raise ValueError("brn needs a float momentum (running-statistics update rate)")
        self.r_max, self.d_max = r_max, d_max
        self.warmup_iters, self.r_max_iters, self.d_max_iters = warmup_iters, r_max_iters, d_max_iters
        self.register_buffer("num_iterations", torch.tensor(0, dtype=torch.long, device=device))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        """A BatchNorm2d checkpoint loads too (its schedule then starts at iteration 0)."""
        state_dict.setdefault(prefix + "num_iterations", torch.zeros_like(self.num_iterations))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self):
        return (
            f"{super().extra_repr()}, r_max={self.r_max}, d_max={self.d_max}, "
            f"warmup_iters={self.warmup_iters}, r_max_iters={self.r_max_iters}, "
            f"d_max_iters={self.d_max_iters}"
        )

    def _schedule(self):
        """The limits' schedule, in ``schedule_limits``'s order."""
        return self.r_max, self.d_max, self.warmup_iters, self.r_max_iters, self.d_max_iters

    def limits(self):
        """(r_max, d_max) for the current iteration, as tensors (no host synchronization)."""
        return schedule_limits(self.num_iterations, self._schedule(), self.running_var.dtype)

    def forward(self, x):
        if not self.training:
            return self._eval_forward(x)
        groups = num_groups(x.shape[0], self.normalization_batch)
        if fused.applies(x, groups):
            y = _FusedBatchNormFunction.apply(
                x,
                self.weight,
                self.bias,
                self.running_mean,
                self.running_var,
                self.num_batches_tracked,
                groups,
                self.momentum,
                self.eps,
                self.num_iterations,
                self._schedule(),
            )
        else:
            var, mean, count = self._group_stats(x, groups)
            means, vars_ = self._running_states(var, mean, count)
            r, d = renorm_factors(var, mean, means[:-1], vars_[:-1], *self.limits(), self.eps)
            # gamma * (x_hat * r + d) + beta: batch norm with per-group weight gamma * r
            weight, bias = self.weight * r, self.bias + self.weight * d
            y = _GroupBatchNormFunction.apply(x, mean, var, weight, bias, self.eps)
        if self.last_micro_batch():  # iterations are optimizer steps (mabn.norms.accumulation)
            self.num_iterations.add_(1)
        return y


class _AllReduceSum(torch.autograd.Function):
    """Sum over processes; the gradient of each process's input is the summed gradient."""

    @staticmethod
    def forward(ctx, values, group):
        ctx.group = group
        values = values.clone()
        dist.all_reduce(values, group=group)
        return values

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class SyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm2d with the statistics of the global batch, as ``nn.SyncBatchNorm``.

    Implemented with a differentiable all-reduce of per-channel sums, so it runs on any device
    and backend: torch's layer, and DDP around it, refuse CPU tensors (gloo). Without a process
    group (or in eval mode) it is BatchNorm2d.
    """

    def __init__(self, num_features, eps=1e-5, momentum=0.1, process_group=None, device=None, dtype=None):
        super().__init__(num_features, eps, momentum, True, True, device, dtype)
        self.process_group = process_group

    def _check_input_dim(self, x):
        if x.dim() != 4:
            raise ValueError(f"syncbn expects NCHW input, got {x.dim()}D")

    def forward(self, x):
        if not (
            self.training
            and dist.is_available()
            and dist.is_initialized()
            and dist.get_world_size(self.process_group) > 1
        ):
            return super().forward(x)
        xf = x.to(accumulation_dtype(x))
        local = torch.cat(
            [xf.sum(dim=(0, 2, 3)), xf.square().sum(dim=(0, 2, 3)), xf.new_tensor([x.numel() // x.shape[1]])]
        )
        total = _AllReduceSum.apply(local, self.process_group or dist.group.WORLD)
        channels = x.shape[1]
        count = total[-1]
        mean = total[:channels] / count
        var = total[channels : 2 * channels] / count - mean.square()
        with torch.no_grad():
            self.num_batches_tracked.add_(1)
            momentum = self.momentum if self.momentum is not None else 1.0 / self.num_batches_tracked.item()
            self.running_mean.lerp_(mean.to(self.running_mean.dtype), momentum)
            self.running_var.lerp_((var * count / (count - 1)).to(self.running_var.dtype), momentum)
        scale = self.weight * torch.rsqrt(var + self.eps)
        shift = self.bias - mean * scale
        return torch.addcmul(shift[:, None, None], x, scale[:, None, None]).to(x.dtype)

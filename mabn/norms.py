"""The normalization layers of the comparison: BN, BRN and MABN with a normalization batch,
SyncBN, GN, LN and IN.

Every layer takes the channel count first and accepts ``device``/``dtype``, so that timm,
torchvision and detectron2 can build it through ``norm_layer(channels)``.

Normalization batch: a per-device batch of N samples is split into N / b consecutive
groups of b samples, each normalized with its own statistics (b >= N, or None, is the
ordinary behaviour). This is how the paper simulates "batch 2" at an SGD batch of 32.

Kernels: in fp32 on CPU, BN with groups, BRN and MABN train through ``mabn.fused`` (the plain
formulas of ``batch_norm_train``/``batch_norm_backward`` and ``mabn_train``/``mabn_backward``,
compiled); elsewhere through eager code around torch's batch-norm kernels. Both are checked
against each other (tests/test_fused.py) and the eager code against references from the paper's
formulas (tests/test_norms.py).

None of the layers subclasses ``nn.BatchNorm2d``: torch's SyncBN conversion and
detectron2's FrozenBN conversion decide by ``isinstance(m, BatchNorm2d)`` and would
silently replace them. Parameter and buffer names follow ``nn.BatchNorm2d`` where the
meaning is the same, so BN checkpoints load into ``BatchNorm2d``/``BatchRenorm2d``.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from . import fused


def num_groups(batch_size: int, normalization_batch: int | None) -> int:
    """Number of normalization groups in a batch; raises if the batch is not divisible."""
    if normalization_batch is None or normalization_batch >= batch_size:
        return 1
    if batch_size % normalization_batch:
        raise ValueError(
            f"per-device batch {batch_size} is not divisible by normalization batch "
            f"{normalization_batch}: choose a normalization batch that divides it"
        )
    return batch_size // normalization_batch


def accumulation_dtype(x: torch.Tensor) -> torch.dtype:
    """Statistics are accumulated in fp32 for half/bf16 inputs (autocast), else in x's dtype."""
    return torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype


def ema_states(initial: torch.Tensor, stats: torch.Tensor, momentum: float, last_only: bool = False) -> torch.Tensor:
    """Running statistic before each of G sequential EMA updates, and after the last.

    ``stats`` is (G, C); returns (G + 1, C) where row k is the running value after the
    first k updates ``r <- (1 - momentum) * r + momentum * s``, as nn.BatchNorm2d applied
    to each group in turn would leave it; with ``last_only``, only the last row, (1, C).
    """
    steps = stats.shape[0]
    if steps == 1:
        final = torch.lerp(initial, stats[0], momentum)
        return final[None] if last_only else torch.stack([initial, final])
    keep = 1.0 - momentum
    if last_only:  # row G: keep^G * initial + sum_j momentum * keep^(G - 1 - j) * stats[j]
        decay = keep ** steps
        weights = momentum * torch.pow(keep, torch.arange(steps - 1, -1, -1, device=stats.device,
                                                          dtype=stats.dtype)).unsqueeze(0)
    else:
        k = torch.arange(steps + 1, device=stats.device, dtype=stats.dtype).unsqueeze(1)
        j = torch.arange(steps, device=stats.device, dtype=stats.dtype).unsqueeze(0)
        weights = torch.where(j < k, momentum * keep ** (k - 1 - j).clamp(min=0), 0.0)
        decay = keep ** k
    # a (rows, G) x (G, C) product: a broadcast sum would write rows x G x C values; in the
    # statistics' dtype, as autocast would run the product in half precision
    with torch.autocast(stats.device.type, enabled=False):
        return torch.addmm(decay * initial, weights, stats)


def per_sample(values: torch.Tensor, batch_size: int) -> torch.Tensor:
    """(G, C) per-group values as (N, C, 1, 1) per-sample values that broadcast against x
    ((1, C, 1, 1), a view, for one group)."""
    groups, channels = values.shape
    if groups == 1:
        return values.view(1, channels, 1, 1)
    return values.unsqueeze(1).expand(groups, batch_size // groups, channels).reshape(batch_size, channels, 1, 1)


def group_view(x: torch.Tensor, groups: int) -> torch.Tensor:
    """x (N, C, H, W) as (G, N / G, C, H * W): statistics reduce over dims 1 and 3."""
    return x.reshape(groups, x.shape[0] // groups, x.shape[1], -1)


def kernel_view(t: torch.Tensor, groups: int):
    """``t`` as torch's batch-norm kernels can take it with one kernel channel per (group,
    channel) or per (sample, channel); None where no view does (several groups of a
    channels_last tensor).

    One group: ``t`` itself. Several: an NCHW-contiguous ``t`` as (1, N * C, H, W), one kernel
    channel per (sample, channel), so that each pass over the activations is one fused kernel.
    """
    if groups == 1:
        return t
    return t.view(1, -1, *t.shape[2:]) if t.is_contiguous() else None


def kernel_values(batch_size: int, *values: torch.Tensor):
    """(G, C) values, one per kernel channel of ``kernel_view``: (C,) each for one group,
    (N * C,) for several; expanded together, in a few ops whatever their number."""
    stacked = torch.stack(values)
    count, groups, channels = stacked.shape
    if groups == 1:
        return stacked[:, 0].unbind()
    return stacked.unsqueeze(2).expand(count, groups, batch_size // groups, channels).reshape(count, -1).unbind()


def group_sums(values: torch.Tensor, groups: int, channels: int) -> torch.Tensor:
    """Values of the kernel channels of ``kernel_view`` (..., C) or (..., N * C) summed per group: (..., G, C)."""
    return values.view(*values.shape[:-1], groups, -1, channels).sum(-2)


def small_maps_on_cpu(flat: torch.Tensor) -> bool:
    """Whether ``kernel_moments`` shifts: fp32/fp64 on CPU, maps of at most 16 x 16 and at least
    2^18 values in all, where torch's statistics kernel costs up to 2x a shift plus sums (it is
    one pass on CUDA; below that size, the extra ops cost more than they save)."""
    return (flat.device.type == "cpu" and flat.dtype in (torch.float32, torch.float64)
            and flat.shape[2] * flat.shape[3] <= 256 and flat.numel() >= 2 ** 18)


def kernel_moments(flat: torch.Tensor, dtype: torch.dtype):
    """Mean and biased variance per kernel channel of ``flat`` (a ``kernel_view``), in ``dtype``.

    torch's statistics kernel (Welford), or on small CPU maps sums of ``x - s`` from torch's
    batch-norm backward kernel, with s the first value of each kernel channel: shifted, the
    sum of squares keeps the variance where the mean dwarfs the spread.
    """
    if not small_maps_on_cpu(flat):
        # fp32 statistics for half x, as the fp32 buffers ask
        buffers = [None, None] if dtype == flat.dtype else [flat.new_zeros(flat.shape[1], dtype=dtype),
                                                             flat.new_ones(flat.shape[1], dtype=dtype)]
        return torch.batch_norm_update_stats(flat, *buffers, 0.0)
    shift = flat[:1, :, :1, :1]
    shifted = flat - shift
    count = flat.numel() // flat.shape[1]
    # sum(dy * (x - 0) / sqrt(1 + 0)) and sum(dy) with dy = x = shifted
    _, squares, sums = torch.ops.aten.native_batch_norm_backward(
        shifted, shifted, None, flat.new_zeros(flat.shape[1]), flat.new_ones(flat.shape[1]), None, None,
        False, 0.0, [False, True, True])
    offset = sums / count
    return shift.view(-1) + offset, squares / count - offset.square()


def normalize(x, mean, var, weight, bias, eps):
    """``(x - mean) / sqrt(var + eps) * weight + bias`` with (G, C) values: one pass over x, in
    torch's batch-norm (inference) kernel where ``kernel_view`` allows."""
    flat = kernel_view(x, len(mean))
    if flat is None:  # broadcast ops
        gain = weight * torch.rsqrt(var + eps)
        return torch.addcmul(per_sample(bias - mean * gain, len(x)), x, per_sample(gain, len(x))).to(x.dtype)
    weight, bias, mean, var = kernel_values(len(x), weight, bias, mean, var)
    y = torch.batch_norm(flat, weight, bias, mean, var, False, 0.0, eps, torch.backends.cudnn.enabled)
    # reshaped without creating an autograd view, so that in-place ops may follow the layer
    return torch.ops.aten._unsafe_view(y, x.shape)


def gradient_sums(dy, x, mean, var, eps):
    """Per (group, channel), (G, C) each: ``sum(dy)`` and ``sum(dy * (x - mean) / sqrt(var + eps))``,
    in one pass over dy and x."""
    groups, channels = mean.shape
    flat = kernel_view(x, groups)
    if flat is None:
        dtype = accumulation_dtype(x)
        total = group_view(dy, groups).sum(dim=(1, 3), dtype=dtype)
        dot = (group_view(dy, groups).to(dtype) * group_view(x, groups)).sum(dim=(1, 3))
        return total, (dot - mean * total) * torch.rsqrt(var + eps)
    _, dot, total = torch.ops.aten.native_batch_norm_backward(
        dy.reshape(flat.shape), flat, None, *kernel_values(len(x), mean, var), None, None, False, eps,
        [False, True, True])
    return group_sums(torch.stack([total, dot]), groups, channels).unbind()


class _GroupBatchNormFunction(torch.autograd.Function):
    """``y = (x - mean) / sqrt(var + eps) * scale + shift`` per (group, channel), with the
    group's batch ``mean`` and biased ``var`` (given, computed without gradient); the backward
    is batch normalization's, through the statistics. The forward writes y in one pass; the
    backward reads dy and x once for the sums, then writes dx in two (``dy * gain`` plus a
    constant, then the x term in place); with one group it is torch's own backward kernel."""

    @staticmethod
    def forward(ctx, x, mean, var, scale, shift, eps):
        ctx.save_for_backward(x, mean, var, scale)
        ctx.eps = eps
        return normalize(x, mean, var, scale, shift, eps)

    @staticmethod
    def backward(ctx, dy):
        x, mean, var, scale = ctx.saved_tensors
        groups, channels = mean.shape
        inv_std = torch.rsqrt(var + ctx.eps)
        if groups == 1:
            dx, sum_dy_xhat, sum_dy = torch.ops.aten.native_batch_norm_backward(
                dy, x, scale[0], None, None, mean[0], inv_std[0], True, ctx.eps, [True, True, True])
            return dx, None, None, sum_dy_xhat[None], sum_dy[None], None
        count = x.numel() // (groups * channels)
        sum_dy, sum_dy_xhat = gradient_sums(dy, x, mean, var, ctx.eps)
        # dx = gain * (dy - sum_dy / n) - gain * k * (x - mean), x_hat = (x - mean) * inv_std
        gain = scale * inv_std
        k = sum_dy_xhat * inv_std / count
        # dy's group mean is subtracted in the kernel: gain * (dy - sum_dy / n) + gain * k * mean
        dx = normalize(dy.to(accumulation_dtype(dy)), sum_dy / count, var, scale, gain * k * mean, ctx.eps)
        dx.addcmul_(x, per_sample(-gain * k, len(x)))
        return dx.to(dy.dtype), None, None, sum_dy_xhat, sum_dy, None


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


def batch_norm_train(x, weight, bias, running_mean, running_var, num_batches_tracked, groups: int,
                     momentum: float, eps: float, num_iterations=None, schedule=None):
    """BatchNorm2d's grouped training forward (BatchRenorm2d's with ``num_iterations`` and its
    ``schedule`` (r_max, d_max, warmup_iters, r_max_iters, d_max_iters)) in plain tensor ops:
    y, the group statistics (mean, var) and BRN's (r, d), (G, C) each (1 and 0 for BN); the
    buffers are updated in place, as the layers' eager code does."""
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
        num_iterations.add_(1)
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


class _FusedBatchNormFunction(torch.autograd.Function):
    """``batch_norm_train`` and its backward, compiled (``mabn.fused``); saves x and (G, C) values."""

    fused_forward, fused_backward = fused.Fused(batch_norm_train), fused.Fused(batch_norm_backward)

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, num_batches_tracked, groups, momentum, eps,
                num_iterations=None, schedule=None):
        y, mean, var, r, d = _FusedBatchNormFunction.fused_forward(
            x, weight, bias, running_mean, running_var, num_batches_tracked, groups, momentum, eps, num_iterations,
            schedule)
        ctx.save_for_backward(x, weight.detach(), mean, var, r, d)  # a plain tensor: one compiled graph
        ctx.eps = eps
        return y

    @staticmethod
    def backward(ctx, dy):
        dx, dweight, dbias = _FusedBatchNormFunction.fused_backward(dy, *ctx.saved_tensors, ctx.eps)
        return dx, dweight, dbias, *[None] * (len(ctx.needs_input_grad) - 3)


class _GroupedBatchStats(nn.Module):
    """Parameters and running statistics shared by BN and BRN (named as in nn.BatchNorm2d)."""

    def __init__(self, num_features, normalization_batch=None, eps=1e-5, momentum=0.1,
                 device=None, dtype=None):
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
        return (f"{self.num_features}, normalization_batch={self.normalization_batch}, "
                f"eps={self.eps}, momentum={self.momentum}")

    def _eval_forward(self, x):
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                            False, 0.0, self.eps)

    @torch.no_grad()
    def _group_stats(self, x, groups):
        """Biased variance and mean per (group, channel), shaped (G, C), and the group size
        (the gradient through them is _GroupBatchNormFunction's)."""
        channels, count = x.shape[1], x.numel() // (groups * x.shape[1])
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
            return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                                True, momentum, self.eps)
        if self.momentum is None:
            raise ValueError("momentum=None (cumulative average) needs normalization_batch >= batch")
        if fused.applies(x, groups):
            return _FusedBatchNormFunction.apply(x, self.weight, self.bias, self.running_mean, self.running_var,
                                                 self.num_batches_tracked, groups, self.momentum, self.eps)
        var, mean, count = self._group_stats(x, groups)
        self._running_states(var, mean, count, last_only=True)
        return _GroupBatchNormFunction.apply(x, mean, var, self.weight.expand(groups, -1),
                                             self.bias.expand(groups, -1), self.eps)


class BatchRenorm2d(_GroupedBatchStats):
    """Batch Renormalization (Ioffe, 2017) with a normalization batch.

    Per group: ``y = gamma * ((x - mu_B) / sigma_B * r + d) + beta`` with
    ``r = clip(sigma_B / sigma, 1/r_max, r_max)`` and ``d = clip((mu_B - mu) / sigma,
    -d_max, d_max)``, both without gradient; ``sigma = sqrt(running_var + eps)``. Running
    statistics follow BatchNorm2d's rule (once per group, in order) and each group's r, d use
    the running statistics as they stand before that group. Schedule (REFERENCE.md section 3):
    r_max = 1, d_max = 0 until ``warmup_iters`` training iterations, then both relax linearly
    to ``r_max`` at ``r_max_iters`` and ``d_max`` at ``d_max_iters``. With r_max = 1 and
    d_max = 0 it is BatchNorm2d. The iteration counts scale with the run length on request
    (``mabn.schedules``).
    """

    schedule_options = ("warmup_iters", "r_max_iters", "d_max_iters")

    def __init__(self, num_features, normalization_batch=None, eps=1e-5, momentum=0.01,
                 r_max=3.0, d_max=5.0, warmup_iters=5000, r_max_iters=40000, d_max_iters=25000,
                 device=None, dtype=None):
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
        return (f"{super().extra_repr()}, r_max={self.r_max}, d_max={self.d_max}, "
                f"warmup_iters={self.warmup_iters}, r_max_iters={self.r_max_iters}, "
                f"d_max_iters={self.d_max_iters}")

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
            return _FusedBatchNormFunction.apply(
                x, self.weight, self.bias, self.running_mean, self.running_var, self.num_batches_tracked, groups,
                self.momentum, self.eps, self.num_iterations, self._schedule())
        var, mean, count = self._group_stats(x, groups)
        means, vars_ = self._running_states(var, mean, count)
        r_max, d_max = self.limits()
        self.num_iterations.add_(1)
        r, d = renorm_factors(var, mean, means[:-1], vars_[:-1], r_max, d_max, self.eps)
        # gamma * (x_hat * r + d) + beta: batch norm with per-group weight gamma * r
        weight, bias = self.weight * r, self.bias + self.weight * d
        return _GroupBatchNormFunction.apply(x, mean, var, weight, bias, self.eps)


class _MABNFunction(torch.autograd.Function):
    """MABN's normalization with its own backward (REFERENCE.md section 1).

    Forward ``y = gamma * r * x * inv_std + beta`` per (group, channel), with
    ``inv_std = 1 / sqrt(var + eps)`` and r constants. Backward ``dx = (g - z * psi) * inv_std``
    with ``g = dy * gamma * r``, ``z = x * inv_std`` and psi the window average (or batch
    value) of ``mean(g * z)``; the window buffer ``psi_window`` is advanced here, in place.
    The forward writes y in one pass; the backward reads dy and x once for the sums, then writes
    ``g * inv_std`` and subtracts ``z * psi * inv_std`` in place.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, var, r, psi_window, use_window, eps):
        ctx.save_for_backward(x, weight, var, r, use_window)
        ctx.psi_window = psi_window  # state advanced by backward, not a saved value
        ctx.eps = eps
        return normalize(x, torch.zeros_like(var), var, weight * r, bias.expand_as(var), eps)

    @staticmethod
    def backward(ctx, dy):
        x, weight, var, r, use_window = ctx.saved_tensors
        groups, channels = var.shape
        zero = torch.zeros_like(var)
        sum_dy, dy_z = gradient_sums(dy, x, zero, var, ctx.eps)
        gain = weight * r
        psi = gain * dy_z / (x.numel() // (groups * channels))
        psi_sma, history = window_average(ctx.psi_window, psi)
        ctx.psi_window.copy_(history)
        psi = torch.where(use_window, psi_sma, psi)
        dx = normalize(dy, zero, var, gain, zero, ctx.eps)  # g * inv_std
        dx.addcmul_(x, per_sample(psi.div(var + ctx.eps).neg_(), len(x)))  # - z * psi * inv_std
        return dx.to(dy.dtype), (r * dy_z).sum(0), sum_dy.sum(0), None, None, None, None, None


def window_average(history: torch.Tensor, current: torch.Tensor):
    """Simple moving average over the last m steps for each of G new steps.

    ``history`` (m, C) holds the previous m step statistics, oldest first; ``current``
    (G, C) the new ones in order. Returns the (G, C) averages of the m most recent values at
    each new step, and the new (m, C) history.
    """
    window = history.shape[0]
    sequence = torch.cat([history, current.to(history.dtype)])
    averages = sequence.unfold(0, window, 1)[1:].mean(-1)
    return averages, sequence[-window:]


class MABN2d(nn.Module):
    """Moving Average Batch Normalization (Yan et al., ICLR 2020), REFERENCE.md section 1.

    Per channel, with chi2 the second moment mean(x^2) of a normalization batch and psi the
    backward statistic mean(g * z): no mean subtraction (pair with weight centralization of
    the conv that feeds it: ``mabn.convert_model``); chi2 and psi averaged over the last
    ``sma_window`` normalization batches (SMA); ``y = gamma * r * x / sqrt(chi2_sma + eps) +
    beta`` with ``r = sqrt(chi2_sma + eps) / sqrt(ema_chi2 + eps)`` clipped to
    [1/r_max, r_max] and without gradient; inference uses ``gamma * x / sqrt(ema_chi2 + eps) +
    beta``.

    Groups of a batch are consecutive steps of the window (as the authors' ImageNet code), so
    any per-device batch divisible by the normalization batch works. Relation to the
    authors' ``MABN.py``:

    - batch statistics (no SMA) while ``num_iterations < warmup_iters`` (100, as MABN.py) or
      while the window does not yet hold ``sma_window`` real statistics (MABN.py waits one
      iteration longer: ``iteration <= buffer_size``);
    - r is held at 1 while ``num_iterations <= renorm_warmup_iters`` (1000 = MABN.py's
      ``max(1000, warmup_iters)``), then clipped to [1/5, 5];
    - ``ema_chi2`` is updated once per iteration with the mean over groups of the statistic
      used to normalize, momentum 0.02 in PyTorch's convention (the paper's 0.98), and is set
      to that value on the first iteration (the ImageNet code; MABN.py starts it at 1);
    - eps = 1e-5.

    The authors' ImageNet layer (cls/networks/MABN.py) uses each group's own statistics on
    iteration 1, the window from iteration 2 on, and r = 1 for 99 iterations:
    ``warmup_iters=2, renorm_warmup_iters=99`` (``norm=mabn_imagenet_code``). The iteration
    counts scale with the run length on request (``mabn.schedules``).

    Ablations: ``forward_stat`` "sma" (default), "batch" (current group only) or "ema"
    (normalize by the EMA after warm-up, r = 1); ``backward_stat`` "sma" (default) or
    "batch"; ``renorm=False`` holds r at 1. Weight centralization is a property of the conv,
    see ``mabn.convert.centralize_weights``.

    Training uses no host synchronization (no ``.item()``, no branch on tensor values).
    Gradient checkpointing would advance the windows twice per step: not supported.
    """

    schedule_options = ("warmup_iters", "renorm_warmup_iters")

    def __init__(self, num_features, normalization_batch=None, sma_window=16, momentum=0.02,
                 eps=1e-5, warmup_iters=100, renorm_warmup_iters=1000, r_max=5.0,
                 forward_stat="sma", backward_stat="sma", renorm=True, device=None, dtype=None):
        super().__init__()
        if forward_stat not in ("sma", "batch", "ema"):
            raise ValueError(f"mabn forward_stat must be sma, batch or ema, got {forward_stat!r}")
        if backward_stat not in ("sma", "batch"):
            raise ValueError(f"mabn backward_stat must be sma or batch, got {backward_stat!r}")
        if sma_window < 1:
            raise ValueError(f"mabn sma_window must be >= 1, got {sma_window}")
        factory = {"device": device, "dtype": dtype}
        self.num_features = num_features
        self.normalization_batch = normalization_batch
        self.sma_window = sma_window
        self.momentum = momentum
        self.eps = eps
        self.warmup_iters = warmup_iters
        self.renorm_warmup_iters = renorm_warmup_iters
        self.r_max = r_max
        self.forward_stat = forward_stat
        self.backward_stat = backward_stat
        self.renorm = renorm
        self.weight = nn.Parameter(torch.ones(num_features, **factory))
        self.bias = nn.Parameter(torch.zeros(num_features, **factory))
        self.register_buffer("ema_chi2", torch.ones(num_features, device=device))
        self.register_buffer("chi2_window", torch.zeros(sma_window, num_features, device=device))
        self.register_buffer("psi_window", torch.zeros(sma_window, num_features, device=device))
        self.register_buffer("num_iterations", torch.tensor(0, dtype=torch.long, device=device))

    def extra_repr(self):
        return (f"{self.num_features}, normalization_batch={self.normalization_batch}, "
                f"sma_window={self.sma_window}, momentum={self.momentum}, eps={self.eps}, "
                f"warmup_iters={self.warmup_iters}, renorm_warmup_iters={self.renorm_warmup_iters}, "
                f"r_max={self.r_max}, forward_stat={self.forward_stat}, "
                f"backward_stat={self.backward_stat}, renorm={self.renorm}")

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        """A BatchNorm2d checkpoint loads too: its second moment var + mean^2 seeds the EMA."""
        if prefix + "running_var" in state_dict and prefix + "ema_chi2" not in state_dict:
            mean = state_dict.pop(prefix + "running_mean")
            state_dict[prefix + "ema_chi2"] = state_dict.pop(prefix + "running_var") + mean.square()
            state_dict.pop(prefix + "num_batches_tracked", None)
            for name in ("chi2_window", "psi_window", "num_iterations"):
                state_dict.setdefault(prefix + name, getattr(self, name))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def inference_scale(self):
        """Per-channel multiplier of the eval-mode layer (its shift is ``bias``)."""
        return self.weight * torch.rsqrt(self.ema_chi2 + self.eps)

    def forward(self, x):
        if not self.training:
            zero = torch.zeros_like(self.ema_chi2)
            return F.batch_norm(x, zero, self.ema_chi2, self.weight, self.bias, False, 0.0, self.eps)
        groups = num_groups(x.shape[0], self.normalization_batch)
        if fused.applies(x, groups):
            return _FusedMABNFunction.apply(x, self.weight, self.bias, self.ema_chi2, self.chi2_window, self.psi_window,
                                            self.num_iterations, groups, self._options(),
                                            self.backward_stat == "batch")
        with torch.no_grad():
            var, r, use_window = mabn_statistics(x, groups, self.ema_chi2, self.chi2_window, self.num_iterations,
                                                 *self._options())
        if self.backward_stat == "batch":
            use_window = torch.zeros_like(use_window)
        return _MABNFunction.apply(x, self.weight, self.bias, var, r, self.psi_window, use_window, self.eps)

    def _options(self):
        """The statistics options of ``mabn_statistics``, in its order."""
        return (self.momentum, self.eps, self.warmup_iters, self.renorm_warmup_iters, self.r_max,
                self.forward_stat, self.renorm)


def window_in_use(iteration, groups: int, sma_window: int, warmup_iters: int):
    """(G, 1): whether each group's step (G steps per iteration) uses the window averages:
    the window holds ``sma_window`` real statistics and warm-up is over."""
    if groups == 1:
        return (iteration >= max(sma_window, warmup_iters)).view(1, 1)
    step = (iteration - 1) * groups + torch.arange(1, groups + 1, device=iteration.device)
    return ((step >= sma_window) & (iteration >= warmup_iters)).unsqueeze(1)


def mabn_statistics(x, groups: int, ema_chi2, chi2_window, num_iterations, momentum: float, eps: float,
                    warmup_iters: int, renorm_warmup_iters: int, r_max: float, forward_stat: str, renorm: bool):
    """MABN2d's forward statistics: advance the chi2 window, the EMA and the iteration count (in
    place); return the normalizing chi2, r and the SMA mask, (G, C), (G, C), (G, 1)."""
    num_iterations.add_(1)
    iteration = num_iterations
    count = x.numel() // (groups * x.shape[1])
    squares = torch.linalg.vector_norm(x, dim=(2, 3), dtype=accumulation_dtype(x)).square()
    chi2 = squares.view(groups, -1, x.shape[1]).sum(1) / count
    chi2_sma, history = window_average(chi2_window, chi2)
    chi2_window.copy_(history)
    use_window = window_in_use(iteration, groups, chi2_window.shape[0], warmup_iters)
    smoothed = torch.where(use_window, chi2_sma, chi2)
    ema_before = ema_chi2.clone()
    target = smoothed.mean(0)  # set on the first iteration, then moved by momentum
    moved = torch.lerp(ema_before, target.to(ema_before.dtype), momentum)
    ema_chi2.copy_(torch.where(iteration == 1, target, moved))
    if forward_stat == "batch":
        var = chi2
    elif forward_stat == "ema":
        var = torch.where(use_window, ema_before, chi2)
    else:
        var = smoothed
    if not renorm:
        return var, torch.ones_like(var), use_window
    r = ((var + eps) / (ema_before + eps)).sqrt_()
    clipped = torch.where(iteration > renorm_warmup_iters, r.clamp_(1.0 / r_max, r_max), 1.0)
    return var, clipped, use_window


def mabn_train(x, weight, bias, ema_chi2, chi2_window, num_iterations, groups: int, options, batch_backward: bool):
    """MABN2d's training forward in plain tensor ops: y, and the normalizing chi2, r and the
    backward's SMA mask (``mabn_statistics``, whose ``options`` these are)."""
    var, r, use_window = mabn_statistics(x, groups, ema_chi2, chi2_window, num_iterations, *options)
    if batch_backward:
        use_window = torch.zeros_like(use_window)
    gain = weight * r * torch.rsqrt(var + options[1])
    y = group_view(x, groups) * gain[:, None, :, None] + bias[:, None]
    return y.view(x.shape), var, r, use_window


def mabn_backward(dy, x, weight, var, r, psi_window, use_window, eps: float):
    """``_MABNFunction``'s backward in plain tensor ops; advances ``psi_window`` in place."""
    groups = var.shape[0]
    xg, dyg = group_view(x, groups), group_view(dy, groups)
    inv_std = torch.rsqrt(var + eps)
    sum_dy, dy_z = dyg.sum(dim=(1, 3)), (dyg * xg).sum(dim=(1, 3)) * inv_std
    gain = weight * r
    psi = gain * dy_z / (xg.shape[1] * xg.shape[3])
    psi_sma, history = window_average(psi_window, psi)
    psi_window.copy_(history)
    psi = torch.where(use_window, psi_sma, psi)
    dx = (gain * inv_std)[:, None, :, None] * dyg - xg * (psi / (var + eps))[:, None, :, None]
    return dx.view(x.shape), (r * dy_z).sum(0), sum_dy.sum(0)


class _FusedMABNFunction(torch.autograd.Function):
    """``mabn_train`` and ``mabn_backward``, compiled (``mabn.fused``); saves x and (G, C) values."""

    fused_forward, fused_backward = fused.Fused(mabn_train), fused.Fused(mabn_backward)

    @staticmethod
    def forward(ctx, x, weight, bias, ema_chi2, chi2_window, psi_window, num_iterations, groups, options,
                batch_backward):
        y, var, r, use_window = _FusedMABNFunction.fused_forward(x, weight, bias, ema_chi2, chi2_window,
                                                                 num_iterations, groups, options, batch_backward)
        ctx.save_for_backward(x, weight.detach(), var, r, use_window)  # a plain tensor: one compiled graph
        ctx.psi_window = psi_window  # state advanced by backward, not a saved value
        ctx.eps = options[1]
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, var, r, use_window = ctx.saved_tensors
        dx, dweight, dbias = _FusedMABNFunction.fused_backward(dy, x, weight, var, r, ctx.psi_window, use_window,
                                                               ctx.eps)
        return dx, dweight, dbias, *[None] * (len(ctx.needs_input_grad) - 3)


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

    def __init__(self, num_features, eps=1e-5, momentum=0.1, process_group=None,
                 device=None, dtype=None):
        super().__init__(num_features, eps, momentum, True, True, device, dtype)
        self.process_group = process_group

    def _check_input_dim(self, x):
        if x.dim() != 4:
            raise ValueError(f"syncbn expects NCHW input, got {x.dim()}D")

    def forward(self, x):
        if not (self.training and dist.is_available() and dist.is_initialized()
                and dist.get_world_size(self.process_group) > 1):
            return super().forward(x)
        xf = x.to(accumulation_dtype(x))
        local = torch.cat([xf.sum(dim=(0, 2, 3)), xf.square().sum(dim=(0, 2, 3)),
                           xf.new_tensor([x.numel() // x.shape[1]])])
        total = _AllReduceSum.apply(local, self.process_group or dist.group.WORLD)
        channels = x.shape[1]
        count = total[-1]
        mean = total[:channels] / count
        var = total[channels:2 * channels] / count - mean.square()
        with torch.no_grad():
            self.num_batches_tracked.add_(1)
            momentum = self.momentum if self.momentum is not None else 1.0 / self.num_batches_tracked.item()
            self.running_mean.lerp_(mean.to(self.running_mean.dtype), momentum)
            self.running_var.lerp_((var * count / (count - 1)).to(self.running_var.dtype), momentum)
        scale = self.weight * torch.rsqrt(var + self.eps)
        shift = self.bias - mean * scale
        return torch.addcmul(shift[:, None, None], x, scale[:, None, None]).to(x.dtype)


class GroupNorm(nn.GroupNorm):
    """Group Normalization (Wu & He, 2018), channels first, 32 groups by default."""

    def __init__(self, num_channels, num_groups=32, eps=1e-5, affine=True, device=None, dtype=None):
        if num_channels % num_groups:
            raise ValueError(
                f"gn: {num_channels} channels are not divisible by {num_groups} groups: "
                f"set num_groups to a divisor of {num_channels}")
        super().__init__(num_groups, num_channels, eps, affine, device, dtype)


class LayerNorm2d(GroupNorm):
    """Layer Normalization over (C, H, W) per sample: GroupNorm with one group (GN paper's LN)."""

    def __init__(self, num_channels, eps=1e-5, affine=True, device=None, dtype=None):
        super().__init__(num_channels, 1, eps, affine, device, dtype)


class InstanceNorm2d(GroupNorm):
    """Instance Normalization with affine: GroupNorm with one channel per group (GN paper's IN)."""

    def __init__(self, num_channels, eps=1e-5, affine=True, device=None, dtype=None):
        super().__init__(num_channels, num_channels, eps, affine, device, dtype)

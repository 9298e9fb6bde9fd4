"""Shared pieces of the batch-statistics norms: the normalization batch (groups of a batch),
running-statistics updates, and one-pass kernels around torch's batch-norm kernels."""

from __future__ import annotations

import torch


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
        decay = keep**steps
        weights = momentum * torch.pow(
            keep, torch.arange(steps - 1, -1, -1, device=stats.device, dtype=stats.dtype)
        ).unsqueeze(0)
    else:
        k = torch.arange(steps + 1, device=stats.device, dtype=stats.dtype).unsqueeze(1)
        j = torch.arange(steps, device=stats.device, dtype=stats.dtype).unsqueeze(0)
        weights = torch.where(j < k, momentum * keep ** (k - 1 - j).clamp(min=0), 0.0)
        decay = keep**k
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
    return (
        flat.device.type == "cpu"
        and flat.dtype in (torch.float32, torch.float64)
        and flat.shape[2] * flat.shape[3] <= 256
        and flat.numel() >= 2**18
    )


def kernel_moments(flat: torch.Tensor, dtype: torch.dtype):
    """Mean and biased variance per kernel channel of ``flat`` (a ``kernel_view``), in ``dtype``.

    torch's statistics kernel (Welford), or on small CPU maps sums of ``x - s`` from torch's
    batch-norm backward kernel, with s the first value of each kernel channel: shifted, the
    sum of squares keeps the variance where the mean dwarfs the spread.
    """
    if not small_maps_on_cpu(flat):
        # fp32 statistics for half x, as the fp32 buffers ask
        buffers = (
            [None, None]
            if dtype == flat.dtype
            else [flat.new_zeros(flat.shape[1], dtype=dtype), flat.new_ones(flat.shape[1], dtype=dtype)]
        )
        return torch.batch_norm_update_stats(flat, *buffers, 0.0)
    shift = flat[:1, :, :1, :1]
    shifted = flat - shift
    count = flat.numel() // flat.shape[1]
    # sum(dy * (x - 0) / sqrt(1 + 0)) and sum(dy) with dy = x = shifted
    _, squares, sums = torch.ops.aten.native_batch_norm_backward(
        shifted,
        shifted,
        None,
        flat.new_zeros(flat.shape[1]),
        flat.new_ones(flat.shape[1]),
        None,
        None,
        False,
        0.0,
        [False, True, True],
    )
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
        dy.reshape(flat.shape),
        flat,
        None,
        *kernel_values(len(x), mean, var),
        None,
        None,
        False,
        eps,
        [False, True, True],
    )
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
                dy, x, scale[0], None, None, mean[0], inv_std[0], True, ctx.eps, [True, True, True]
            )
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

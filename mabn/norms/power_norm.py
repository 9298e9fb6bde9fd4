"""PowerNorm (Shen, Yao, Gholami, Mahoney, Keutzer, ICML 2020), docs/papers.md: MABN's twin for
transformers, written from the authors' layer (github sIncerass/powernorm,
``fairseq/modules/norms/mask_powernorm.py``: ``MaskPowerNorm``, ``PowerFunction``, ``GroupScaling1D``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import fused
from .kernels import group_view, num_groups, per_sample


def _grouped(x: torch.Tensor, groups: int) -> torch.Tensor:
    """(N, C, ...) as (N, groups, C / groups, ...)."""
    return x.reshape(x.shape[0], groups, x.shape[1] // groups, *x.shape[2:])


def scaling_inverse(x: torch.Tensor, groups: int, eps: float = 1e-5) -> torch.Tensor:
    """1 / the root mean square of each of ``groups`` groups of consecutive channels at every
    position, (N, groups, 1, ...): a norm kernel, no squared copy of x."""
    grouped = _grouped(x, groups)
    mean_square = torch.linalg.vector_norm(grouped, dim=2, keepdim=True).square() / grouped.shape[2]
    return torch.rsqrt(mean_square + eps)


def group_scaling(x: torch.Tensor, groups: int, inverse: torch.Tensor | None = None) -> torch.Tensor:
    """The authors' ``GroupScaling1D`` for (N, C, H, W): at every position (every token), each of
    ``groups`` groups of consecutive channels divided by the root of its mean square (times
    ``inverse``, ``scaling_inverse``, where given)."""
    inverse = scaling_inverse(x, groups) if inverse is None else inverse
    return (_grouped(x, groups) * inverse).reshape(x.shape)


def group_scaling_backward(grad: torch.Tensor, x: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
    """The gradient of x through ``group_scaling``: ``r (g - x r mean(g x r))``, the mean over each
    group's channels, r its ``inverse``."""
    groups = inverse.shape[1]
    grouped, grad = _grouped(x, groups), _grouped(grad, groups)
    dot = (grad * grouped).mean(2, keepdim=True) * inverse.square()
    return (inverse * (grad - grouped * dot)).reshape(x.shape)


def powernorm_train(
    x, weight, bias, running_phi, num_iterations, groups: int, scaling_groups, alpha_fwd: float, warmup_iters, eps
):
    """PowerNorm's training forward in plain tensor ops: group scaling (where ``scaling_groups``),
    then per (group, channel) the mean square s and the divisor (s during warm-up, the running phi
    before the group after it), advancing ``running_phi`` and ``num_iterations`` group by group in
    place (no host synchronization); y, the scaling's inverse root mean squares (None without it),
    s and the divisors, (G, C) each."""
    inverse = None if scaling_groups is None else scaling_inverse(x, scaling_groups)
    scaled = x if inverse is None else group_scaling(x, scaling_groups, inverse)
    second_moment = group_view(scaled, groups).to(running_phi.dtype).square().mean(dim=(1, 3))
    divisors, phi = [], running_phi
    for s in second_moment:
        num_iterations.add_(1)
        t = num_iterations.to(phi.dtype)
        divisors.append(torch.where(num_iterations <= warmup_iters, s, phi))
        averaged = phi * (t - 1) / t + s / t
        phi = torch.where(num_iterations < warmup_iters, averaged, phi)
        phi = alpha_fwd * phi + (1 - alpha_fwd) * s
    running_phi.copy_(phi)
    divisor = torch.stack(divisors)
    scale = weight * torch.rsqrt(divisor + eps)
    y = scaled * per_sample(scale, len(x)).to(x.dtype) + bias.to(x.dtype)[:, None, None]
    return y, inverse, second_moment, divisor


def powernorm_backward(dy, x, inverse, second_moment, divisor, weight, ema_gz, alpha_bkw: float, eps: float):
    """The authors' approximate backward of ``powernorm_train``, one group after the other (each a
    step of their iteration): ``g~ = gamma * dy - (1 - alpha_bkw) * u * z``, ``u <- u + mean(g~ * z)``,
    ``dx = g~ / sqrt(s + eps)``, with z the forward's normalized (scaled) x, s the group's own mean
    square (the authors divide by it even after warm-up, where the forward divided by the running
    value) and u the buffer ``ema_gz``, advanced in place; then through the group scaling.

    The iteration runs on (G, C) values only, ``mean(g~ z) = gamma mean(dy x) / sqrt(divisor + eps)
    - (1 - alpha_bkw) u s / (divisor + eps)``: one pass over dy and x for the sums and one that
    writes dx, whatever the number of groups. Returns dx, d gamma, d beta."""
    groups, keep = divisor.shape[0], 1 - alpha_bkw
    scaled = x if inverse is None else group_scaling(x, inverse.shape[1], inverse)
    dtype = second_moment.dtype  # the statistics' precision (fp32 under autocast)
    xg, dyg = group_view(scaled, groups), group_view(dy, groups)
    sum_dy, sum_dy_x = dyg.sum(dim=(1, 3), dtype=dtype), (dyg * xg).sum(dim=(1, 3), dtype=dtype)
    inv_divisor = torch.rsqrt(divisor + eps)
    mean_g_z = weight * sum_dy_x / (xg.shape[1] * xg.shape[3]) * inv_divisor  # mean(gamma dy z) per group
    mean_z2 = second_moment * inv_divisor.square()
    u, steps = ema_gz.clone(), []  # a copy: the buffer is overwritten below
    for k in range(groups):  # each group is one step of the running estimate u
        steps.append(u)
        u = u + mean_g_z[k] - keep * u * mean_z2[k]
    ema_gz.copy_(u)
    inv_second = torch.rsqrt(second_moment + eps)
    # dx = (gamma dy - keep u z) / sqrt(s + eps), z = x / sqrt(divisor + eps)
    gain, coefficient = (
        per_sample(weight * inv_second, len(x)),
        per_sample(-keep * torch.stack(steps) * inv_divisor * inv_second, len(x)),
    )
    dx = (dy.to(dtype) * gain + scaled.to(dtype) * coefficient).to(dy.dtype)  # in the statistics' precision
    if inverse is not None:
        dx = group_scaling_backward(dx, x, inverse)
    return dx, (sum_dy_x * inv_divisor).sum(0), sum_dy.sum(0)


KERNELS = fused.Kernels(powernorm_train, powernorm_backward)


class _PowerFunction(torch.autograd.Function):
    """``powernorm_train`` and ``powernorm_backward`` as one autograd function, compiled
    (``mabn.norms.fused``) where ``fused.applies``: keeps x, the scaling's inverse root mean squares (1 /
    C-th of x per scaling group) and (G, C) values; the scaling is recomputed in the backward."""

    @staticmethod
    def forward(ctx, x, weight, bias, running_phi, num_iterations, ema_gz, options, alpha_bkw):
        """``options``: (groups, scaling_groups, alpha_fwd, warmup_iters, eps) of ``powernorm_train``."""
        train, ctx.backward = KERNELS.pick(x, options[0])
        y, inverse, second_moment, divisor = train(x, weight, bias, running_phi, num_iterations, *options)
        ctx.save_for_backward(x, inverse, second_moment, divisor, weight.detach())  # a plain tensor: one graph
        ctx.ema_gz, ctx.alpha_bkw, ctx.eps = ema_gz, alpha_bkw, options[-1]
        return y

    @staticmethod
    def backward(ctx, dy):
        dx, dweight, dbias = ctx.backward(dy, *ctx.saved_tensors, ctx.ema_gz, ctx.alpha_bkw, ctx.eps)
        return dx, dweight, dbias, *[None] * 5


class PowerNorm2d(nn.Module):
    """PowerNorm as the authors' ``MaskPowerNorm``, for (N, C, H, W) maps and (through
    ``mabn.norms.TokenNorm``) token sequences, with a normalization batch like BN's.

    Per channel, training step t (counted from 1, one step per normalization batch, groups of a
    batch in order): group scaling first (``scaling_groups`` groups of channels at each position
    divided by their root mean square, recomputed in the backward; None turns it off), then the batch's
    mean square s = mean(x^2) (no mean subtracted); ``z = x / sqrt(s + eps)`` while t <=
    ``warmup_iters``, else ``x / sqrt(phi + eps)`` with the running ``phi`` before this step; then
    ``phi <- phi (t - 1) / t + s / t`` while t < ``warmup_iters`` and always ``phi <- alpha_fwd phi
    + (1 - alpha_fwd) s``; ``y = gamma z + beta``. The backward replaces the batch's mean(g z) by
    the running estimate ``ema_gz`` (see ``_PowerFunction``). Eval: ``gamma x / sqrt(phi + eps) +
    beta`` after group scaling.

    Defaults are the authors' class's (eps 1e-5, alpha_fwd = alpha_bkw = 0.9, warm-up 10000, one
    scaling group); their fairseq builder passes the number of attention heads as the scaling
    groups and 1000 (or the transformer's ``warmup_updates``) as the warm-up. Not built: their
    padding mask (statistics over the non-padded tokens only); no model here pads.
    """

    schedule_options = ("warmup_iters",)

    def __init__(
        self,
        num_features,
        normalization_batch=None,
        alpha_fwd=0.9,
        alpha_bkw=0.9,
        eps=1e-5,
        warmup_iters=10000,
        scaling_groups=1,
        device=None,
        dtype=None,
    ):
        super().__init__()
        if scaling_groups is not None and num_features % scaling_groups:
            raise ValueError(
                f"powernorm scaling_groups={scaling_groups} does not divide {num_features} channels: "
                "choose a divisor (or None to turn group scaling off)"
            )
        factory = {"device": device, "dtype": dtype}
        statistics = {"device": device, "dtype": torch.float64 if dtype == torch.float64 else torch.float32}
        self.num_features = num_features
        self.normalization_batch = normalization_batch
        self.alpha_fwd, self.alpha_bkw, self.eps = alpha_fwd, alpha_bkw, eps
        self.warmup_iters = warmup_iters
        self.scaling_groups = scaling_groups
        self.weight = nn.Parameter(torch.ones(num_features, **factory))
        self.bias = nn.Parameter(torch.zeros(num_features, **factory))
        self.register_buffer("running_phi", torch.ones(num_features, **statistics))
        self.register_buffer("ema_gz", torch.zeros(num_features, **statistics))
        self.register_buffer("num_iterations", torch.tensor(0, dtype=torch.long, device=device))

    def extra_repr(self):
        return (
            f"{self.num_features}, normalization_batch={self.normalization_batch}, alpha_fwd={self.alpha_fwd}, "
            f"alpha_bkw={self.alpha_bkw}, eps={self.eps}, warmup_iters={self.warmup_iters}, "
            f"scaling_groups={self.scaling_groups}"
        )

    def inference_scale(self):
        """Per-channel multiplier of the eval-mode layer after group scaling (its shift is ``bias``)."""
        return self.weight * torch.rsqrt(self.running_phi + self.eps)

    def forward(self, x):
        if not self.training:
            if self.scaling_groups is not None:
                x = group_scaling(x, self.scaling_groups)
            zero = torch.zeros_like(self.running_phi)
            return F.batch_norm(x, zero, self.running_phi, self.weight, self.bias, False, 0.0, self.eps)
        groups = num_groups(x.shape[0], self.normalization_batch)
        options = (groups, self.scaling_groups, self.alpha_fwd, self.warmup_iters, self.eps)
        buffers = (self.running_phi, self.num_iterations, self.ema_gz)
        return _PowerFunction.apply(x, self.weight, self.bias, *buffers, options, self.alpha_bkw)


class TokenNorm(nn.Module):
    """A (N, C, H, W) norm applied to token sequences (B, T, C), per channel over the batch and the
    tokens (as (B, C, T, 1)): how ``bn``, ``powernorm``, ``mabn`` and ``gn`` replace a transformer's
    LayerNorm. Parameters and buffers are the wrapped norm's (``norm.``)."""

    def __init__(self, norm: nn.Module):
        super().__init__()
        self.norm = norm

    def forward(self, x):
        return self.norm(x.transpose(1, 2).unsqueeze(-1)).squeeze(-1).transpose(1, 2)

"""PowerNorm (Shen, Yao, Gholami, Mahoney, Keutzer, ICML 2020), docs/papers.md: MABN's twin for
transformers, written from the authors' layer (github sIncerass/powernorm,
``fairseq/modules/norms/mask_powernorm.py``: ``MaskPowerNorm``, ``PowerFunction``, ``GroupScaling1D``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .kernels import group_view, num_groups, per_sample


def group_scaling(x: torch.Tensor, groups: int, eps: float = 1e-5) -> torch.Tensor:
    """The authors' ``GroupScaling1D`` for (N, C, H, W): at every position (every token), each of
    ``groups`` groups of consecutive channels divided by the root of its mean square."""
    n, c = x.shape[:2]
    grouped = x.reshape(n, groups, c // groups, *x.shape[2:])
    return (grouped * torch.rsqrt(grouped.square().mean(2, keepdim=True) + eps)).reshape(x.shape)


def group_scaling_backward(grad: torch.Tensor, x: torch.Tensor, groups: int, eps: float = 1e-5) -> torch.Tensor:
    """The gradient of x through ``group_scaling``: ``r (g - x r mean(g x r))``, the mean over each
    group's channels, r the root's inverse."""
    n, c = x.shape[:2]
    grouped, grad = x.reshape(n, groups, c // groups, *x.shape[2:]), grad.reshape(n, groups, c // groups, *x.shape[2:])
    inverse = torch.rsqrt(grouped.square().mean(2, keepdim=True) + eps)
    scaled = grouped * inverse
    return (inverse * (grad - scaled * (grad * scaled).mean(2, keepdim=True))).reshape(x.shape)


class _PowerFunction(torch.autograd.Function):
    """``y = gamma * x / sqrt(divisor + eps) + beta`` per (group, channel); the authors' approximate
    backward, one group after the other (each is a step of their iteration):
    ``g~ = gamma * dy - (1 - alpha_bkw) * u * z``, ``u <- u + mean(g~ * z)``, ``dx = g~ / sqrt(s + eps)``,
    with z the forward's normalized x, s the group's own mean square (the authors divide by it even
    after warm-up, where the forward divided by the running value) and u the buffer ``ema_gz``,
    advanced here in place. ``x`` is the group-scaled input (``group_scaling`` of ``unscaled``
    with ``scaling_groups``, or ``unscaled`` itself for None): only ``unscaled`` and (G, C) values
    are kept, and the scaling is recomputed and differentiated in the backward."""

    @staticmethod
    def forward(ctx, unscaled, x, weight, bias, second_moment, divisor, ema_gz, alpha_bkw, eps, scaling_groups):
        scale = weight * torch.rsqrt(divisor + eps)
        y = x * per_sample(scale, len(x)).to(x.dtype) + bias.to(x.dtype)[:, None, None]
        ctx.save_for_backward(unscaled, weight, second_moment, divisor)
        ctx.ema_gz, ctx.alpha_bkw, ctx.eps, ctx.scaling_groups = ema_gz, alpha_bkw, eps, scaling_groups
        return y

    @staticmethod
    def backward(ctx, dy):
        unscaled, weight, second_moment, divisor = ctx.saved_tensors
        groups, scaling = divisor.shape[0], ctx.scaling_groups
        x = unscaled if scaling is None else group_scaling(unscaled, scaling)
        dtype = second_moment.dtype  # the statistics' precision (fp32 under autocast)
        xg, dyg = group_view(x, groups).to(dtype), group_view(dy, groups).to(dtype)
        z = xg * torch.rsqrt(divisor + ctx.eps)[:, None, :, None]
        g = dyg * weight[:, None]
        u = ctx.ema_gz
        dx = torch.empty_like(xg)
        for k in range(groups):  # each group is one step of the running estimate u
            approximate = g[k] - (1 - ctx.alpha_bkw) * u[:, None] * z[k]
            u = u + (approximate * z[k]).mean(dim=(0, 2))
            dx[k] = approximate * torch.rsqrt(second_moment[k] + ctx.eps)[:, None]
        ctx.ema_gz.copy_(u)
        dweight = (dyg * z).sum(dim=(0, 1, 3))
        dx = dx.view(x.shape).to(dy.dtype)
        if scaling is not None:
            dx = group_scaling_backward(dx, unscaled, scaling)
        return dx, None, dweight, dyg.sum(dim=(0, 1, 3)), *[None] * 6


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
        with torch.no_grad():
            scaled = x if self.scaling_groups is None else group_scaling(x, self.scaling_groups)
            second_moment, divisor = self._statistics(scaled, groups)
        return _PowerFunction.apply(
            x,
            scaled,
            self.weight,
            self.bias,
            second_moment,
            divisor,
            self.ema_gz,
            self.alpha_bkw,
            self.eps,
            self.scaling_groups,
        )

    def _statistics(self, x, groups: int):
        """Each group's mean square s and the divisor it is normalized by, (G, C); advances
        ``running_phi`` and ``num_iterations`` group by group, in place (no host synchronization)."""
        second_moment = group_view(x, groups).to(self.running_phi.dtype).square().mean(dim=(1, 3))
        divisors, phi = [], self.running_phi
        for s in second_moment:
            self.num_iterations.add_(1)
            t = self.num_iterations.to(phi.dtype)
            divisors.append(torch.where(self.num_iterations <= self.warmup_iters, s, phi))
            averaged = phi * (t - 1) / t + s / t
            phi = torch.where(self.num_iterations < self.warmup_iters, averaged, phi)
            phi = self.alpha_fwd * phi + (1 - self.alpha_fwd) * s
        self.running_phi.copy_(phi)
        return second_moment, torch.stack(divisors)


class TokenNorm(nn.Module):
    """A (N, C, H, W) norm applied to token sequences (B, T, C), per channel over the batch and the
    tokens (as (B, C, T, 1)): how ``bn``, ``powernorm``, ``mabn`` and ``gn`` replace a transformer's
    LayerNorm. Parameters and buffers are the wrapped norm's (``norm.``)."""

    def __init__(self, norm: nn.Module):
        super().__init__()
        self.norm = norm

    def forward(self, x):
        return self.norm(x.transpose(1, 2).unsqueeze(-1)).squeeze(-1).transpose(1, 2)

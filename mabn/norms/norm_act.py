"""Norm + activation layers from timm, which replace a norm *and* the ReLU after it:
EvoNorm-B0 / S0 (Liu et al., NeurIPS 2020) and FRN + TLU (Singh & Krishnan, CVPR 2020).

The layers are timm's (``timm.layers.EvoNorm2dB0``, ``EvoNorm2dS0``,
``FilterResponseNormTlu2d``); EvoNorm-B0, the one with batch statistics, gets a
normalization batch here. Built through ``norm_layer(channels)`` they activate; where no ReLU
follows them in the model (before a residual add, in an FPN), ``mabn.wire_norms`` turns their
activation off, as timm's ResNetV2 and the EvoNorm authors' code build them: EvoNorm without
its activation is then the affine alone, FRN the normalization without TLU.

Training with their activation, each runs through one autograd function (``NormAct``) that keeps
only its input, the parameters and per-(sample, channel) values for the backward and recomputes
the rest there (InPlace-ABN's idea, Rota Bulo et al., CVPR 2018): no more than BN + ReLU keeps,
where autograd through timm's layers keeps three to six tensors of the input's size. The math is
written once, as plain tensor functions (``*_train`` and ``*_backward``): eager by default,
compiled by ``mabn.norms.fused`` where BN's kernels are (fp32 on CPU, once turned on).
"""

from __future__ import annotations

import torch
from timm.layers import EvoNorm2dB0, EvoNorm2dS0, FilterResponseNormTlu2d

from . import fused
from .group_norm import groups_for
from .kernels import accumulation_dtype, ema_states, group_view, num_groups, per_sample
from .wired import NeedsWiring

NORM_ACT_LAYERS = (EvoNorm2dB0, EvoNorm2dS0, FilterResponseNormTlu2d)
TAKES_ACTIVATION = "the ReLU after it taken over, or its activation off"
CHANNELS = (0, 2, 3)


def _channel(p: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A per-channel parameter as (1, C, 1, 1) in x's dtype."""
    return p.view(1, -1, 1, 1).to(x.dtype)


def _maximum_share(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """The share of ``torch.maximum(first, second)``'s gradient that goes to ``first``: 1 where it is
    the larger, a half at a tie, else 0 (torch's own rule)."""
    return (first > second).to(first.dtype) + 0.5 * (first == second).to(first.dtype)


# ---- FRN + TLU ----


def frn_train(x, weight, bias, tau, eps: float):
    """FRN, then TLU where ``tau`` is given: y and the inverse rms per (sample, channel), as timm's
    ``FilterResponseNormTlu2d`` (whose mean square is fp32 for fp64 inputs too; here fp64 stays)."""
    inv = x.to(accumulation_dtype(x)).square().mean(dim=(2, 3), keepdim=True).add(eps).rsqrt().to(x.dtype)
    y = x * inv * _channel(weight, x) + _channel(bias, x)
    return (y if tau is None else torch.maximum(y, _channel(tau, x))), inv


def frn_backward(dy, x, inv, weight, bias, tau):
    """dx, d gamma, d beta, d tau (None without TLU) of ``frn_train``."""
    xhat = x * inv
    dz, dtau = dy, None
    if tau is not None:
        share = _maximum_share(xhat * _channel(weight, x) + _channel(bias, x), _channel(tau, x))
        dz = dy * share
        dtau = (dy - dz).sum(CHANNELS)
    dxhat = dz * _channel(weight, x)
    dx = inv * (dxhat - xhat * (dxhat * xhat).mean((2, 3), keepdim=True))
    return dx, (dz * xhat).sum(CHANNELS), dz.sum(CHANNELS), dtau


# ---- EvoNorm-S0 ----


def _per_channel(values: torch.Tensor, channels: int) -> torch.Tensor:
    """(N, G) per-group values as (N, C, 1, 1) per-channel ones."""
    n, groups = values.shape
    return values[:, :, None].expand(n, groups, channels // groups).reshape(n, channels, 1, 1)


def _group_moments(x, groups: int):
    """Mean and biased variance per (sample, group of channels), (N, G) each, from the moments per
    (sample, channel) (the variance of equal parts: their mean variance plus the variance of their
    means), in any memory format."""
    n, c = x.shape[:2]
    var, mean = torch.var_mean(x.to(accumulation_dtype(x)), dim=(2, 3), correction=0)
    mean, var = mean.view(n, groups, c // groups), var.view(n, groups, c // groups)
    group_mean = mean.mean(-1)
    return group_mean, var.mean(-1) + (mean - group_mean[..., None]).square().mean(-1)


def evonorm_s0_train(x, weight, bias, v, groups: int, eps: float):
    """EvoNorm-S0 with its activation, ``x sigmoid(v x) / group_std(x) gamma + beta``: y and the
    group mean and std, (N, G) each."""
    mean, var = _group_moments(x, groups)
    std = var.add(eps).sqrt().to(x.dtype)
    gate = (x * _channel(v, x)).sigmoid()
    y = x * gate / _per_channel(std, x.shape[1]) * _channel(weight, x) + _channel(bias, x)
    return y, mean, std


def evonorm_s0_backward(dy, x, mean, std, weight, v):
    """dx, d gamma, d beta, d v of ``evonorm_s0_train``: through the gate and through the std."""
    n, c, h, w = x.shape
    groups = std.shape[1]
    std_c = _per_channel(std, c)
    gate = (x * _channel(v, x)).sigmoid()
    gated = x * gate
    da = dy * _channel(weight, x) / std_c  # a = x sigmoid(v x), y = a / std gamma + beta
    dstd = -(da * gated).sum((2, 3)).view(n, groups, -1).sum(-1) / std  # (N, G)
    through_std = _per_channel(dstd / (std * (c // groups * h * w)), c) * (x - _per_channel(mean, c).to(x.dtype))
    dgate = gate * (1 - gate)
    dx = da * (gate + x * _channel(v, x) * dgate) + through_std
    return dx, (dy * gated / std_c).sum(CHANNELS), dy.sum(CHANNELS), (da * x * x * dgate).sum(CHANNELS)


# ---- EvoNorm-B0 ----


def evonorm_b0_train(x, weight, bias, v, running_var, groups: int, momentum: float, eps: float):
    """EvoNorm-B0 with its activation, ``x / max(sqrt(batch var + eps), v x + instance std) gamma
    + beta``, each of ``groups`` groups of consecutive samples with its own batch variance; the
    running variance is updated once per group, in order (unbiased, as timm's); returns y, the
    groups' batch mean and std, (G, C), and the instance mean and std, (N, C, 1, 1)."""
    dtype = accumulation_dtype(x)
    xg = group_view(x, groups)
    batch_var, batch_mean = torch.var_mean(xg.to(dtype), dim=(1, 3), correction=0)
    count = xg.shape[1] * xg.shape[3]
    running_var.copy_(ema_states(running_var, batch_var * (count / max(count - 1, 1)), momentum, last_only=True)[0])
    batch_std = batch_var.add(eps).sqrt().to(x.dtype)
    instance_var, instance_mean = torch.var_mean(x.to(dtype), dim=(2, 3), correction=0, keepdim=True)
    instance_std = instance_var.add(eps).sqrt().to(x.dtype)
    divisor = torch.maximum(per_sample(batch_std, len(x)), x * _channel(v, x) + instance_std)
    return x / divisor * _channel(weight, x) + _channel(bias, x), batch_mean, batch_std, instance_mean, instance_std


def evonorm_b0_backward(dy, x, batch_mean, batch_std, instance_mean, instance_std, weight, v):
    """dx, d gamma, d beta, d v of ``evonorm_b0_train``: through x / d, and through the divisor d to
    the batch std or to v x + instance std, whichever is larger (halves at a tie)."""
    groups, n = len(batch_std), len(x)
    left, right = per_sample(batch_std, n), x * _channel(v, x) + instance_std
    divisor = torch.maximum(left, right)
    dn = dy * _channel(weight, x)
    ddivisor = -dn * x / divisor.square()
    to_left = ddivisor * _maximum_share(left, right)
    to_right = ddivisor - to_left
    count = x.numel() // (groups * x.shape[1])
    hw = x.shape[2] * x.shape[3]
    batch_grad = group_view(to_left, groups).sum(dim=(1, 3)) / (batch_std * count)  # (G, C)
    instance_grad = to_right.sum((2, 3), keepdim=True) / (instance_std * hw)
    dx = (
        dn / divisor
        + to_right * _channel(v, x)
        + instance_grad * (x - instance_mean.to(x.dtype))
        + per_sample(batch_grad, n) * (x - per_sample(batch_mean, n).to(x.dtype))
    )
    return dx, (dy * x / divisor).sum(CHANNELS), dy.sum(CHANNELS), (to_right * x).sum(CHANNELS)


# ---- one autograd function for the three ----


class Kernels(fused.Kernels):
    """A norm + activation's ``train`` and ``backward`` functions (plain and compiled); ``keep``:
    which of the layer's tensors the backward takes (after x and the values ``train`` returns
    beside y)."""

    def __init__(self, train, backward, keep):
        super().__init__(train, backward)
        self.keep = keep


class NormAct(torch.autograd.Function):
    """``kernels.train(x, *tensors, *options)`` (returning y and small values) in the forward, and
    ``kernels.backward(dy, x, *values, *kept tensors)`` (returning the gradients of x and of the first
    tensors) in the backward: x, the parameters and the small values are all it keeps. Compiled
    (``mabn.norms.fused``) where ``fused.applies`` to x split into ``groups``."""

    @staticmethod
    def forward(ctx, kernels, options, groups, x, *tensors):
        train, ctx.backward = kernels.pick(x, groups)
        y, *values = train(x, *tensors, *options)
        kept = [tensors[i] if tensors[i] is None else tensors[i].detach() for i in kernels.keep]
        ctx.save_for_backward(x, *values, *kept)  # plain tensors: one compiled graph
        ctx.inputs = len(tensors)
        return y

    @staticmethod
    def backward(ctx, dy):
        grads = ctx.backward(dy, *ctx.saved_tensors)
        return None, None, None, *grads, *[None] * (ctx.inputs + 1 - len(grads))


FRN = Kernels(frn_train, frn_backward, keep=(0, 1, 2))
EVONORM_S0 = Kernels(evonorm_s0_train, evonorm_s0_backward, keep=(0, 2))
EVONORM_B0 = Kernels(evonorm_b0_train, evonorm_b0_backward, keep=(0, 2))


def _trains_through_kernels(layer) -> bool:
    return layer.training and torch.is_grad_enabled()


class EvoNormB0(NeedsWiring, EvoNorm2dB0):
    """timm's EvoNorm-B0 with a normalization batch: each group of ``normalization_batch``
    consecutive samples gets its own batch variance, and the running variance is updated once
    per group, in order (as ``mabn.BatchNorm2d``). Trained with its activation through
    ``NormAct`` (``evonorm_b0_train``)."""

    wiring = TAKES_ACTIVATION

    def __init__(
        self, num_features, normalization_batch=None, apply_act=True, momentum=0.1, eps=1e-3, device=None, dtype=None
    ):
        super().__init__(num_features, apply_act=apply_act, momentum=momentum, eps=eps, device=device, dtype=dtype)
        self.normalization_batch = normalization_batch

    def forward(self, x):
        self.check_wired()
        if self.v is None or not self.training:
            return super().forward(x)
        groups = num_groups(x.shape[0], self.normalization_batch)
        options = (groups, self.momentum, self.eps)
        return NormAct.apply(EVONORM_B0, options, groups, x, self.weight, self.bias, self.v, self.running_var)


class EvoNormS0(NeedsWiring, EvoNorm2dS0):
    """timm's EvoNorm-S0 (group statistics, no batch dependence), trained with its activation
    through ``NormAct`` (``evonorm_s0_train``); without the activation it is timm's affine."""

    wiring = TAKES_ACTIVATION

    def forward(self, x):
        self.check_wired()
        if self.v is None or not _trains_through_kernels(self):
            return super().forward(x)
        return NormAct.apply(EVONORM_S0, (self.groups, self.eps), 1, x, self.weight, self.bias, self.v)


class FilterResponseNormTlu(NeedsWiring, FilterResponseNormTlu2d):
    """timm's Filter Response Normalization with TLU, trained through ``NormAct`` (``frn_train``)."""

    wiring = TAKES_ACTIVATION

    def forward(self, x):
        self.check_wired()
        if not _trains_through_kernels(self):
            return super().forward(x)
        return NormAct.apply(FRN, (self.eps,), 1, x, self.weight, self.bias, self.tau)


def evonorm_s0(num_features, groups=32, group_size=None, apply_act=True, eps=1e-5, device=None, dtype=None):
    """EvoNorm-S0, with fewer groups where ``groups`` does not divide the channels
    (``mabn.norms.group_norm.groups_for``, as GN)."""
    if group_size is None:
        groups = groups_for(num_features, groups)
    return EvoNormS0(
        num_features, groups=groups, group_size=group_size, apply_act=apply_act, eps=eps, device=device, dtype=dtype
    )


def frn(num_features, apply_act=True, eps=1e-5, device=None, dtype=None):
    """FRN + TLU (``rms=True``: the paper's nu^2 = mean x^2)."""
    return FilterResponseNormTlu(num_features, apply_act=apply_act, eps=eps, device=device, dtype=dtype)


def drop_activation(layer) -> None:
    """Turn a norm + activation layer into its norm part (in place): timm's ``apply_act=False``."""
    layer.apply_act = False
    for name in ("v", "tau"):
        if getattr(layer, name, None) is not None:
            setattr(layer, name, None)

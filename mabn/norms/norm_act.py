"""Norm + activation layers from timm, which replace a norm *and* the ReLU after it:
EvoNorm-B0 / S0 (Liu et al., NeurIPS 2020) and FRN + TLU (Singh & Krishnan, CVPR 2020).

The layers are timm's (``timm.layers.EvoNorm2dB0``, ``EvoNorm2dS0``,
``FilterResponseNormTlu2d``); EvoNorm-B0, the one with batch statistics, gets a
normalization batch here. Built through ``norm_layer(channels)`` they activate; where no ReLU
follows them in the model (before a residual add, in an FPN), ``mabn.wire_norms`` turns their
activation off, as timm's ResNetV2 and the EvoNorm authors' code build them: EvoNorm without
its activation is then the affine alone, FRN the normalization without TLU.
"""

from __future__ import annotations

import torch
from timm.layers import EvoNorm2dB0, EvoNorm2dS0, FilterResponseNormTlu2d

from .group_norm import groups_for
from .kernels import accumulation_dtype, num_groups
from .wired import NeedsWiring

NORM_ACT_LAYERS = (EvoNorm2dB0, EvoNorm2dS0, FilterResponseNormTlu2d)
TAKES_ACTIVATION = "the ReLU after it taken over, or its activation off"


class EvoNormB0(NeedsWiring, EvoNorm2dB0):
    """timm's EvoNorm-B0 with a normalization batch: each group of ``normalization_batch``
    consecutive samples gets its own batch variance, and the running variance is updated once
    per group, in order (as ``mabn.BatchNorm2d``)."""

    wiring = TAKES_ACTIVATION

    def __init__(
        self, num_features, normalization_batch=None, apply_act=True, momentum=0.1, eps=1e-3, device=None, dtype=None
    ):
        super().__init__(num_features, apply_act=apply_act, momentum=momentum, eps=eps, device=device, dtype=dtype)
        self.normalization_batch = normalization_batch

    def forward(self, x):
        self.check_wired()
        groups = num_groups(x.shape[0], self.normalization_batch) if self.training else 1
        if groups == 1:
            return super().forward(x)
        return torch.cat([super(EvoNormB0, self).forward(part) for part in x.chunk(groups)])


class _EvoNormS0Function(torch.autograd.Function):
    """EvoNorm-S0 with its activation, ``x sigmoid(v x) / group_std(x) * gamma + beta``, keeping only
    x (and the parameters) for the backward: the sigmoid, the group statistics and the normalized
    value are recomputed there, where autograd through timm's layer keeps about six tensors of
    x's size."""

    @staticmethod
    def forward(ctx, x, weight, bias, v, groups, eps):
        ctx.save_for_backward(x, weight, bias, v)
        ctx.groups, ctx.eps = groups, eps
        n = _evonorm_s0(x, v, groups, eps)[0]
        return n * weight.view(1, -1, 1, 1).to(x.dtype) + bias.view(1, -1, 1, 1).to(x.dtype)

    @staticmethod
    def backward(ctx, dy):
        x, weight, bias, v = ctx.saved_tensors
        n, gate, std = _evonorm_s0(x, v, ctx.groups, ctx.eps)
        grouped = lambda t: t.reshape(x.shape[0], ctx.groups, -1)
        channels = (0, 2, 3)
        # n = a / std with a = x sigmoid(v x): through a, and through std = sqrt(var + eps) (biased)
        dn = grouped(dy * weight.view(1, -1, 1, 1))
        da = (dn / std).reshape(x.shape)
        centered = grouped(x) - grouped(x).mean(-1, keepdim=True)
        dstd = -(dn * grouped(n)).sum(-1, keepdim=True) / std
        through_std = (dstd * centered / (std * centered.shape[-1])).reshape(x.shape)
        vx = v.view(1, -1, 1, 1) * x
        dx = da * gate * (1 + vx * (1 - gate)) + through_std
        dv = (da * x * x * gate * (1 - gate)).sum(channels)
        return dx, (dy * n).sum(channels), dy.sum(channels), dv, None, None


def _evonorm_s0(x, v, groups, eps):
    """(normalized value, sigmoid gate, group std of shape (batch, groups, 1)) of timm's
    EvoNorm2dS0 with its activation, before its affine (timm's variance is float32 for float64
    inputs too; here float64 stays so)."""
    b = x.shape[0]
    std = x.to(accumulation_dtype(x)).reshape(b, groups, -1).var(dim=2, unbiased=False, keepdim=True)
    std = std.add(eps).sqrt().to(x.dtype)
    gate = (x * v.view(1, -1, 1, 1).to(x.dtype)).sigmoid()
    n = ((x * gate).reshape(b, groups, -1) / std).reshape(x.shape)
    return n, gate, std


class EvoNormS0(NeedsWiring, EvoNorm2dS0):
    """timm's EvoNorm-S0 (group statistics, no batch dependence), trained with its activation
    through one autograd function that keeps only its input for the backward
    (``_EvoNormS0Function``); without the activation it is timm's affine."""

    wiring = TAKES_ACTIVATION

    def forward(self, x):
        self.check_wired()
        if self.v is None or not (self.training and torch.is_grad_enabled()):
            return super().forward(x)
        return _EvoNormS0Function.apply(x, self.weight, self.bias, self.v, self.groups, self.eps)


class _FRNFunction(torch.autograd.Function):
    """FRN, then TLU where ``tau`` is given, keeping only x (and the parameters) for the backward:
    the inverse rms, x-hat and the pre-activation are recomputed there, where autograd through
    timm's layer keeps about three tensors of x's size."""

    @staticmethod
    def forward(ctx, x, weight, bias, tau, eps):
        ctx.save_for_backward(x, weight, bias, tau)
        ctx.eps = eps
        return _frn_tlu(x, weight, bias, tau, eps)[0]

    @staticmethod
    def backward(ctx, dy):
        x, weight, bias, tau = ctx.saved_tensors
        y, xhat, inv = _frn_tlu(x, weight, bias, None, ctx.eps)
        channels = (0, 2, 3)
        dz, dtau = dy, None
        if tau is not None:  # torch.maximum's gradient: to the larger, halved at a tie
            tau = tau.view(1, -1, 1, 1)
            share = (y > tau).to(dy.dtype) + 0.5 * (y == tau).to(dy.dtype)
            dz, dtau = dy * share, (dy * (1 - share)).sum(channels)
        dxhat = dz * weight.view(1, -1, 1, 1)
        dx = inv * (dxhat - xhat * (dxhat * xhat).mean((2, 3), keepdim=True))
        return dx, (dz * xhat).sum(channels), dz.sum(channels), dtau, None


def _frn_tlu(x, weight, bias, tau, eps):
    """(output, x-hat, inverse rms) of FRN (+ TLU), as timm's ``FilterResponseNormTlu2d`` (whose
    mean square is float32 for float64 inputs too; here float64 stays float64)."""
    inv = x.to(accumulation_dtype(x)).square().mean(dim=(2, 3), keepdim=True).add(eps).rsqrt().to(x.dtype)
    xhat = x * inv
    y = xhat * weight.view(1, -1, 1, 1).to(x.dtype) + bias.view(1, -1, 1, 1).to(x.dtype)
    return (torch.maximum(y, tau.view(1, -1, 1, 1).to(x.dtype)) if tau is not None else y), xhat, inv


class FilterResponseNormTlu(NeedsWiring, FilterResponseNormTlu2d):
    """timm's Filter Response Normalization with TLU, trained through one autograd function that
    keeps only its input for the backward (``_FRNFunction``; timm's layer: about three times that)."""

    wiring = TAKES_ACTIVATION

    def forward(self, x):
        self.check_wired()
        if not (self.training and torch.is_grad_enabled()):
            return super().forward(x)
        return _FRNFunction.apply(x, self.weight, self.bias, self.tau, self.eps)


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

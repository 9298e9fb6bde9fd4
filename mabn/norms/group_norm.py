"""Group Normalization (Wu & He, 2018), its one-group (LN) and one-channel (IN) cases, and GN with
Weight Standardization of the conv that feeds it (GN+WS, Qiao et al., 2019)."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import parametrize

from . import fused
from .wired import NeedsWiring


def groups_for(channels: int, groups: int) -> int:
    """The group count a layer of ``channels`` takes for a setting of ``groups``: the largest divisor of
    ``channels`` not above it (the setting itself where it divides them), so one setting converts a
    whole model whose widths it does not all divide (16, 48, 72 channels with 32 groups: 16, 24, 24)."""
    return max(d for d in range(1, min(groups, channels) + 1) if channels % d == 0)


class GroupNorm(nn.GroupNorm):
    """Group Normalization (Wu & He, 2018), channels first, 32 groups by default (fewer where 32 does
    not divide the channels: ``groups_for``)."""

    def __init__(self, num_channels, num_groups=32, eps=1e-5, affine=True, device=None, dtype=None):
        super().__init__(groups_for(num_channels, num_groups), num_channels, eps, affine, device, dtype)


class LayerNorm2d(GroupNorm):
    """Layer Normalization over (C, H, W) per sample: GroupNorm with one group (GN paper's LN)."""

    def __init__(self, num_channels, eps=1e-5, affine=True, device=None, dtype=None):
        super().__init__(num_channels, 1, eps, affine, device, dtype)


class InstanceNorm2d(GroupNorm):
    """Instance Normalization with affine: GroupNorm with one channel per group (GN paper's IN)."""

    def __init__(self, num_channels, eps=1e-5, affine=True, device=None, dtype=None):
        super().__init__(num_channels, num_channels, eps, affine, device, dtype)


def standardize(weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``(W - mean(W)) / sqrt(var(W) + eps)`` per output channel (biased variance)."""
    flat = weight.flatten(1)
    var, mean = torch.var_mean(flat, dim=1, correction=0, keepdim=True)
    return ((flat - mean) * torch.rsqrt(var + eps)).view_as(weight)


def standardize_backward(weight: torch.Tensor, grad: torch.Tensor, eps: float, standardized=None) -> torch.Tensor:
    """The gradient of W through ``standardize`` for the standardized weight's ``grad`` (its
    ``standardized`` weight recomputed unless given)."""
    flat, grad = weight.flatten(1), grad.flatten(1)
    var, mean = torch.var_mean(flat, dim=1, correction=0, keepdim=True)
    inv = torch.rsqrt(var + eps)
    standardized = (flat - mean) * inv if standardized is None else standardized.flatten(1)
    dweight = inv * (grad - grad.mean(1, keepdim=True) - standardized * (grad * standardized).mean(1, keepdim=True))
    return dweight.view_as(weight)


STANDARDIZE = fused.Kernels(standardize, standardize_backward)


class _StandardizeFunction(torch.autograd.Function):
    """``standardize`` keeping only W for the backward (autograd through the formula keeps three
    weight-sized tensors beside the standardized weight the conv keeps); compiled where
    ``mabn.norms.fused`` applies (eagerly, the standardization of a small detector's weights cost 0.7 of
    its BN iteration at one thread)."""

    @staticmethod
    def forward(ctx, weight, eps):
        weight = weight.detach()  # a plain tensor: one compiled graph per shape
        forward, ctx.backward = STANDARDIZE.pick(weight, 1)
        ctx.save_for_backward(weight)
        ctx.eps = eps
        return forward(weight, eps)

    @staticmethod
    def backward(ctx, grad):
        return ctx.backward(ctx.saved_tensors[0], grad, ctx.eps), None


class StandardizeWeight(nn.Module):
    """Weight Standardization (Qiao et al., 2019): ``(W - mean(W)) / sqrt(var(W) + eps)`` per
    output channel over (in_channels, kh, kw), biased variance, eps 1e-6 (timm's ``StdConv2d``)."""

    def __init__(self, eps: float = 1e-6):
        super().__init__()
        self.eps = eps

    def forward(self, weight):
        return _StandardizeFunction.apply(weight, self.eps)

    def vjp(self, weight, standardized, grad):
        """The gradient of ``weight`` for the ``standardized`` weight's ``grad``."""
        return standardize_backward(weight, grad, self.eps, standardized)


class GroupNormWS(NeedsWiring, GroupNorm):
    """GroupNorm whose feeding conv is weight-standardized (GN+WS): ``bind_conv`` (called by
    ``mabn.wire_norms``) registers ``StandardizeWeight`` as a parametrization of that conv, so
    gradients flow through the standardization and plain conv checkpoints still load."""

    wiring = "the conv feeding it standardized"

    def __init__(self, num_channels, num_groups=32, eps=1e-5, ws_eps=1e-6, affine=True, device=None, dtype=None):
        super().__init__(num_channels, num_groups, eps, affine, device, dtype)
        self.ws_eps = ws_eps

    def forward(self, x):
        self.check_wired()
        return super().forward(x)

    def bind_conv(self, conv: nn.Conv2d) -> None:
        """Standardize ``conv``'s weight (idempotent)."""
        if parametrize.is_parametrized(conv, "weight") and any(
            isinstance(p, StandardizeWeight) for p in conv.parametrizations.weight
        ):
            return
        parametrize.register_parametrization(conv, "weight", StandardizeWeight(self.ws_eps))
        conv.register_load_state_dict_pre_hook(load_plain_weight)


def load_plain_weight(module, state_dict, prefix, *args):
    """Let a checkpoint of the plain conv (key ``weight``) load into the parametrized one."""
    if prefix + "weight" in state_dict:
        state_dict[prefix + "parametrizations.weight.original"] = state_dict.pop(prefix + "weight")

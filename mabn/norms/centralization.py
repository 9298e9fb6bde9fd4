"""Weight centralization (Yan et al., MABN) as a parametrization of a conv's weight: W - mean(W)
per output channel, with gradients through it. ``mabn.wire_norms`` puts it on the convs that
feed a norm asking for it (``centralize_conv = True``: MABN, which subtracts no mean)."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import parametrize


def centered(weight: torch.Tensor) -> torch.Tensor:
    """W - mean(W) over all dimensions but the first (per output channel)."""
    return weight - weight.mean(dim=tuple(range(1, weight.dim())), keepdim=True)


class _Centered(torch.autograd.Function):
    """``centered`` as an autograd function. The map is a linear symmetric projection, so its
    gradient is the same projection of the incoming one, computed by plain (twice
    differentiable) ops: two passes over the weight each way, where autograd's chain (neg,
    expand, div, add) makes four in the backward. No custom forward-mode rule: torch.compile
    cannot trace one (torch 2.14)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(weight):
        return centered(weight)

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass  # linear: nothing to save

    @staticmethod
    def backward(ctx, grad):
        return centered(grad)


class Centralize(nn.Module):
    """Weight centralization: W - mean(W) over (in_channels, kh, kw), per output channel."""

    def forward(self, weight):
        return _Centered.apply(weight)

    def vjp(self, weight, centralized, grad):
        """The gradient of ``weight`` for the ``centralized`` weight's ``grad`` (the same projection)."""
        return centered(grad)


def is_centralized(conv: nn.Module) -> bool:
    """Whether ``conv.weight`` is centralized by ``centralize_weights``."""
    return parametrize.is_parametrized(conv, "weight") and any(
        isinstance(p, Centralize) for p in conv.parametrizations.weight
    )

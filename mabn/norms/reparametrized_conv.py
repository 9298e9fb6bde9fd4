"""A conv whose weight is a parametrization of its parameter (MABN's centralization, GN+WS's
standardization) that keeps only its input and the parameter for the backward, as a plain conv
does: through ordinary autograd it would also keep the computed weight, one copy of every such
conv's weight per step, which at detection's small images and batches is as much memory as the
activations. Here the weight is recomputed in the backward (a few element-wise passes over it).

``recompute_weight(conv)`` turns a parametrized ``nn.Conv2d`` into one (``mabn.wire_norms(model,
recompute_weights=True)`` turns them all); convs with their own ``forward`` (detectron2's, which
apply their norm inside) and non-zero padding modes keep ordinary autograd. The conv's state dict,
``conv.weight`` (the computed weight, for folding and export) and eval-mode calls are unchanged.

Off by default, as it trades time for memory where weights outweigh activations: at the detection
study's sizes (R18-FPN, 2 images of 128 px) a torchvision Mask R-CNN iteration cost MABN 1.23x
BN's instead of 1.12x and GN+WS 1.83x instead of 1.43x (``scripts/bench_detection.py``, 20
rounds), for BN's bytes kept instead of about twice them; where memory is short (large images),
the weights are a few percent of the activations either way.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize


def _computed_weights(conv: nn.Conv2d, original: torch.Tensor) -> list[torch.Tensor]:
    """``original`` and the weight after each of the conv's parametrizations in turn (the last is
    the conv's weight)."""
    weights = [original]
    for parametrization in conv.parametrizations.weight:
        weights.append(parametrization(weights[-1]))
    return weights


def _weight_vjp(conv: nn.Conv2d, weights: list[torch.Tensor], grad: torch.Tensor) -> torch.Tensor:
    """The gradient of the original weight for the conv weight's ``grad``, from each parametrization's
    ``vjp(input, output, grad)`` (no ``autograd.grad``: torch.compile traces this backward whole)."""
    steps = list(zip(conv.parametrizations.weight, weights, weights[1:]))
    for parametrization, weight, computed in reversed(steps):
        grad = parametrization.vjp(weight, computed, grad)
    return grad


class _RecomputedWeightConv(torch.autograd.Function):
    """``conv2d(x, w(W), b)`` keeping x (as the conv computes it: cast under autocast) and W."""

    @staticmethod
    def forward(ctx, x, original, bias, conv):
        device = x.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
        x, weight = x.to(dtype), _computed_weights(conv, original)[-1].to(dtype)
        bias_ = None if bias is None else bias.to(dtype)
        with torch.autocast(device, enabled=False):
            y = F.conv2d(x, weight, bias_, conv.stride, conv.padding, conv.dilation, conv.groups)
        ctx.save_for_backward(x, original)
        ctx.conv, ctx.has_bias = conv, bias is not None
        return y

    @staticmethod
    def backward(ctx, dy):
        x, original = ctx.saved_tensors
        conv = ctx.conv
        weights = _computed_weights(conv, original)
        weight = weights[-1]
        dx, dweight, dbias = torch.ops.aten.convolution_backward(
            dy,
            x,
            weight.to(x.dtype),
            [weight.shape[0]] if ctx.has_bias else None,
            conv.stride,
            conv.padding,
            conv.dilation,
            False,
            [0, 0],
            conv.groups,
            [ctx.needs_input_grad[0], True, ctx.has_bias],
        )
        return dx, _weight_vjp(conv, weights, dweight.to(original.dtype)), dbias, None


def _forward(self, x):
    """The forward of a conv that ``recompute_weight`` turned."""
    original = self.parametrizations.weight.original
    if not (torch.is_grad_enabled() and original.requires_grad) or torch.jit.is_tracing():
        return nn.Conv2d.forward(self, x)
    return _RecomputedWeightConv.apply(x, original, self.bias, self)


def recomputes_weight(conv: nn.Module) -> bool:
    return type(conv).forward is _forward


def recompute_weight(conv: nn.Module) -> None:
    """Make a parametrized ``nn.Conv2d`` keep only its input and parameter for the backward (in
    place, idempotent): its forward becomes ``_forward``, set on the class that
    ``torch.nn.utils.parametrize`` made for this conv alone (so that removing the parametrization
    gives back the plain conv). Other convs (and parametrizations without a ``vjp``) are left as they are."""
    if (
        not parametrize.is_parametrized(conv, "weight")
        or not all(hasattr(p, "vjp") for p in conv.parametrizations.weight)
        or type(conv).forward is not nn.Conv2d.forward
        or not isinstance(conv, nn.Conv2d)
        or conv.padding_mode != "zeros"
        or isinstance(conv.padding, str)
    ):
        return
    type(conv).forward = _forward

"""Convs with a parametrized weight (MABN's centralization, GN+WS's standardization) that recompute
the weight in the backward: the same outputs and gradients as ordinary autograd through the
parametrization, with only the input kept for the backward."""

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torch.nn.utils import parametrize

import mabn
from mabn.benchmark import saved_bytes, training_step_saved_bytes
from mabn.norms.centralization import Centralize, centered, is_centralized
from mabn.norms.group_norm import StandardizeWeight
from mabn.norms.reparametrized_conv import recompute_weight, recomputes_weight

CONVS = [
    {"in_channels": 4, "out_channels": 6, "kernel_size": 3, "padding": 1},
    {"in_channels": 4, "out_channels": 6, "kernel_size": 3, "stride": 2, "dilation": 2, "padding": 2, "bias": False},
    {"in_channels": 4, "out_channels": 8, "kernel_size": 1, "groups": 2},
    {"in_channels": 4, "out_channels": 4, "kernel_size": 3, "groups": 4, "padding": 1, "bias": False},  # depthwise
]


def standardized(weight, eps):
    flat = weight.flatten(1)
    var, mean = flat.var(1, unbiased=False, keepdim=True), flat.mean(1, keepdim=True)
    return ((flat - mean) / torch.sqrt(var + eps)).view_as(weight)


TRANSFORMS = {
    "centralize": (Centralize, centered),
    "standardize": (lambda: StandardizeWeight(1e-3), lambda w: standardized(w, 1e-3)),
}


def conv_with(transform, options, dtype=torch.float64):
    torch.manual_seed(0)
    conv = nn.Conv2d(**options, dtype=dtype)
    parametrize.register_parametrization(conv, "weight", TRANSFORMS[transform][0]())
    recompute_weight(conv)
    return conv


@pytest.mark.parametrize("options", CONVS)
@pytest.mark.parametrize("transform", sorted(TRANSFORMS))
def test_outputs_and_gradients_are_the_formulas(transform, options):
    conv = conv_with(transform, options)
    assert recomputes_weight(conv)
    original = conv.parametrizations.weight.original
    x = torch.randn(3, 4, 9, 9, dtype=torch.float64, requires_grad=True)
    reference = [t.detach().clone().requires_grad_() for t in (x, original)]
    bias = None if conv.bias is None else conv.bias.detach().clone().requires_grad_()
    y = conv(x)
    expected = F.conv2d(
        reference[0],
        TRANSFORMS[transform][1](reference[1]),
        bias,
        conv.stride,
        conv.padding,
        conv.dilation,
        conv.groups,
    )
    torch.testing.assert_close(y, expected, rtol=1e-12, atol=1e-12)
    dy = torch.randn_like(y)
    y.backward(dy)
    expected.backward(dy)
    torch.testing.assert_close(x.grad, reference[0].grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(original.grad, reference[1].grad, rtol=1e-10, atol=1e-12)
    if bias is not None:
        torch.testing.assert_close(conv.bias.grad, bias.grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("transform", sorted(TRANSFORMS))
def test_only_the_input_is_kept_where_autograd_keeps_the_weight_too(transform):
    conv = conv_with(transform, CONVS[0], torch.float32)
    x = torch.randn(2, 4, 9, 9, requires_grad=True)
    dy = torch.randn(2, 6, 9, 9)
    ordinary = ordinary_copy(conv)
    weight = conv.parametrizations.weight.original
    assert saved_bytes(conv, x, dy) == x.numel() * 4
    assert saved_bytes(ordinary, x, dy) >= x.numel() * 4 + weight.numel() * 4


def test_autocast_computes_as_the_ordinary_conv_and_eval_and_state_dict_are_unchanged():
    conv = conv_with("standardize", CONVS[0], torch.float32)
    ordinary = ordinary_copy(conv)
    x = torch.randn(2, 4, 9, 9)
    results = []
    for layer in (conv, ordinary):
        xi = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = layer(xi)
        y.float().square().sum().backward()
        results.append((y, xi.grad, layer.parametrizations.weight.original.grad, layer.bias.grad))
    for got, want in zip(*results):
        assert got.dtype == want.dtype
        torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)
    assert list(conv.state_dict()) == list(ordinary.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(conv(x), ordinary(x))
    recompute_weight(conv)  # idempotent
    assert recomputes_weight(conv)
    parametrize.remove_parametrizations(conv, "weight")
    assert type(conv) is nn.Conv2d


def ordinary_copy(conv):
    """The same parametrized conv, trained through ordinary autograd."""
    ordinary = nn.Conv2d(4, 6, 3, padding=1)
    parametrize.register_parametrization(ordinary, "weight", conv.parametrizations.weight[0])
    ordinary.load_state_dict(conv.state_dict())
    assert not recomputes_weight(ordinary)
    return ordinary


def test_wire_norms_recomputes_the_computed_weights_only_when_asked():
    x, labels = torch.randn(2, 3, 32, 32), torch.randint(0, 4, (2,))
    kept = {}
    for recompute in (False, True):
        torch.manual_seed(0)
        model = mabn.convert_model(torchvision.models.resnet18(num_classes=4), "mabn", normalization_batch=1)
        mabn.wire_norms(model, recompute_weights=recompute)
        conv = model.layer1[0].conv1
        assert recomputes_weight(conv) == recompute and is_centralized(conv)
        kept[recompute] = training_step_saved_bytes(model, x, labels)
    weights = sum(c.weight.numel() * 4 for c in model.modules() if isinstance(c, nn.Conv2d) and is_centralized(c))
    assert kept[False] - kept[True] == weights  # one copy of every centralized weight, no more

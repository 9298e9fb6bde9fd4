"""The norm + activation layers that keep only their input for the backward: FRN + TLU against a
slow reference from the paper's formulas (Singh & Krishnan, CVPR 2020) and against timm's layer,
forward and backward, and what they save."""

import pytest
import timm
import torch
from torch import nn

import mabn
from mabn.benchmark import saved_bytes
from mabn.norms.norm_act import _FRNFunction


def reference_frn(x, gamma, beta, tau, eps):
    """nu2 = mean over H, W of x^2; y = gamma x / sqrt(nu2 + eps) + beta; TLU: max(y, tau)."""
    nu2 = x.square().mean((2, 3), keepdim=True)
    y = gamma.view(1, -1, 1, 1) * x / torch.sqrt(nu2 + eps) + beta.view(1, -1, 1, 1)
    return torch.maximum(y, tau.view(1, -1, 1, 1)) if tau is not None else y


def frn(channels, apply_act, dtype=torch.float64):
    layer = mabn.build_norm("frn", channels, apply_act=apply_act, dtype=dtype)
    layer.wired = True  # on its own, outside a model
    with torch.no_grad():
        for p in layer.parameters():
            p.uniform_(-1, 1)
    return layer


@pytest.mark.parametrize("apply_act", [True, False])
def test_frn_matches_the_formulas_forward_and_backward(apply_act):
    layer = frn(6, apply_act)
    params = [p.detach().clone().requires_grad_() for p in (layer.weight, layer.bias, layer.tau) if p is not None]
    x = (torch.randn(4, 6, 5, 7, dtype=torch.float64) * 3).requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    dy = torch.randn(4, 6, 5, 7, dtype=torch.float64)
    y, expected = layer(x), reference_frn(x_ref, *params, *([None] if not apply_act else []), layer.eps)
    torch.testing.assert_close(y, expected, rtol=1e-12, atol=1e-12)
    y.backward(dy)
    expected.backward(dy)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-10, atol=1e-12)
    ours = [p.grad for p in (layer.weight, layer.bias, layer.tau) if p is not None]
    for got, want in zip(ours, [p.grad for p in params]):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_frn_backward_is_the_derivative_of_its_forward():
    layer = frn(3, True)
    inputs = [torch.randn(2, 3, 4, 4, dtype=torch.float64)] + [layer.weight, layer.bias, layer.tau]
    inputs = [t.detach().clone().requires_grad_() for t in inputs]
    assert torch.autograd.gradcheck(lambda *a: _FRNFunction.apply(*a, 1e-5), inputs)


def outputs_and_gradients(layer, x, dy):
    """The layer's output on ``x``, and the gradients of x and of its parameters for ``dy``."""
    x = x.clone().requires_grad_()
    y = layer(x)
    y.backward(dy)
    return [y, x.grad, *(p.grad for p in layer.parameters())]


@pytest.mark.parametrize("apply_act", [True, False])
def test_frn_equals_timms_layer_in_float32(apply_act):
    ours = frn(16, apply_act, torch.float32)
    theirs = timm.layers.FilterResponseNormTlu2d(16, apply_act=apply_act)
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(8, 16, 14, 14) * 2 + 0.5
    dy = torch.randn_like(x)
    for got, want in zip(outputs_and_gradients(ours, x, dy), outputs_and_gradients(theirs, x, dy)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_frn_saves_its_input_only_half_of_timms_and_less_than_bn_relu():
    x, dy = torch.randn(8, 32, 14, 14, requires_grad=True), torch.randn(8, 32, 14, 14)
    size = x.numel() * x.element_size()
    ours = saved_bytes(frn(32, True, torch.float32), x, dy)
    theirs = saved_bytes(timm.layers.FilterResponseNormTlu2d(32), x, dy)
    bn_relu = saved_bytes(nn.Sequential(nn.BatchNorm2d(32), nn.ReLU()), x, dy)
    assert ours < 1.01 * size and ours <= theirs / 2 and ours < bn_relu


def reference_evonorm_s0(x, gamma, beta, v, groups, eps):
    """Liu et al. (NeurIPS 2020): x sigmoid(v x) / sqrt(group variance + eps) gamma + beta, the
    biased variance over each sample's group of channels and all positions."""
    b, c, h, w = x.shape
    var = x.reshape(b, groups, -1).var(-1, unbiased=False, keepdim=True)
    std = torch.sqrt(var + eps).expand(b, groups, c // groups * h * w).reshape(x.shape)
    at = lambda p: p.view(1, -1, 1, 1)
    return x * torch.sigmoid(at(v) * x) / std * at(gamma) + at(beta)


def evonorm_s0(channels, dtype=torch.float64):
    layer = mabn.build_norm("evonorm_s0", channels, groups=4, dtype=dtype)
    layer.wired = True  # on its own, outside a model
    with torch.no_grad():
        for p in layer.parameters():
            p.uniform_(-1, 1)
    return layer


def test_evonorm_s0_matches_the_formulas_forward_and_backward():
    layer = evonorm_s0(8)
    params = [p.detach().clone().requires_grad_() for p in (layer.weight, layer.bias, layer.v)]
    x = (torch.randn(3, 8, 5, 6, dtype=torch.float64) * 2 + 1).requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    dy = torch.randn(3, 8, 5, 6, dtype=torch.float64)
    y, expected = layer(x), reference_evonorm_s0(x_ref, *params, 4, layer.eps)
    torch.testing.assert_close(y, expected, rtol=1e-12, atol=1e-12)
    y.backward(dy)
    expected.backward(dy)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-10, atol=1e-12)
    for got, want in zip((layer.weight.grad, layer.bias.grad, layer.v.grad), [p.grad for p in params]):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_evonorm_s0_equals_timms_layer_in_float32_and_saves_a_fifth_of_it():
    ours = evonorm_s0(32, torch.float32)
    theirs = timm.layers.EvoNorm2dS0(32, groups=4)
    theirs.load_state_dict(ours.state_dict())
    x, dy = torch.randn(8, 32, 14, 14) * 2 + 0.5, torch.randn(8, 32, 14, 14)
    for got, want in zip(outputs_and_gradients(ours, x, dy), outputs_and_gradients(theirs, x, dy)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())
    x.requires_grad_()
    size = x.numel() * x.element_size()
    ours_saved, theirs_saved = saved_bytes(ours, x, dy), saved_bytes(theirs, x, dy)
    bn_relu = saved_bytes(nn.Sequential(nn.BatchNorm2d(32), nn.ReLU()), x, dy)
    assert ours_saved < 1.01 * size and ours_saved <= theirs_saved / 2 and ours_saved < bn_relu

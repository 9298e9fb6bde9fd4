"""The norm + activation layers that keep only their input for the backward: FRN + TLU, EvoNorm-S0
and EvoNorm-B0 against slow references from the papers' formulas (Singh & Krishnan, CVPR 2020; Liu
et al., NeurIPS 2020) and against timm's layers, forward and backward; their compiled kernels
against the eager ones; and what they save."""

import copy

import pytest
import timm
import torch
from torch import nn

import mabn
from mabn.benchmark import saved_bytes
from mabn.norms.norm_act import EVONORM_B0, EVONORM_S0, FRN, NormAct


def reference_frn(x, gamma, beta, tau, eps):
    """nu2 = mean over H, W of x^2; y = gamma x / sqrt(nu2 + eps) + beta; TLU: max(y, tau)."""
    nu2 = x.square().mean((2, 3), keepdim=True)
    y = gamma.view(1, -1, 1, 1) * x / torch.sqrt(nu2 + eps) + beta.view(1, -1, 1, 1)
    return torch.maximum(y, tau.view(1, -1, 1, 1)) if tau is not None else y


def standalone(name, channels, dtype=torch.float64, **options):
    """The layer on its own (outside a model: nothing to wire), its parameters drawn from U(-1, 1)."""
    layer = mabn.build_norm(name, channels, dtype=dtype, **options)
    layer.wired = True
    with torch.no_grad():
        for p in layer.parameters():
            p.uniform_(-1, 1)
    return layer


def frn(channels, apply_act, dtype=torch.float64):
    return standalone("frn", channels, dtype, apply_act=apply_act)


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
    assert torch.autograd.gradcheck(lambda x, *p: NormAct.apply(FRN, (1e-5,), 1, x, *p), inputs)


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
    return standalone("evonorm_s0", channels, dtype, groups=4)


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


def reference_evonorm_b0(x, gamma, beta, v, running_var, normalization_batch, momentum, eps):
    """Liu et al. (NeurIPS 2020): x / max(sqrt(batch variance + eps), v x + sqrt(instance variance +
    eps)) gamma + beta, biased variances; per group of ``normalization_batch`` consecutive samples,
    each group updating the running variance in turn with its unbiased variance (as timm's layer)."""
    at = lambda p: p.view(1, -1, 1, 1)
    outputs = []
    for part in x.split(normalization_batch):
        batch_var = part.var((0, 2, 3), unbiased=False, keepdim=True)
        count = part.numel() // part.shape[1]
        running_var = (1 - momentum) * running_var + momentum * batch_var.detach().flatten() * count / (count - 1)
        instance_std = torch.sqrt(part.var((2, 3), unbiased=False, keepdim=True) + eps)
        divisor = torch.maximum(torch.sqrt(batch_var + eps).expand_as(part), at(v) * part + instance_std)
        outputs.append(part / divisor * at(gamma) + at(beta))
    return torch.cat(outputs), running_var


def evonorm_b0(channels, normalization_batch, dtype=torch.float64):
    layer = standalone("evonorm_b0", channels, dtype, normalization_batch=normalization_batch)
    with torch.no_grad():
        layer.running_var.uniform_(0.5, 2)
    return layer


@pytest.mark.parametrize("normalization_batch", [None, 2])
def test_evonorm_b0_matches_the_formulas_over_steps_forward_backward_and_running_variance(normalization_batch):
    layer = evonorm_b0(6, normalization_batch)
    params = [p.detach().clone().requires_grad_() for p in (layer.weight, layer.bias, layer.v)]
    running_var = layer.running_var.clone()
    for step in range(3):  # the divisor takes the batch std in some places, v x + instance std in others
        x = (torch.randn(4, 6, 3, 5, dtype=torch.float64) * (1 + step) + step).requires_grad_()
        x_ref = x.detach().clone().requires_grad_()
        dy = torch.randn(4, 6, 3, 5, dtype=torch.float64)
        layer.zero_grad()
        for p in params:
            p.grad = None
        y = layer(x)
        expected, running_var = reference_evonorm_b0(
            x_ref, *params, running_var, normalization_batch or 4, layer.momentum, layer.eps
        )
        torch.testing.assert_close(y, expected, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(layer.running_var, running_var, rtol=1e-12, atol=1e-12)
        y.backward(dy)
        expected.backward(dy)
        torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-10, atol=1e-12)
        for got, want in zip((layer.weight.grad, layer.bias.grad, layer.v.grad), [p.grad for p in params]):
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kernels,options", [(EVONORM_S0, (2, 1e-3)), (EVONORM_B0, (2, 0.1, 1e-3))])
def test_evonorm_backward_is_the_derivative_of_its_forward(kernels, options):
    torch.manual_seed(0)
    x = torch.randn(4, 4, 3, 3, dtype=torch.float64, requires_grad=True)
    params = [(torch.rand(4, dtype=torch.float64) + 0.5).requires_grad_() for _ in range(3)]
    extra = [torch.ones(4, dtype=torch.float64)] if kernels is EVONORM_B0 else []  # the running variance
    groups = options[0] if kernels is EVONORM_B0 else 1
    assert torch.autograd.gradcheck(lambda x, *p: NormAct.apply(kernels, options, groups, x, *p, *extra), [x, *params])


class PerGroup(nn.Module):
    """timm's layer applied to each group of 2 samples in turn (the normalization batch)."""

    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        return torch.cat([self.layer(part) for part in x.split(2)])


def test_evonorm_b0_equals_timms_layer_per_group_in_float32_and_saves_a_fraction_of_it():
    ours = evonorm_b0(32, 2, torch.float32)
    theirs = timm.layers.EvoNorm2dB0(32)
    theirs.load_state_dict(ours.state_dict())
    x, dy = torch.randn(8, 32, 14, 14) * 2 + 0.5, torch.randn(8, 32, 14, 14)
    for got, want in zip(outputs_and_gradients(ours, x, dy), outputs_and_gradients(PerGroup(theirs), x, dy)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())
    torch.testing.assert_close(ours.running_var, theirs.running_var)
    x.requires_grad_()
    size = x.numel() * x.element_size()
    ours_saved, theirs_saved = saved_bytes(ours, x, dy), saved_bytes(PerGroup(theirs), x, dy)
    bn_relu = saved_bytes(nn.Sequential(nn.BatchNorm2d(32), nn.ReLU()), x, dy)
    # x and, per (sample, channel), the instance mean and std: 2 / (14 * 14) of x
    assert ours_saved < 1.02 * size and ours_saved <= theirs_saved / 2 and ours_saved < bn_relu


COMPILED = {
    "frn": {},
    "evonorm_s0": {"groups": 8},
    "evonorm_b0": {"normalization_batch": 2},
}


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("name", sorted(COMPILED))
def test_compiled_kernels_equal_the_eager_ones_over_steps(name, channels_last, monkeypatch, standalone_layers):
    torch.manual_seed(0)
    layer = mabn.build_norm(name, 16, **COMPILED[name])
    with torch.no_grad():
        for p in layer.parameters():
            p.uniform_(0.5, 1.5)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    inputs = [torch.randn(8, 16, 5, 4) * (1 + step) + step for step in range(3)]
    inputs = [x.contiguous(memory_format=memory_format) for x in inputs]
    inputs = [(x, torch.randn_like(x)) for x in inputs]
    records = {}
    for mode in ("0", "1"):
        monkeypatch.setenv("MABN_FUSED", mode)
        trained = copy.deepcopy(layer)
        records[mode] = []
        for x, dy in inputs:
            trained.zero_grad(set_to_none=True)
            records[mode].append([*outputs_and_gradients(trained, x, dy), *(b.clone() for b in trained.buffers())])
    for compiled, eager in zip(records["1"], records["0"]):
        for got, want in zip(compiled, eager):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())

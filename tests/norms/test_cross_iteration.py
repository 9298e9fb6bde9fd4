"""CBN against a slow reference written from the paper's formulas and the authors' layer: the
derivatives by ``autograd.grad`` (as theirs), past entries in a list, one normalization batch at
a time; across burn-in and buffer fill, forward, backward, buffers and an exact resume. And
against the authors' layer itself where their code is given (``CBN_SOURCE=/path/to/mmdet/models/
utils/CBN.py``, from a checkout of github Howal/Cross-iterationBatchNorm outside this repository)."""

import copy
import io

import pytest
import torch
from authors_code import authors_module
from external_code import AuthorsCBN
from torch import nn

import mabn


class ReferenceCBN:
    """Per normalization batch: own mean and second moment, the last k entries compensated to
    today's weight by dmu/dW . (W - W_old) (and the same for nu), entries with negative variance
    dropped, (x - mean) / (sqrt(var) + eps); plain BN with the unbiased variance while
    burning in; running statistics with the own mean and unbiased variance."""

    def __init__(self, channels, buffer_num, burnin, rho, eps=1e-5, momentum=0.1):
        self.k, self.burnin, self.rho, self.eps, self.momentum = buffer_num, burnin, rho, eps, momentum
        self.entries, self.iteration = [], 0
        self.running_mean = torch.zeros(channels, dtype=torch.float64)
        self.running_var = torch.ones(channels, dtype=torch.float64)

    def __call__(self, conv, x, gamma, beta, group_size):
        out = conv(x)
        self.iteration += 1
        results = []
        for start in range(0, len(x), group_size):
            y = out[start : start + group_size]
            mu, nu = y.mean((0, 2, 3)), y.square().mean((0, 2, 3))
            if self.iteration <= self.burnin:
                mean, var = mu, y.var((0, 2, 3), unbiased=True)
            else:
                ones = torch.ones_like(mu)
                dmu = torch.autograd.grad(mu, conv.weight, ones, retain_graph=True)[0]
                dnu = torch.autograd.grad(nu, conv.weight, ones, retain_graph=True)[0]
                weight = conv.weight.detach()
                mus, nus = [mu], [nu]
                for old_mu, old_nu, old_dmu, old_dnu, old_weight in self.entries[-self.k :] if self.k else []:
                    mus.append(old_mu + self.rho * (old_dmu * (weight - old_weight)).sum((1, 2, 3)))
                    nus.append(old_nu + self.rho * (old_dnu * (weight - old_weight)).sum((1, 2, 3)))
                mus, nus = torch.stack(mus), torch.stack(nus)
                keep = (nus - mus.square() >= 0).to(mus.dtype)
                mean = (mus * keep).sum(0) / keep.sum(0)
                var = (nus * keep).sum(0) / keep.sum(0) - mean.square()
                self.entries.append((mu.detach(), nu.detach(), dmu, dnu, weight.clone()))
            with torch.no_grad():
                self.running_mean.lerp_(mu, self.momentum)
                self.running_var.lerp_(y.var((0, 2, 3), unbiased=True), self.momentum)
            normalized = (y - mean[:, None, None]) / (var.sqrt()[:, None, None] + self.eps)
            results.append(normalized * gamma[:, None, None] + beta[:, None, None])
        return torch.cat(results)


def conv_and_cbn(kernel_size=3, in_channels=3, groups=1, **options):
    """A conv (3x3 by default; a 1x1 that widens takes the input's second moment where that is
    cheaper than the weight gradient: here with 2 or more samples per group; grouped or depthwise
    with ``groups``) and its CBN."""
    conv = nn.Conv2d(in_channels, 4, kernel_size, stride=2, padding=kernel_size // 2, groups=groups).double()
    norm = mabn.CrossIterationBatchNorm2d(4, **options).double()
    model = mabn.wire_norms(nn.Sequential(conv, norm))
    return model


@pytest.mark.parametrize(
    "group_size,buffer_num,burnin,kernel_size,in_channels,groups",
    [
        (8, 3, 2, 3, 3, 1),
        (2, 3, 1, 3, 3, 1),
        (2, 5, 0, 3, 3, 1),
        (4, 0, 1, 3, 3, 1),
        (8, 3, 2, 1, 3, 1),
        (2, 3, 1, 1, 3, 1),
        (1, 3, 1, 1, 3, 1),  # 1x1 that widens, 9 positions a group: the weight gradient
        (2, 3, 1, 3, 6, 2),  # grouped
        (4, 3, 1, 3, 4, 4),  # depthwise
        (2, 3, 1, 1, 2, 2),  # depthwise 1x1 that widens
    ],
)
def test_cbn_matches_the_reference_across_burn_in_and_buffer_fill(
    group_size, buffer_num, burnin, kernel_size, in_channels, groups
):
    torch.manual_seed(0)
    model = conv_and_cbn(
        kernel_size, in_channels, groups, normalization_batch=group_size, buffer_num=buffer_num, burnin=burnin, rho=1.0
    )
    conv, norm = model
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(-0.5, 0.5)
    ref_conv = nn.Conv2d(in_channels, 4, kernel_size, stride=2, padding=kernel_size // 2, groups=groups).double()
    ref_conv.load_state_dict(conv.state_dict())
    gamma = norm.weight.detach().clone().requires_grad_(True)
    beta = norm.bias.detach().clone().requires_grad_(True)
    reference = ReferenceCBN(4, buffer_num, burnin, 1.0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.2)
    ref_optimizer = torch.optim.SGD([*ref_conv.parameters(), gamma, beta], lr=0.2)
    for step in range(9):
        x = (torch.randn(8, in_channels, 6, 6, dtype=torch.float64) * 2 + 1).requires_grad_(True)
        dy = torch.randn(8, 4, 3, 3, dtype=torch.float64)  # 6 px, stride 2
        xr = x.detach().clone().requires_grad_(True)
        y, yr = model(x), reference(ref_conv, xr, gamma, beta, group_size)
        torch.testing.assert_close(y, yr, msg=f"forward, step {step}")
        optimizer.zero_grad()
        ref_optimizer.zero_grad()
        y.backward(dy)
        yr.backward(dy)
        torch.testing.assert_close(x.grad, xr.grad, msg=f"input gradient, step {step}")
        torch.testing.assert_close(conv.weight.grad, ref_conv.weight.grad, msg=f"conv gradient, step {step}")
        torch.testing.assert_close(norm.weight.grad, gamma.grad)
        torch.testing.assert_close(norm.bias.grad, beta.grad)
        torch.testing.assert_close(norm.running_mean, reference.running_mean)
        torch.testing.assert_close(norm.running_var, reference.running_var)
        optimizer.step()  # the conv weight moves: the compensation is not zero
        ref_optimizer.step()
    assert int(norm.past_count) == min(buffer_num, (9 - burnin) * (8 // group_size))


def test_cbn_compensation_matters_and_negative_variance_entries_are_dropped():
    """With rho = 0 the past statistics enter raw: the output differs once the weight moved, so
    the test above can fail; a past entry with nu < mu^2 is dropped."""
    torch.manual_seed(0)
    runs = {}
    for rho in (0.0, 1.0):
        torch.manual_seed(0)
        model = conv_and_cbn(buffer_num=2, burnin=0, rho=rho)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
        for _ in range(3):
            torch.manual_seed(1)
            y = model(torch.randn(4, 3, 6, 6, dtype=torch.float64))
            optimizer.zero_grad()
            y.square().mean().backward()
            optimizer.step()
        runs[rho] = y.detach()
    assert not torch.allclose(runs[0.0], runs[1.0])
    conv, norm = conv_and_cbn(buffer_num=1, burnin=0)
    norm.past_count.fill_(1)
    norm.past_mean.fill_(3.0)  # nu - mu^2 = 1 - 9 < 0: dropped, so only the batch's own statistics count
    norm.past_second.fill_(1.0)
    x = torch.randn(4, 3, 6, 6, dtype=torch.float64)
    y = conv(x)
    var, mean = torch.var_mean(y, dim=(0, 2, 3), correction=0, keepdim=True)
    torch.testing.assert_close(norm(conv(x)), (y - mean) / (var.sqrt() + 1e-5))  # eps outside the root


def test_cbn_state_dict_round_trip_resumes_exactly():
    torch.manual_seed(0)
    model = conv_and_cbn(normalization_batch=2, buffer_num=3, burnin=1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    batches = [torch.randn(4, 3, 6, 6, dtype=torch.float64) for _ in range(6)]

    def step(model, optimizer, x):
        y = model(x)
        optimizer.zero_grad()
        y.square().mean().backward()
        optimizer.step()
        return y.detach()

    for x in batches[:3]:
        step(model, optimizer, x)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, buffer)
    resumed = conv_and_cbn(normalization_batch=2, buffer_num=3, burnin=1)
    resumed_optimizer = torch.optim.SGD(resumed.parameters(), lr=0.1)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    resumed.load_state_dict(state["model"])
    resumed_optimizer.load_state_dict(state["optimizer"])
    assert int(resumed[1].past_count) == 3
    for x in batches[3:]:
        torch.testing.assert_close(step(resumed, resumed_optimizer, x), step(model, optimizer, x), rtol=0, atol=0)
    for (name, a), b in zip(model.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


def test_cbn_eval_folds_and_a_bn_checkpoint_loads():
    bn = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    bn[1].running_mean.uniform_(-1, 1)
    bn[1].running_var.uniform_(0.5, 2)
    model = mabn.convert_model(bn, "cbn").eval()
    x = torch.randn(2, 3, 6, 6)
    expected = (model[0](x) - bn[1].running_mean[:, None, None]) / (bn[1].running_var.sqrt()[:, None, None] + 1e-5)
    expected = expected * bn[1].weight[:, None, None] + bn[1].bias[:, None, None]
    torch.testing.assert_close(model(x), expected)
    folded = mabn.fold_norms(copy.deepcopy(model))
    assert isinstance(folded[1], nn.Identity)
    torch.testing.assert_close(folded(x), expected, atol=1e-5, rtol=1e-5)


def test_cbn_without_its_conv_says_how_to_give_it_one():
    norm = mabn.build_norm("cbn", 4, burnin=0)
    with pytest.raises(RuntimeError, match="wire_norms"):
        norm(torch.randn(2, 4, 3, 3, requires_grad=True))
    with pytest.raises(ValueError, match="zero padding"):
        norm.bind_conv(nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"))


@pytest.mark.parametrize("kernel_size", [3, 1])  # 1x1 that widens: the input's second moment
def test_cbn_equals_the_authors_layer_step_by_step(kernel_size):
    """Their CBatchNorm2d (whole batch, buffer 3, burn-in 2) and ours after the same conv, trained
    side by side with SGD for 8 steps in float64: outputs, gradients and running statistics."""
    module = authors_module("CBN_SOURCE", "mmdet/models/utils/CBN.py")
    torch.manual_seed(0)
    ours = conv_and_cbn(kernel_size, buffer_num=3, burnin=2, rho=1.0)
    theirs = AuthorsCBN(module.CBatchNorm2d, 4, buffer_num=3, burnin=2, rho=1.0).double()
    theirs.layer.ones = theirs.layer.ones.double()
    conv = copy.deepcopy(ours[0])
    theirs.conv.append(conv)
    with torch.no_grad():
        for layer in (ours[1], theirs.layer):
            layer.weight.copy_(torch.linspace(0.5, 1.5, 4))
            layer.bias.copy_(torch.linspace(-0.3, 0.3, 4))
    models = (ours, nn.ModuleList([conv, theirs]))
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.2) for m in models]
    for step in range(8):
        x = torch.randn(8, 3, 6, 6, dtype=torch.float64) * 2 + 1
        dy = torch.randn(8, 4, 3, 3, dtype=torch.float64)
        results = []
        for model, run, optimizer in zip(models, (ours, lambda x: theirs(conv(x))), optimizers):
            optimizer.zero_grad()
            inp = x.clone().requires_grad_(True)
            out = run(inp)
            out.backward(dy)
            norm = model[1] if model is ours else theirs.layer
            results.append([out, inp.grad, model[0].weight.grad, norm.weight.grad, norm.running_var])
            optimizer.step()
        for name, a, b in zip(["output", "input grad", "conv grad", "gamma grad", "running var"], *results):
            torch.testing.assert_close(a, b, msg=f"{name}, step {step}")

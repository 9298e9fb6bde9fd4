"""PowerNorm against a slow reference from the authors' formulas, over warm-up and with a
normalization batch, for maps and token sequences; and against the authors' layer itself where
their code is given (``POWERNORM_SOURCE=/path/to/fairseq/modules/norms/mask_powernorm.py``, from a
checkout of github sIncerass/powernorm outside this repository)."""

import pytest
import torch
from authors_code import authors_module
from reference_norms import ReferencePowerNorm, assert_close, batches, forward_backward

import mabn
from mabn.norms import PowerNorm2d, TokenNorm

OPTIONS = {"warmup_iters": 3, "alpha_fwd": 0.8, "alpha_bkw": 0.7}


@pytest.mark.parametrize("normalization_batch", [None, 2, 4])
@pytest.mark.parametrize("scaling_groups", [None, 1, 2])
def test_powernorm_matches_the_step_by_step_reference_through_warm_up(normalization_batch, scaling_groups):
    layer = PowerNorm2d(4, normalization_batch, scaling_groups=scaling_groups, dtype=torch.float64, **OPTIONS)
    reference = ReferencePowerNorm(4, scaling_groups=scaling_groups, **OPTIONS)
    with torch.no_grad():
        layer.weight.uniform_(0.5, 1.5)
        layer.bias.uniform_(-0.5, 0.5)
    gamma, beta = layer.weight.detach().clone(), layer.bias.detach().clone()
    for step, (x, dy) in enumerate(batches(5, (8, 4, 3, 3))):  # steps 1-2-... cross the warm-up of 3
        got = forward_backward(layer, x, dy)
        expected = reference.step(x, dy, gamma, beta, normalization_batch)
        for name, a, b in zip(("y", "dx", "dgamma", "dbeta"), got, expected):
            assert_close(a, b, msg=lambda m, name=name, step=step: f"step {step}, {name}: {m}")
        assert_close(layer.running_phi, reference.phi)
        assert_close(layer.ema_gz, reference.u)
        assert layer.num_iterations.item() == reference.t
    layer.eval()
    x = next(batches(1, (8, 4, 3, 3), seed=9))[0]
    assert_close(layer(x), reference.eval(x, gamma, beta))


def test_the_running_value_replaces_the_batch_value_after_warm_up():
    """Within warm-up the batch's own mean square normalizes; after it, the running phi: a batch
    scaled by 10 is then no longer normalized to unit mean square."""
    layer = PowerNorm2d(3, warmup_iters=2, scaling_groups=None, dtype=torch.float64)
    x = torch.randn(16, 3, 4, 4, dtype=torch.float64)
    for _ in range(2):
        unit = torch.ones(3, dtype=torch.float64)
        torch.testing.assert_close(layer(x).square().mean(dim=(0, 2, 3)), unit, atol=1e-4, rtol=0)
    assert layer(10 * x).square().mean().item() > 50


def test_token_sequences_are_normalized_per_channel_over_the_batch_and_the_tokens():
    tokens = TokenNorm(PowerNorm2d(6, normalization_batch=2, scaling_groups=3, dtype=torch.float64, **OPTIONS))
    reference = ReferencePowerNorm(6, scaling_groups=3, **OPTIONS)
    gamma, beta = torch.ones(6, dtype=torch.float64), torch.zeros(6, dtype=torch.float64)
    generator = torch.Generator().manual_seed(0)
    for _ in range(5):
        x = torch.randn(4, 7, 6, generator=generator, dtype=torch.float64, requires_grad=True)  # (B, T, C)
        dy = torch.randn(4, 7, 6, generator=generator, dtype=torch.float64)
        y = tokens(x)
        y.backward(dy)
        as_map = lambda t: t.detach().transpose(1, 2).unsqueeze(-1)
        ref_y, ref_dx, *_ = reference.step(as_map(x), as_map(dy), gamma, beta, 2)
        assert_close(as_map(y), ref_y)
        assert_close(as_map(x.grad), ref_dx)


def test_powernorm_by_name_with_options_and_a_bad_group_count_in_one_line():
    layer = mabn.build_norm("powernorm", 8, normalization_batch=2, warmup_iters=5)
    assert isinstance(layer, PowerNorm2d) and layer.warmup_iters == 5
    with pytest.raises(ValueError, match=r"powernorm scaling_groups=3 does not divide 8 channels: choose a divisor"):
        mabn.build_norm("powernorm", 8, scaling_groups=3)


def authors_layer():
    module = authors_module("POWERNORM_SOURCE", "fairseq/modules/norms/mask_powernorm.py")
    if not hasattr(torch.autograd.function.FunctionCtx, "saved_variables"):  # removed from torch since their code
        torch.autograd.function.FunctionCtx.saved_variables = property(lambda ctx: ctx.saved_tensors)
    return module.MaskPowerNorm


@pytest.mark.parametrize("group_num", [1, 3])
def test_powernorm_equals_the_authors_layer_step_by_step(group_num):
    """Their MaskPowerNorm takes (T, B, C); ours, over tokens, (B, T, C). Forward, backward and
    buffers through warm-up (warm-up 3, 6 steps), in float64."""
    theirs = authors_layer()(6, alpha_fwd=0.8, alpha_bkw=0.7, warmup_iters=3, group_num=group_num).double()
    ours = TokenNorm(PowerNorm2d(6, scaling_groups=group_num, dtype=torch.float64, **OPTIONS))
    with torch.no_grad():
        for layer in (theirs, ours.norm):
            layer.weight.copy_(torch.linspace(0.5, 1.5, 6))
            layer.bias.copy_(torch.linspace(-0.3, 0.3, 6))
    generator = torch.Generator().manual_seed(1)
    worst = 0.0
    for _ in range(6):
        x = torch.randn(5, 4, 6, generator=generator, dtype=torch.float64) * 2 + 0.5  # (T, B, C)
        dy = torch.randn(5, 4, 6, generator=generator, dtype=torch.float64)
        results = []
        for layer, inp, grad in ((theirs, x, dy), (ours, x.transpose(0, 1), dy.transpose(0, 1))):
            layer.zero_grad()
            inp = inp.clone().requires_grad_(True)
            out = layer(inp)
            out.backward(grad)
            results.append((out, inp.grad))
        (their_y, their_dx), (our_y, our_dx) = results
        pairs = [
            (our_y.transpose(0, 1), their_y),
            (our_dx.transpose(0, 1), their_dx),
            (ours.norm.weight.grad, theirs.weight.grad),
            (ours.norm.bias.grad, theirs.bias.grad),
            (ours.norm.running_phi, theirs.running_phi.flatten()),
            (ours.norm.ema_gz, theirs.ema_gz.flatten()),
        ]
        for a, b in pairs:
            assert_close(a.detach(), b.detach())
            worst = max(worst, (a - b).abs().max().item())
        assert ours.norm.num_iterations.item() == theirs.iters.item()
    print(f"worst difference from the authors' layer over 6 steps: {worst:.1e}")
    ours.eval(), theirs.eval()
    x = torch.randn(5, 4, 6, generator=generator, dtype=torch.float64)
    assert_close(ours(x.transpose(0, 1)).transpose(0, 1), theirs(x))

"""The batch-statistics probe (mabn/probes.py): opt-in hooks, the four statistics of the paper
checked against their formulas (the backward ones through batch norm's own gradient)."""

import pytest
import torch
from torch import nn

import mabn
from mabn import BatchNorm2d, BatchRenorm2d, MABN2d
from mabn.probes import BatchStatisticsProbe, group_statistics


def hooks(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) for m in model.modules())


def net(norm):
    return nn.Sequential(nn.Conv2d(2, 6, 3, padding=1), norm(6), nn.ReLU(), nn.Conv2d(6, 6, 3), norm(6))


def test_off_means_no_hooks_and_detach_removes_them():
    model = net(nn.BatchNorm2d)
    probe = BatchStatisticsProbe(model, layers=2, channels=3, every=2)
    assert hooks(model) == 0  # constructed, not attached: the model is untouched
    with probe:
        assert hooks(model) == 4
    assert hooks(model) == 0


def test_records_only_announced_training_steps():
    model = net(nn.BatchNorm2d)
    probe = BatchStatisticsProbe(model, layers=1, channels=2, every=3, batches=(2, 8)).attach()
    x = torch.randn(8, 2, 5, 5)
    for step in range(1, 8):
        probe.step(step)
        model(x).sum().backward()
    model.eval()
    probe.step(9)
    model(x)  # eval mode: not recorded
    assert sorted({r["step"] for r in probe.records}) == [1, 3, 6]
    assert {(r["stat"], r["batch"]) for r in probe.records} == {
        (s, b) for s in ("mu", "sigma2", "g", "psi") for b in (2, 8)
    }
    assert all(len(r["values"]) == 8 // r["batch"] and len(r["values"][0]) == 2 for r in probe.records)


def test_forward_statistics_are_each_groups_mean_and_biased_variance():
    x, dy = torch.randn(8, 3, 4, 4) * 3 + 1, torch.randn(8, 3, 4, 4)
    stats = group_statistics(x, dy, torch.ones(3), 4)
    for g in range(2):
        values = x[4 * g : 4 * (g + 1)].double().transpose(0, 1).reshape(3, -1)
        mean = values.sum(1) / values.shape[1]
        assert torch.allclose(stats["mu"][g], mean)
        assert torch.allclose(stats["sigma2"][g], ((values - mean[:, None]) ** 2).sum(1) / values.shape[1])


def test_backward_statistics_are_the_g_and_psi_of_batch_norms_gradient():
    """dL/dx = (gamma * dy - g - x_hat * psi) / sigma per normalization batch (the paper's
    backward), with g and psi as the probe measures them."""
    torch.manual_seed(0)
    for layer, batch in ((nn.BatchNorm2d(3), 8), (BatchNorm2d(3, normalization_batch=2), 2)):
        layer = layer.double()
        with torch.no_grad():
            layer.weight.copy_(torch.tensor([0.5, 2.0, -1.0]))
        x = (torch.randn(8, 3, 4, 4, dtype=torch.float64) * 2 + 1).requires_grad_(True)
        dy = torch.randn_like(x)
        layer(x).backward(dy)
        stats = group_statistics(x.detach(), dy, layer.weight, batch)
        for g in range(8 // batch):
            rows = slice(batch * g, batch * (g + 1))
            mu, var = stats["mu"][g].view(1, -1, 1, 1), stats["sigma2"][g].view(1, -1, 1, 1)
            x_hat = (x.detach()[rows] - mu) / torch.sqrt(var + 1e-5)
            expected = (
                layer.weight.view(1, -1, 1, 1) * dy[rows]
                - stats["g"][g].view(1, -1, 1, 1)
                - x_hat * stats["psi"][g].view(1, -1, 1, 1)
            ) / torch.sqrt(var + 1e-5)
            torch.testing.assert_close(x.grad[rows], expected.detach())


def test_mabn_smoothed_and_brn_schedule_values_are_the_layers_own():
    torch.manual_seed(0)
    for norm in (
        lambda c: MABN2d(c, normalization_batch=2, sma_window=4, warmup_iters=0),
        lambda c: BatchRenorm2d(c, normalization_batch=2, warmup_iters=1, r_max_iters=4, d_max_iters=4),
    ):
        model = mabn.wire_norms(net(norm))
        probe = BatchStatisticsProbe(model, layers=1, channels=2, every=1, batches=(2,)).attach()
        layer = probe.layers[0][1]
        for step in range(1, 4):
            probe.step(step)
            psi_before = layer.psi_window[:, :2].mean(0).tolist() if isinstance(layer, MABN2d) else None
            model(torch.randn(4, 2, 5, 5)).sum().backward()
            got = {r["stat"]: r["values"][0] for r in probe.records if r["step"] == step and r["batch"] == 0}
            if isinstance(layer, MABN2d):
                assert got["chi2_sma"] == layer.chi2_window[:, :2].mean(0).tolist()
                assert got["ema_chi2"] == layer.ema_chi2[:2].tolist()
                assert got["psi_sma"] == psi_before
            else:
                done = step - 1  # iterations before this one; plain BN for 1, then r_max 1 -> 3 by 4
                assert got["r_max"][0] == pytest.approx(1.0 + 2.0 * max(done - 1, 0) / 3)

"""Precise statistics: every layer's population statistics recomputed as those of all the batches'
samples together (fvcore's estimator), against references from the formulas and against fvcore
itself on torch's BatchNorm2d; everything restored after; and in a run."""

import copy

import pytest
import torch
from hydra_configs import compose_config
from torch import nn

import mabn
from mabn.engine.classification import train
from mabn.norms.power_norm import group_scaling
from mabn.precise_statistics import population_layers, precise_statistics

BATCHES, SIZE = 5, 2


def conv_norm(name, **options):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), mabn.norm_layer(name, **options)(4)).double()
    return mabn.wire_norms(model)


def inputs():
    generator = torch.Generator().manual_seed(3)
    return [2 * torch.randn(SIZE, 3, 5, 5, generator=generator, dtype=torch.float64) + 1 for _ in range(BATCHES)]


def layer_inputs(model):
    """What the norm sees for each batch: the conv's output (its weight centralized where wired)."""
    with torch.no_grad():
        return [model[0](x) for x in inputs()]


def average(values):
    return torch.stack(values).mean(0)


# the population statistics each layer should end with: those of all the batches' samples
REFERENCES = {
    "bn": lambda xs: {
        "running_mean": average([x.mean((0, 2, 3)) for x in xs]),
        "running_var": torch.cat(xs).var((0, 2, 3), correction=0),  # of all the samples together
    },
    "mabn": lambda xs: {"ema_chi2": average([x.square().mean((0, 2, 3)) for x in xs])},
    "powernorm": lambda xs: {"running_phi": average([group_scaling(x, 1).square().mean((0, 2, 3)) for x in xs])},
}
CASES = [
    ("bn", {"normalization_batch": SIZE}, "bn"),
    ("brn", {"normalization_batch": SIZE, "warmup_iters": 0, "r_max_iters": 1, "d_max_iters": 1}, "bn"),
    ("cbn", {"normalization_batch": SIZE, "burnin": 0}, "bn"),
    ("syncbn", {}, "bn"),
    ("mabn", {"normalization_batch": SIZE, "sma_window": 2, "warmup_iters": 0}, "mabn"),
    ("powernorm", {"normalization_batch": SIZE, "warmup_iters": 0}, "powernorm"),
]


@pytest.mark.parametrize("name,options,reference", CASES)
def test_population_statistics_are_the_batches_statistics_averaged(name, options, reference):
    model = conv_norm(name, **options)
    expected = REFERENCES[reference](layer_inputs(model))
    ((layer, buffers, options),) = population_layers(model)
    assert layer is model[1] and buffers == tuple(expected)
    before, options_before = copy.deepcopy(model.state_dict()), {k: getattr(layer, k) for k in options}
    with precise_statistics(model, iter(inputs()), BATCHES) as used:
        assert used == BATCHES
        for buffer, value in expected.items():
            torch.testing.assert_close(getattr(layer, buffer).double(), value, rtol=1e-5, atol=1e-7, msg=buffer)
    for key, value in model.state_dict().items():  # every buffer back, and the options
        assert torch.equal(value, before[key]), key
    assert {k: getattr(layer, k) for k in options} == options_before and model.training


def test_the_same_estimator_as_fvcore_on_torch_batchnorm():
    fvcore_precise_bn = pytest.importorskip("fvcore.nn.precise_bn", reason="fvcore is in the test extra")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4))
    theirs = copy.deepcopy(model).double()
    fvcore_precise_bn.update_bn_stats(theirs, inputs(), BATCHES)
    ours = model.double()
    with precise_statistics(ours, iter(inputs()), BATCHES):
        for (name, value), expected in zip(ours.state_dict().items(), theirs.state_dict().values()):
            if "running" in name:
                torch.testing.assert_close(value, expected, rtol=1e-12, atol=1e-12, msg=name)


def test_a_run_reports_precise_statistics_beside_the_running_ones(tmp_path):
    overrides = ["data=synthetic", "workers=0", "per_device_batch=8", "batch=2", "norm=bn", "max_steps=4"]
    summary = train(compose_config("train_imagenet", [*overrides, "precise_stats.batches=6"]), tmp_path)
    assert summary["precise_batches"] == 6
    assert 0 <= summary["precise_top1_error"] <= 100 and 0 <= summary["precise_top5_error"] <= 100
    plain = train(compose_config("train_imagenet", overrides), tmp_path / "plain")
    assert plain["top1_error"] == summary["top1_error"] and "precise_top1_error" not in plain  # training unchanged

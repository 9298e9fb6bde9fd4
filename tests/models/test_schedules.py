"""The rule that scales BRN's and MABN's iteration schedules with the run length
(mabn/schedules.py): the paper's counts unchanged by default, proportional otherwise."""

import pytest
import torch
from hydra_configs import compose_config
from reference_norms import ReferenceBRN
from torch import nn

from mabn import BatchRenorm2d, CrossIterationBatchNorm2d, MABN2d
from mabn.config import NormSpec
from mabn.engine.training import norm_layer_from_config
from mabn.schedules import PAPER_STEPS, scale_schedules, scaled_count, schedule_norms


def test_counts_scale_in_proportion_to_the_run_and_stay_at_least_one():
    assert scaled_count(40000, 6000, PAPER_STEPS) == 400
    assert scaled_count(5000, 3750, PAPER_STEPS) == 31  # 31.25
    assert scaled_count(100, 3750, PAPER_STEPS) == 1  # 0.625 rounds up to at least 1
    assert scaled_count(0, 3750, PAPER_STEPS) == 0  # "no warm-up" stays none
    assert scaled_count(5000, PAPER_STEPS, PAPER_STEPS) == 5000
    with pytest.raises(ValueError, match="schedule_reference_steps must be positive"):
        scaled_count(5000, 100, 0)


def model():
    return nn.Sequential(nn.Conv2d(2, 4, 1), BatchRenorm2d(4), MABN2d(4), nn.BatchNorm2d(4))


def test_the_paper_settings_stay_exactly_the_papers_without_a_reference():
    net = model()
    used = scale_schedules(net, 3750, None)
    assert used == {
        "BatchRenorm2d": {"warmup_iters": 5000, "r_max_iters": 40000, "d_max_iters": 25000},
        "MABN2d": {"warmup_iters": 100, "renorm_warmup_iters": 1000},
    }


def test_a_short_run_scales_every_schedule_of_every_layer():
    net = model()
    used = scale_schedules(net, 6000, PAPER_STEPS)
    assert used == {
        "BatchRenorm2d": {"warmup_iters": 50, "r_max_iters": 400, "d_max_iters": 250},
        "MABN2d": {"warmup_iters": 1, "renorm_warmup_iters": 10},
    }
    assert (net[1].warmup_iters, net[2].renorm_warmup_iters) == (50, 10)


def test_scaled_brn_relaxes_r_and_d_over_the_scaled_iterations():
    """BRN with the counts of a 6000-step run follows the paper's formula at those counts."""
    torch.manual_seed(0)
    layer = BatchRenorm2d(3, normalization_batch=2).double()
    scale_schedules(layer, 6000, PAPER_STEPS)
    reference = ReferenceBRN(3, 0.01, 1e-5, 3.0, 5.0, 50, 400, 250)
    for iteration in range(420):
        r_max, d_max = layer.limits()
        assert float(r_max) == pytest.approx(reference.limit(3.0, 1.0, 400))
        assert float(d_max) == pytest.approx(reference.limit(5.0, 0.0, 250))
        reference.iterations_done += 1
        layer.num_iterations += 1
        if iteration == 49:
            assert float(r_max) == 1.0 and float(d_max) == 0.0  # plain BN until iteration 50
    assert float(layer.limits()[0]) == 3.0 and float(layer.limits()[1]) == 5.0


def test_a_run_fraction_sets_its_option_to_that_share_of_the_run_whatever_the_reference():
    """CBN's burn-in is given as a fraction of the run (its authors' 8 of 12 epochs), so it
    starts the window at the same point of every run; the counts of the other layers still scale."""
    for reference in (None, PAPER_STEPS, 180000):
        net = nn.Sequential(nn.Conv2d(2, 4, 1), CrossIterationBatchNorm2d(4), MABN2d(4))
        used = scale_schedules(net, 4000, reference, {"burnin": 0.6667})
        assert used["CrossIterationBatchNorm2d"] == {"burnin": 2667}
        assert net[1].burnin == 2667
    assert scale_schedules(model(), 6000, PAPER_STEPS, {"burnin": 0.5}) == scale_schedules(model(), 6000, PAPER_STEPS)
    with pytest.raises(
        ValueError, match=r"norm.run_fractions.burnin=8 is not a fraction of the run: give a number in \[0, 1\]"
    ):
        scale_schedules(model(), 6000, None, {"burnin": 8})


def test_the_cbn_config_starts_its_window_after_two_thirds_of_any_run():
    cfg = compose_config("train_imagenet", ["norm=cbn", "batch=2"])
    norm = NormSpec.from_config(cfg.norm)
    net = nn.Sequential(nn.Conv2d(2, 4, 3), norm_layer_from_config(norm)(4))
    for steps in (600, 4000):
        assert schedule_norms(net, steps, norm) == {"CrossIterationBatchNorm2d": {"burnin": round(steps * 2 / 3)}}
        assert net[1].burnin == round(steps * 2 / 3)

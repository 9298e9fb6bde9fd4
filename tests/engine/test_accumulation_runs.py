"""Gradient accumulation in the entry points: ``per_device_batch=2 accumulate_steps=16`` trains as
the paper's protocol, ``per_device_batch=32 batch=2`` (16 normalization batches of 2 in one
batch), with each norm's warm-ups and schedules crossed within the run; exact resume in the
middle of an accumulated run; and the detection engine accumulates too."""

import pytest
import torch
from hydra_configs import compose_config
from run_files import train_losses

from mabn.config import ConfigError
from mabn.engine.classification import train
from mabn.engine.run import run_identity

COMMON = ["data=synthetic", "data.image_size=16", "model.options.widths=[16,16,32,32]", "workers=0"]
COMMON += ["log_every_steps=1", "max_steps=12", "batch=2", "eval_every_epochs=100"]
# each norm's counts short enough that the run crosses them (in optimizer steps, or PowerNorm's
# in normalization batches)
SCHEDULES = {
    "bn": [],
    "brn": ["norm.options.warmup_iters=2", "norm.options.r_max_iters=8", "norm.options.d_max_iters=6"],
    "mabn": ["norm.options.warmup_iters=3", "norm.options.renorm_warmup_iters=6"],
    "cbn": [],  # burn-in at 8 of the 12 steps (norm.run_fractions)
    "powernorm": ["norm.options.warmup_iters=40"],
}


def run(tmp_path, name, *overrides):
    return train(compose_config("train_imagenet", [*COMMON, *overrides]), tmp_path / name)


@pytest.mark.parametrize("norm", sorted(SCHEDULES))
def test_sixteen_micro_batches_of_2_train_as_one_batch_of_32_at_normalization_batch_2(norm, tmp_path):
    overrides = [f"norm={norm}", *SCHEDULES[norm]]
    whole = run(tmp_path, "whole", *overrides, "per_device_batch=32")
    accumulated = run(tmp_path, "accumulated", *overrides, "per_device_batch=2", "accumulate_steps=16")
    assert whole["images_per_step"] == accumulated["images_per_step"] == 32
    one, many = train_losses(tmp_path / "whole"), train_losses(tmp_path / "accumulated")
    assert list(one) == list(many) == list(range(1, 13))
    # float32 sums in another order: rounding, which training then carries from step to step
    torch.testing.assert_close(torch.tensor(list(many.values())), torch.tensor(list(one.values())), rtol=1e-4, atol=0)
    final = lambda d: torch.load(d / "model_final.pt", weights_only=True)
    weights = final(tmp_path / "whole")
    for key, value in final(tmp_path / "accumulated").items():  # float32 rounding carried 12 steps: 1.5e-4 at most
        if value.is_floating_point():
            assert (value - weights[key]).norm() <= 1e-3 * weights[key].norm() + 1e-4, key
    assert abs(accumulated["top1_error"] - whole["top1_error"]) <= 100 / 64  # one of the 64 images at most


def test_a_run_preempted_between_accumulated_steps_resumes_exactly(tmp_path):
    overrides = ["norm=mabn", *SCHEDULES["mabn"], "per_device_batch=2", "accumulate_steps=4"]
    straight = run(tmp_path, "straight", *overrides)
    with pytest.raises(SystemExit):
        run(tmp_path, "resumed", *overrides, "debug.preempt_at_step=5")
    resumed = run(tmp_path, "resumed", *overrides)
    assert train_losses(tmp_path / "resumed") == train_losses(tmp_path / "straight")
    assert resumed["top1_error"] == straight["top1_error"]


def test_accumulate_steps_must_be_a_whole_number(tmp_path):
    with pytest.raises(ConfigError, match=r"accumulate_steps=0 is not a whole number >= 1"):
        run(tmp_path, "bad", "accumulate_steps=0")
    assert not (tmp_path / "bad" / "checkpoint.pt").exists()


def test_a_checkpoint_from_before_accumulation_and_precise_statistics_still_resumes():
    before = {"seed": 0, "batch": 2}  # a config written before the keys existed
    assert run_identity({**before, "accumulate_steps": 1, "precise_stats": {"batches": 0}}) == run_identity(before)
    assert run_identity({**before, "accumulate_steps": 2}) != run_identity(before)

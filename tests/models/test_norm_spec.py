"""The ``norm:`` group as one spec (``mabn.config.NormSpec``): every key and its default, every
norm config read into it, and an unknown key or norm refused in one line before Hydra speaks."""

import subprocess
import sys
from dataclasses import fields

import pytest
from hydra_configs import CONFIG_DIR, ROOT, compose_config, group_options

import mabn
from mabn.config import ConfigError, NormSpec, check_overrides

DEFAULTS = {
    "options": {},
    "label": None,
    "centralize_weights": True,
    "recompute_weights": False,
    "gamma_lr_factor": 1.0,
    "simulated_batch": None,
    "schedule_reference_steps": None,
    "run_fractions": None,
    "mimic": False,
    "logits_normalization_batch": None,
}


def test_every_key_and_its_default():
    spec = NormSpec.from_config({"name": "bn"})
    assert {f.name: getattr(spec, f.name) for f in fields(spec)} == {"name": "bn", **DEFAULTS}
    assert spec.display_name == "bn" and NormSpec(name="mabn", label="mabn_no_wc").display_name == "mabn_no_wc"


@pytest.mark.parametrize("norm", group_options("norm"))
def test_every_norm_config_reads_into_the_spec(norm):
    spec = NormSpec.from_config(compose_config("train_imagenet", [f"norm={norm}", "batch=2"]).norm)
    assert spec.name in mabn.NORMS
    assert isinstance(spec.options, dict) and "${" not in str(spec.options)  # resolved
    expected = {
        "mabn_no_wc": {"centralize_weights": False, "label": "mabn_no_wc"},
        "bn_small_gamma": {"gamma_lr_factor": 0.01, "label": "bn_small_gamma"},
        "mimicnorm": {"mimic": True, "logits_normalization_batch": 2},
        "mabn": {"centralize_weights": True, "simulated_batch": 32},
    }.get(norm, {})
    assert {key: getattr(spec, key) for key in expected} == expected


def test_experiments_and_overrides_reach_the_spec():
    cfg = compose_config("train_imagenet", ["experiment=fashion_study", "norm=cbn", "+norm.recompute_weights=true"])
    spec = NormSpec.from_config(cfg.norm)
    assert spec.schedule_reference_steps == 600000 and spec.recompute_weights is True
    assert spec.run_fractions == {"burnin": 0.6667}  # configs/norm/cbn.yaml


@pytest.mark.parametrize(
    ("norm_cfg", "message"),
    [
        ({"name": "mabn", "centralise_weights": False}, "norm.centralise_weights is not a key of the norm group"),
        ({"name": "mabn", "mimic": "yes"}, "norm.mimic='yes' is not a boolean: give true or false"),
    ],
)
def test_a_bad_key_in_a_config_is_refused_in_one_line(norm_cfg, message):
    with pytest.raises(ConfigError, match=message) as error:
        NormSpec.from_config(norm_cfg)
    assert "\n" not in str(error.value) and ("use one of name, options" in str(error.value)) == ("key" in message)


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["norm=nosuch"], "norm=nosuch is not a norm of this suite: choose one of bn, bn_small_gamma"),
        (["-m", "norm=bn,nosuch", "batch=2"], "norm=nosuch is not a norm"),
        (["norm.centralise_weights=false"], "norm.centralise_weights is not a key of the norm group"),
        (["+norm.centralise_weights=false"], "norm.centralise_weights is not a key of the norm group"),
        (["++norm.gamma_lr=0.1"], "norm.gamma_lr is not a key of the norm group"),
    ],
)
def test_unknown_norms_and_keys_on_the_command_line_are_refused(arguments, message):
    with pytest.raises(ConfigError, match=message):
        check_overrides(arguments, CONFIG_DIR)


def test_known_norms_keys_and_other_arguments_pass():
    check_overrides(
        ["-m", "norm=bn,mabn", "norm.options.sma_window=4", "+norm.recompute_weights=true", "~norm.label"],
        CONFIG_DIR,
    )
    check_overrides(["--config-name", "train_imagenet", "hydra.run.dir=x", "batch=2,32", "norm=glob(*)"], CONFIG_DIR)


@pytest.mark.parametrize("script", ["train_imagenet.py", "train_coco.py"])
def test_the_entry_points_print_one_line(script):
    result = subprocess.run(
        [sys.executable, script, "+norm.centralise_weights=false"], cwd=ROOT, capture_output=True, text=True
    )
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.strip().splitlines() == [
        "error: norm.centralise_weights is not a key of the norm group: use one of "
        + ", ".join(f.name for f in fields(NormSpec))
    ]

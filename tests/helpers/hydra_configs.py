"""Compose the project's Hydra configs in-process, as the entry points would."""

from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser

from mabn.config import register_resolvers

ROOT = Path(__file__).resolve().parents[2]
CONFIG_DIR = ROOT / "configs"


def compose_config(config_name: str, overrides=(), return_hydra_config: bool = False):
    register_resolvers()
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        return compose(config_name, overrides=list(overrides), return_hydra_config=return_hydra_config)


def sweep_jobs(config_name: str, overrides=()) -> list[list[str]]:
    """The overrides of each job that ``-m`` would launch from ``hydra.sweeper.params``
    (expanded as Hydra's BasicSweeper does)."""
    cfg = compose_config(config_name, overrides, return_hydra_config=True)
    params = [f"{key}={value}" for key, value in cfg.hydra.sweeper.params.items()]
    (jobs,) = BasicSweeper.split_arguments(OverridesParser.create().parse_overrides(params), None)
    return [[*overrides, *job] for job in jobs]


def group_options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml"))


def experiments_of(config_name: str) -> list[str]:
    """The experiment options that compose with an entry point's primary config (every option
    composes with one at least: tests/engine/test_train_imagenet.py checks that)."""

    def composes(option):
        try:
            compose_config(config_name, [f"experiment={option}", "data.root=/somewhere"])
        except Exception:
            return False
        return True

    return [option for option in group_options("experiment") if composes(option)]


def base_norms() -> list[str]:
    """The norm options that are layers (bn, mabn, cbn, gn_ws, ...), not MABN's variants (mabn_no_wc, ...)."""
    return [name for name in group_options("norm") if not name.startswith("mabn_")]


def detection_norms() -> list[str]:
    """``base_norms`` a detector takes: all but MimicNorm, a classification method."""
    return [name for name in base_norms() if name != "mimicnorm"]

"""Compose the project's Hydra configs in-process, as the entry points would."""

from pathlib import Path

from hydra import compose, initialize_config_dir

from mabn.config import register_resolvers

ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = ROOT / "configs"


def compose_config(config_name: str, overrides=()):
    register_resolvers()
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        return compose(config_name, overrides=list(overrides))


def group_options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml"))

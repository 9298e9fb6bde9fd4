"""Config helpers shared by the Hydra entry points: resolvers and up-front checks, so bad
input fails at once with one line that names the fix."""

from __future__ import annotations

import json
from pathlib import Path

from omegaconf import DictConfig, OmegaConf


class ConfigError(ValueError):
    """Bad user input; the entry points print it as one line, without a traceback."""


def first_line(error: BaseException, limit: int = 160) -> str:
    """The first line of an error's message, at most ``limit`` characters (for one-line reports)."""
    lines = str(error).strip().splitlines()
    return lines[0][:limit] if lines else ""


def _divide(numerator: int, denominator: int) -> int:
    if denominator <= 0 or numerator % denominator:
        raise ConfigError(
            f"{numerator} is not divisible by {denominator}: choose batch among the divisors "
            f"of norm.simulated_batch={numerator}"
        )
    return numerator // denominator


def register_resolvers() -> None:
    """``${div:a,b}``: exact integer division (the MABN window = simulated batch / batch)."""
    OmegaConf.register_new_resolver("div", _divide, replace=True)


def check_normalization_batch(cfg: DictConfig, per_device_batch: int, key: str = "per_device_batch") -> None:
    """The normalization batch must divide the per-device batch (for norms that use one)."""
    if "normalization_batch" not in cfg.norm.options:
        return
    batch = cfg.batch
    if batch < 1 or per_device_batch % batch:
        divisors = [d for d in range(1, per_device_batch + 1) if per_device_batch % d == 0]
        raise ConfigError(
            f"batch={batch} does not divide {key}={per_device_batch}: use batch in {divisors} or change {key}"
        )


def kept_summary(cfg: DictConfig) -> dict | None:
    """The summary a study kept for this run (``kept_runs``/<run_name>.json, as
    ``mabn.studies.reporting.keep_runs`` writes it), or None: a run finished in an earlier
    session, on another machine or in a clone is not run again."""
    kept = Path(cfg.kept_runs, f"{cfg.run_name}.json") if cfg.get("kept_runs") else None
    if kept is None or not kept.is_file():
        return None
    print(f"[skip] {cfg.run_name}: kept in {kept}")
    return json.loads(kept.read_text())


def resolved(cfg: DictConfig) -> dict:
    """The config as plain, fully resolved containers (for W&B, summaries and checkpoints)."""
    return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)


# numeric keys checked before anything is built: (key, lower bound, bound included)
NUMERIC_KEYS = [
    *(
        (key, 0, False)
        for key in (
            "batch",
            "per_device_batch",
            "epochs",
            "max_steps",
            "stop_at_step",
            "eval_every_epochs",
            "eval_every_steps",
            "log_every_steps",
            "threads",
            "optim.base_lr",
            "optim.reference_batch",
            "norm.simulated_batch",
            "norm.schedule_reference_steps",
            "schedule.max_iter",
            "probe.layers",
            "probe.channels",
        )
    ),
    *(
        (key, 0, True)
        for key in (
            "workers",
            "seed",
            "checkpoint_every_minutes",
            "optim.momentum",
            "optim.weight_decay",
            "optim.label_smoothing",
            "probe.every",
            "optim.schedule.warmup_epochs",
            "schedule.warmup_iters",
            "data.max_bad_fraction",
        )
    ),
]


def check_numbers(cfg: DictConfig) -> None:
    """Every numeric setting in its valid range, before any data or model is built: one line
    that names the key and the range (null leaves an optional key unset)."""
    for key, bound, inclusive in NUMERIC_KEYS:
        value = OmegaConf.select(cfg, key, default=None)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}={value!r} is not a number: give a number {'>=' if inclusive else '>'} {bound}")
        if value < bound or (value == bound and not inclusive):
            raise ConfigError(f"{key}={value} is out of range: it must be {'>=' if inclusive else '>'} {bound}")
    if "max_bad_fraction" in cfg.get("data", {}):
        fraction = cfg.data.max_bad_fraction
        if fraction is None or fraction >= 1:
            raise ConfigError(f"data.max_bad_fraction={fraction} is out of range: give a number >= 0 and < 1")

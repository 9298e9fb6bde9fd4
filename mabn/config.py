"""Config helpers shared by the Hydra entry points: resolvers and up-front checks, so bad
input fails at once with one line that names the fix."""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from pathlib import Path

from omegaconf import DictConfig, OmegaConf


class ConfigError(ValueError):
    """Bad user input; the entry points print it as one line, without a traceback."""


@dataclass(frozen=True)
class NormSpec:
    """The ``norm:`` config group, its keys and their defaults declared once: read with
    ``NormSpec.from_config(cfg.norm)`` where a run starts, and handed to every consumer."""

    name: str  # the registry's name of the layer (mabn.NORMS)
    options: dict = field(default_factory=dict)  # the layer's keyword arguments
    label: str | None = None  # a variant's own name in summaries and reports (mabn_no_wc, ...)
    centralize_weights: bool = True  # MABN's convs centralized (false: the ablation)
    recompute_weights: bool = False  # computed conv weights recomputed in the backward (mabn.norms.reparametrized_conv)
    gamma_lr_factor: float = 1.0  # the norms' gammas learn at this multiple of the lr
    simulated_batch: int | None = None  # MABN: the SMA window spans simulated_batch / batch normalization batches
    schedule_reference_steps: int | None = None  # the norms' iteration counts scale from runs of this length
    run_fractions: dict | None = None  # or are set to these fractions of the run (mabn.schedules)
    mimic: bool = False  # MimicNorm: a method of the whole model (mabn.mimicnorm)
    logits_normalization_batch: int | None = None  # MimicNorm's BatchNorm1d on the logits

    @classmethod
    def keys(cls) -> list[str]:
        return [spec.name for spec in fields(cls)]

    @classmethod
    def from_config(cls, norm_cfg) -> NormSpec:
        """The spec of a resolved ``norm:`` group; a key it does not declare fails in one line."""
        values = OmegaConf.to_container(norm_cfg, resolve=True) if isinstance(norm_cfg, DictConfig) else dict(norm_cfg)
        unknown = sorted(set(values) - set(cls.keys()))
        if unknown:
            raise ConfigError(unknown_norm_key(unknown[0]))
        for key in fields(cls):
            if isinstance(key.default, bool) and not isinstance(values.get(key.name, key.default), bool):
                raise ConfigError(f"norm.{key.name}={values[key.name]!r} is not a boolean: give true or false")
        return cls(**values)

    @property
    def display_name(self) -> str:
        """The norm's name in summaries and reports: its label, else its name."""
        return self.label or self.name


def unknown_norm_key(key: str) -> str:
    return f"norm.{key} is not a key of the norm group: use one of {', '.join(NormSpec.keys())}"


def check_overrides(arguments: list[str], config_dir: Path) -> None:
    """Refuse, in one line and before Hydra composes the config (its messages run to five lines
    and more), ``norm=<name>`` where ``configs/norm/<name>.yaml`` does not exist and a
    ``norm.<key>`` (plain or appended) that ``NormSpec`` does not declare."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    searched = any(a.startswith(("--config-dir", "-cd", "hydra.searchpath")) for a in arguments)
    known = sorted(path.stem for path in (config_dir / "norm").glob("*.yaml"))
    for argument in arguments:
        try:
            (override,) = parser.parse_overrides([argument])
            sweep = override.is_sweep_override()
            values = list(override.sweep_string_iterator()) if sweep else [override.get_value_element_as_str()]
        except Exception:  # not an override (an option or its value) or a glob: Hydra reads it
            continue
        key = override.key_or_group
        if key == "norm" and not override.is_delete() and not searched:
            for value in values:
                if value not in known:
                    raise ConfigError(f"norm={value} is not a norm of this suite: choose one of {', '.join(known)}")
        elif key.startswith("norm.") and key.split(".")[1] not in NormSpec.keys():
            raise ConfigError(unknown_norm_key(key.split(".")[1]))


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
            "accumulate_steps",
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
            "precise_stats.batches",
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


def accumulate_steps(cfg: DictConfig) -> int:
    """``accumulate_steps``, checked: micro-batches per optimizer step (1: no accumulation)."""
    k = cfg.get("accumulate_steps", 1)
    if not isinstance(k, int) or k < 1:
        raise ConfigError(f"accumulate_steps={k} is not a whole number >= 1: use 1 (no accumulation) or more")
    return k


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

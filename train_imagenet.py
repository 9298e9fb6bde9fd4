"""ResNet classification with any norm: ``python train_imagenet.py norm=mabn batch=2``.

Config: configs/train_imagenet.yaml (groups norm/, model/, data/, optim/, logger/, experiment/).
Relaunching the same command resumes from the run directory's checkpoint; with
``kept_runs=<folder>`` a run whose summary a study kept there (``<run_name>.json``) is skipped.
"""

import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode

from mabn.config import ConfigError, check_numbers, check_overrides, kept_summary, register_resolvers

register_resolvers()


@hydra.main(version_base="1.3", config_path="configs", config_name="train_imagenet")
def main(cfg):
    run_dir = HydraConfig.get().runtime.output_dir
    if (kept := kept_summary(cfg)) is not None:
        return kept
    try:
        check_numbers(cfg)  # before torch and the layers load: bad numbers fail at once
        from mabn.engine.classification import train

        return train(cfg, run_dir)
    except FloatingPointError as error:  # a diverged run is a result of a sweep: the others go on
        Path(run_dir, "diverged.txt").write_text(f"{error}\n")
        if HydraConfig.get().mode != RunMode.MULTIRUN:
            sys.exit(f"error: {error}")
        print(f"error: {error}", file=sys.stderr)
        return {"diverged": str(error)}
    except ConfigError as error:
        sys.exit(f"error: {error}")


if __name__ == "__main__":
    try:
        check_overrides(sys.argv[1:], Path(__file__).parent / "configs")  # one line, before Hydra's own
    except ConfigError as error:
        sys.exit(f"error: {error}")
    main()

"""ResNet classification with any norm: ``python train_imagenet.py norm=mabn batch=2``.

Config: configs/train_imagenet.yaml (groups norm/, model/, data/, optim/, logger/, experiment/).
Relaunching the same command resumes from the run directory's checkpoint; with
``kept_runs=<folder>`` a run whose summary a study kept there (``<run_name>.json``) is skipped.
"""

import json
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode

from mabn.config import ConfigError, check_numbers, register_resolvers

register_resolvers()


@hydra.main(version_base="1.3", config_path="configs", config_name="train_imagenet")
def main(cfg):
    run_dir = HydraConfig.get().runtime.output_dir
    kept = Path(cfg.kept_runs, f"{cfg.run_name}.json") if cfg.kept_runs else None
    if kept and kept.is_file():  # finished in an earlier session, on another machine or in a clone
        print(f"[skip] {cfg.run_name}: kept in {kept}")
        return json.loads(kept.read_text())
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
    main()

"""ResNet classification with any norm: ``python train_imagenet.py norm=mabn batch=2``.

Config: configs/train_imagenet.yaml (groups norm/, model/, data/, optim/, logger/, experiment/).
Relaunching the same command resumes from the run directory's checkpoint.
"""

import sys

import hydra
from hydra.core.hydra_config import HydraConfig

from mabn.config import ConfigError, check_numbers, register_resolvers

register_resolvers()


@hydra.main(version_base="1.3", config_path="configs", config_name="train_imagenet")
def main(cfg):
    from mabn.engine.classification import train

    try:
        check_numbers(cfg)
        return train(cfg, HydraConfig.get().runtime.output_dir)
    except (ConfigError, FloatingPointError) as error:
        sys.exit(f"error: {error}")


if __name__ == "__main__":
    main()

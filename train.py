"""Train a model: ``python train.py [experiment=NAME] [group=option] [key=value ...]``.

With no arguments: a small vanilla decoder on the embedded standard-library corpus.
"""

import os
import sys
from pathlib import Path

os.environ.setdefault("XVARIANTS_ROOT", str(Path(__file__).resolve().parent))
os.environ.setdefault("WANDB_MODE", "offline")  # wandb never reaches the network unless asked

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from xvariants.config_errors import ConfigError, DataError  # noqa: E402
from xvariants.loading import CheckpointError  # noqa: E402


@hydra.main(version_base="1.3", config_path="configs", config_name="train")
def main(cfg: DictConfig) -> float | None:
    from xvariants.training.run import train

    try:
        metrics = train(cfg)
    except (ConfigError, DataError, CheckpointError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    return metrics.get("val/loss")


if __name__ == "__main__":
    main()

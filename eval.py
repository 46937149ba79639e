"""Evaluate a checkpoint: ``python eval.py ckpt_path=PATH [split=test]``."""

import os
import sys
from pathlib import Path

os.environ.setdefault("XVARIANTS_ROOT", str(Path(__file__).resolve().parent))
os.environ.setdefault("WANDB_MODE", "offline")

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from xvariants.config_errors import ConfigError  # noqa: E402
from xvariants.training.checkpoint import CheckpointError  # noqa: E402


@hydra.main(version_base="1.3", config_path="configs", config_name="eval")
def main(cfg: DictConfig) -> None:
    from xvariants.training.run import evaluate

    try:
        evaluate(cfg)
    except (ConfigError, CheckpointError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()

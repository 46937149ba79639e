"""Train a model: ``python train.py [experiment=NAME] [group=option] [key=value ...]``.

With no arguments: a small vanilla decoder on the embedded standard-library corpus.
"""

import os
from pathlib import Path

os.environ.setdefault("XVARIANTS_ROOT", str(Path(__file__).resolve().parent))
os.environ.setdefault("WANDB_MODE", "offline")  # wandb never reaches the network unless asked

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from xvariants.errors import run_hydra_entry, user_errors  # noqa: E402


@hydra.main(version_base="1.3", config_path="configs", config_name="train")
def train_main(cfg: DictConfig) -> float | None:
    from xvariants.training.run import train

    with user_errors():
        return train(cfg).get("val/loss")


def main() -> float | None:
    """User errors end as one ``error:`` line and exit status 2 (see :mod:`xvariants.errors`)."""
    return run_hydra_entry(train_main)


if __name__ == "__main__":
    main()

"""Shared fixtures: compose the real Hydra configs, shrunk to run in seconds."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
os.environ.setdefault("XVARIANTS_ROOT", str(ROOT))
os.environ.setdefault("WANDB_MODE", "offline")


def compose_train(overrides: list[str], tmp_path: Path):
    """Compose ``configs/train.yaml`` with overrides and make it runnable without hydra.main."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path / "run")
        cfg.paths.log_dir = str(tmp_path / "logs")
        cfg.paths.cache_dir = str(tmp_path.parent / "token-cache")
        cfg.trainer.enable_progress_bar = False
        cfg.trainer.enable_model_summary = False
        cfg.sample_tokens = 0
        del cfg["hydra"]
    GlobalHydra.instance().clear()
    return cfg


#: overrides that make any config a few-step CPU run on a small slice of the data
TINY = [
    "trainer.max_steps=4",
    "trainer.val_check_interval=2",
    "trainer.limit_val_batches=2",
    "trainer.log_every_n_steps=1",
    "trainer.accelerator=cpu",
    "trainer.devices=1",
    "optim.warmup_steps=1",
    "logger=csv",
]


@pytest.fixture
def tiny_text(tmp_path_factory) -> Path:
    """A small real text file (standard-library source) for fast end-to-end runs."""
    import textwrap
    import inspect
    import json as _json

    p = tmp_path_factory.mktemp("corpus") / "tiny.txt"
    p.write_text(textwrap.dedent(inspect.getsource(_json)) * 6)
    return p


@pytest.fixture
def one_thread():
    """Tiny models: thread hand-offs cost more than the math, and CI cores are shared."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)

"""Evaluate checkpoints.

``python eval.py ckpt_path=PATH [split=test]``: loss / ppl / bpc of one checkpoint.
``python eval.py compare=[A,B,C] eval.attention_lengths=[...]``: long-context comparison
(table, CSV, plots, optional RECL) written into the run folder; see configs/eval.yaml.
"""

import os
from pathlib import Path

os.environ.setdefault("XVARIANTS_ROOT", str(Path(__file__).resolve().parent))
os.environ.setdefault("WANDB_MODE", "offline")

import hydra  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402

from xvariants.config_errors import ConfigError  # noqa: E402
from xvariants.errors import run_hydra_entry, user_errors  # noqa: E402


def run(cfg: DictConfig):
    """Single-checkpoint evaluation, or a comparison when ``compare`` or attention lengths are given."""
    plain = OmegaConf.to_container(cfg, resolve=True)
    ev = plain.get("eval") or {}
    comparing = plain.get("compare") is not None or any(
        ev.get(k) is not None for k in ("attention_lengths", "attention_multipliers")
    )
    if comparing:
        from xvariants.evaluation.compare import compare

        return compare(plain, plain["paths"]["output_dir"])
    if not plain.get("ckpt_path"):
        raise ConfigError("ckpt_path", "give a checkpoint (ckpt_path=PATH) or several (compare=[A,B,...])")
    from xvariants.training.run import evaluate

    return evaluate(cfg)


@hydra.main(version_base="1.3", config_path="configs", config_name="eval")
def eval_main(cfg: DictConfig) -> None:
    with user_errors():
        run(cfg)


def main() -> None:
    """User errors end as one ``error:`` line and exit status 2 (see :mod:`xvariants.errors`)."""
    run_hydra_entry(eval_main)


if __name__ == "__main__":
    main()

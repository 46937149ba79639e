"""``train(cfg)`` and ``evaluate(cfg)``: what train.py / eval.py call, and what tests call
directly with a composed config (no subprocess needed)."""

from __future__ import annotations

import json
import logging
import os
import sys
import warnings
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf

from xvariants.baselines import nats_to_bits, unigram_cross_entropy
from xvariants.config_errors import ConfigError, require
from xvariants.constants import BIT_UNITS
from xvariants.data.datamodule import CORPUS_FINGERPRINT
from xvariants.loading import (
    HYPER_PARAMETERS,
    STATE_DICT,
    CheckpointError,
    build_datamodule,
    checkpoint_hparams,
    instantiate_group,
    load_weights,
    model_differences,
    safe_load,
)
from xvariants.training.checkpoint import AtomicCheckpointIO
from xvariants.training.module import LMTask
from xvariants.training.records import write_run_file
from xvariants.training.validate import validate_train_config

log = logging.getLogger("xvariants")

# Lightning warns that a mid-epoch resume may replay data; our datamodule resumes at the
# exact batch (LMTask.on_load_checkpoint), so the warning does not apply.
warnings.filterwarnings("ignore", message=".*resuming from a checkpoint that ended before the epoch ended.*")
warnings.filterwarnings("ignore", message=".*does not have many workers.*")


def _plain(cfg: DictConfig | dict) -> dict:
    return OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)


def validation_lengths(eval_cfg: dict | None) -> dict | None:
    """Memory lengths for validation during training from an experiment's ``eval`` block:
    ``val_mem_len`` (the original Transformer-XL validates with ``mem_len + tgt_len - eval_tgt_len``)."""
    value = (eval_cfg or {}).get("val_mem_len")
    if value is None:
        return None
    require(
        isinstance(value, int) and not isinstance(value, bool) and value >= 0,
        "eval.val_mem_len",
        f"must be an integer >= 0, got {value!r}",
    )
    return {"mem_len": value}


def check_resume_compatible(ckpt: dict, model_cfg: dict, vocab_size: int, path: str) -> None:
    """Refuse a checkpoint trained with another model or vocabulary, naming what differs."""
    hp = ckpt.get(HYPER_PARAMETERS) or {}
    if "model" not in hp:
        raise CheckpointError(f"{path} was not written by xvariants (no model config in its hyper-parameters)")
    if hp.get("vocab_size") != vocab_size:
        raise CheckpointError(f"{path} has vocab_size={hp.get('vocab_size')}, this run's data gives {vocab_size}")
    detail = model_differences(hp["model"], model_cfg)
    if detail:
        raise CheckpointError(f"{path} was trained with a different model ({detail})")


def _describe_corpus(meta: dict) -> str:
    where = meta.get("path") or (meta.get("files") or {}).get("train")
    return f"{meta.get('corpus', '?')} ({where})" if where else str(meta.get("corpus", "?"))


def check_resume_data(ckpt: dict, dm, path: str, allow_new: bool) -> None:
    """Refuse a checkpoint trained on another corpus (its recorded fingerprint, the sha256 of
    each split's text), unless ``resume_on_new_data`` allows it: the checkpoint's vocabulary,
    data position and memory belong to the text it was trained on."""
    require(isinstance(allow_new, bool), "resume_on_new_data", f"must be true or false, got {allow_new!r}")
    now = (getattr(dm, "meta", None) or {}).get(CORPUS_FINGERPRINT)
    if now is None:  # generated data (synthetic tasks): no corpus to compare
        return
    then_meta = (ckpt.get(HYPER_PARAMETERS) or {}).get("data_meta") or {}
    then = then_meta.get(CORPUS_FINGERPRINT)
    if then is None:
        warnings.warn(
            f"{path} records no corpus fingerprint (written before xvariants recorded one): "
            "cannot check that data is the corpus it was trained on"
        )
        return
    if then == now:
        return
    differ = "/".join(s for s in now if then.get(s) != now[s])
    what = (
        f"corpus {_describe_corpus(dm.meta)} is not the one {path} was trained on, "
        f"{_describe_corpus(then_meta)}: its {differ} text differs{_unknown_share(dm)}"
    )
    if not allow_new:
        raise ConfigError(
            "data", f"{what}; the checkpoint's vocabulary and data position belong to its own corpus",
            "that corpus, or resume_on_new_data=true to continue on this one",
        )
    warnings.warn(f"resume_on_new_data=true: {what}; continuing with the saved data position and memory")


def _unknown_share(dm) -> str:
    """How much of the training text the checkpoint's tokenizer cannot represent."""
    unk = getattr(dm.tokenizer, "unk_id", None)
    if unk is None or not hasattr(dm, "tokens"):
        return ""
    train = dm.tokens("train")
    share = float((train == unk).mean()) if len(train) else 0.0
    return f" ({share:.1%} of its training text is outside the checkpoint's vocabulary: <unk>)" if share else ""


def train(cfg: DictConfig) -> dict[str, Any]:
    """Train (and optionally test) from a composed ``train.yaml``; returns final metrics."""
    plain = _plain(cfg)
    validate_train_config(plain)
    L.seed_everything(plain["seed"], workers=True)
    out_dir = Path(plain["paths"]["output_dir"])
    out_dir.mkdir(parents=True, exist_ok=True)

    ckpt = None
    if plain.get("ckpt_path"):
        ckpt = safe_load(plain["ckpt_path"])
    tok_state = (ckpt or {}).get(HYPER_PARAMETERS, {}).get("tokenizer_state")
    dm = build_datamodule(plain["data"], tok_state)
    dm.setup("fit")
    if ckpt is not None:
        check_resume_compatible(ckpt, plain["model"], dm.vocab_size, plain["ckpt_path"])
        check_resume_data(ckpt, dm, plain["ckpt_path"], plain.get("resume_on_new_data", False))

    task = LMTask(
        model=plain["model"],
        vocab_size=dm.vocab_size,
        optim=plain["optim"],
        tokenizer_state=dm.tokenizer.to_dict(),
        data_meta=dm.meta,
        unit=dm.unit,
        compile=plain.get("compile", False),
        log_accuracy=plain.get("log_accuracy", False),
        data=plain["data"],
        val_lengths=validation_lengths(plain.get("eval")),
    )
    _write_run_files(out_dir, plain, dm, task)

    trainer: L.Trainer = hydra.utils.instantiate(
        plain["trainer"],
        callbacks=instantiate_group(plain.get("callbacks")),
        logger=instantiate_group(plain.get("logger")) or False,
        plugins=[AtomicCheckpointIO()],
    )
    if plain.get("train", True):
        trainer.fit(task, datamodule=dm, ckpt_path=plain.get("ckpt_path"), weights_only=True)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    tested = ""
    if plain.get("test"):
        test_ckpt, tested = _test_checkpoint(trainer, plain)
        trainer.test(task, datamodule=dm, ckpt_path=test_ckpt, weights_only=True)
        metrics.update({k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("test/")})
    if trainer.is_global_zero:
        _report(trainer, task, dm, metrics, out_dir, plain.get("sample_tokens", 0), tested)
    return metrics


def _test_checkpoint(trainer, plain: dict) -> tuple[str | None, str]:
    """The checkpoint ``test=true`` evaluates (None: the weights in memory), and what it is.

    After training: the best checkpoint of this run folder (never another folder's, see
    :class:`xvariants.training.checkpoint.ModelCheckpoint`), else this run's final weights.
    With ``train=false``: the checkpoint ``ckpt_path`` names.
    """
    if not plain.get("train", True):
        if plain.get("ckpt_path"):
            return plain["ckpt_path"], f"ckpt_path {plain['ckpt_path']} (train=false)"
        return None, "untrained weights (train=false and no ckpt_path)"
    ck = trainer.checkpoint_callback
    best = getattr(ck, "best_model_path", "") if ck is not None else ""
    if best:
        return best, f"best checkpoint of this run folder, {best}"
    return None, "final weights of this run (no best checkpoint in this run folder)"


def _write_run_files(out_dir: Path, plain: dict, dm, task: LMTask) -> None:
    """The composed config, data metadata and tokenizer, next to the checkpoints."""
    if int(os.environ.get("LOCAL_RANK", "0")) != 0:
        return
    write_run_file(out_dir / "config.yaml", OmegaConf.to_yaml(OmegaConf.create(plain)))
    meta = {
        "python_version": sys.version,
        "torch_version": torch.__version__,
        "data": dm.meta,
        "unit": dm.unit,
        "vocab_size": dm.vocab_size,
        "parameters": sum(p.numel() for p in task.model.parameters()),
    }
    write_run_file(out_dir / "run_meta.json", json.dumps(meta, indent=2, default=str))
    write_run_file(out_dir / "tokenizer.json", json.dumps(dm.tokenizer.to_dict()))


def _report(trainer, task: LMTask, dm, metrics: dict, out_dir: Path, sample_tokens: int, tested: str = "") -> None:
    """Print what a researcher wants after a run: the figure, the baseline, where things are."""
    lines = [f"parameters: {sum(p.numel() for p in task.model.parameters()):,}"]
    unit = dm.unit
    if "val/loss" in metrics:
        lines.append(f"validation loss: {metrics['val/loss']:.4f} nats/{unit}  (ppl {metrics.get('val/ppl', float('nan')):.3f})")
    if unit in BIT_UNITS and "val/bpc" in metrics and hasattr(dm, "tokens"):
        uni = nats_to_bits(unigram_cross_entropy(dm.tokens("train"), dm.tokens("valid"), dm.vocab_size))
        lines.append(f"validation bpc: {metrics['val/bpc']:.4f} {BIT_UNITS[unit]}  (unigram baseline: {uni:.4f})")
    if tested:
        lines.append(f"tested: {tested}")
    for k in ("test/loss", "test/ppl", "test/bpc"):
        if k in metrics:
            lines.append(f"{k}: {metrics[k]:.4f}")
    ck = trainer.checkpoint_callback
    if ck is not None and getattr(ck, "last_model_path", ""):
        lines.append(f"checkpoints: best {ck.best_model_path or '-'} | last {ck.last_model_path}")
    lines.append(f"logs and config: {out_dir}")
    if sample_tokens and hasattr(dm, "tokens") and hasattr(dm.tokenizer, "decode"):
        lines.append("sample: " + repr(_sample(task, dm, sample_tokens)))
    print("\n".join(lines), flush=True)


def _sample(task: LMTask, dm, n: int) -> str:
    valid = dm.tokens("valid")
    prompt = torch.as_tensor(valid[:16].astype("int64"))[None].to(task.device)
    g = torch.Generator(device=task.device).manual_seed(0)
    out = task.model.generate(prompt, n, temperature=0.8, top_k=50, generator=g)
    return dm.tokenizer.decode(out[0].tolist())


def load_task(ckpt_path: str) -> tuple[LMTask, dict]:
    """Rebuild an :class:`LMTask` from a checkpoint without Hydra (``weights_only`` load)."""
    ckpt = safe_load(ckpt_path)
    task = LMTask(**checkpoint_hparams(ckpt, ckpt_path))
    load_weights(task, ckpt[STATE_DICT], ckpt_path)
    return task, ckpt


def evaluate(cfg: DictConfig) -> dict[str, float]:
    """Loss / ppl / bpc of a checkpoint on one split (``eval.yaml``)."""
    plain = _plain(cfg)
    if plain.get("split") not in ("valid", "test"):
        raise ConfigError("split", f"unknown split {plain.get('split')!r}", ["valid", "test"])
    task, _ = load_task(plain["ckpt_path"])
    data = dict(task.hparams.data or {})
    if not data:
        raise CheckpointError(f"{plain['ckpt_path']} does not record its data config; cannot rebuild the test split")
    for key in ("batch_size", "seq_len"):
        if plain.get(key) is not None:
            data[f"eval_{key}"] = plain[key]
    if plain.get("data"):
        data.update(plain["data"])
    dm = build_datamodule(data, task.hparams.tokenizer_state)
    dm.setup("test")
    trainer = L.Trainer(
        accelerator="cpu" if not torch.cuda.is_available() else "auto",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        use_distributed_sampler=False,
        enable_progress_bar=True,
    )
    loader = dm.test_dataloader() if plain["split"] == "test" else dm.val_dataloader()
    trainer.test(task, dataloaders=loader, verbose=False)
    metrics = {k.replace("test/", f"{plain['split']}/"): float(v) for k, v in trainer.callback_metrics.items()}
    unit = task.hparams.unit
    print(f"checkpoint: {plain['ckpt_path']}")
    for k, v in sorted(metrics.items()):
        print(f"{k}: {v:.4f}" + (f"  ({BIT_UNITS[unit]})" if k.endswith("/bpc") and unit in BIT_UNITS else ""))
    return metrics

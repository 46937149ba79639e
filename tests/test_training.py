"""The training loop end to end: configs, resume, checkpoints, bad input, DDP."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import ROOT, SHARED_DATA, TINY, compose_train
from xvariants.config_errors import ConfigError
from xvariants.loading import CheckpointError, safe_load

CONFIGS = ROOT / "configs"


def run_train(tmp_path, *overrides):
    from xvariants.training.run import train

    cfg = compose_train([*TINY, *overrides], tmp_path)
    return train(cfg), Path(cfg.paths.output_dir)


def train_losses(run_dir: Path) -> dict[int, float]:
    rows = csv.DictReader(open(run_dir / "csv" / "metrics.csv"))
    return {int(r["step"]): float(r["train/loss"]) for r in rows if r.get("train/loss")}


def small_text(tiny_text) -> list[str]:
    return ["data=text", f"data.corpus.path={tiny_text}", "data.seq_len=32", "data.batch_size=4",
            "data.eval_batch_size=4", "model.d_model=32", "model.n_layers=2", "model.n_heads=2", "model.d_ff=64"]


def test_default_run_trains_checkpoints_and_records_metadata(tmp_path):
    metrics, out = run_train(tmp_path, "data.batch_size=4", "data.seq_len=32", "data.eval_batch_size=4")
    assert metrics["val/loss"] > 0 and "val/bpc" in metrics
    assert (out / "checkpoints" / "last.ckpt").exists() and (out / "checkpoints" / "best.ckpt").exists()
    meta = json.loads((out / "run_meta.json").read_text())
    assert meta["python_version"] == sys.version and meta["data"]["corpus"] == "stdlib"
    assert json.loads((out / "tokenizer.json").read_text())["name"] == "byte"
    ckpt = safe_load(out / "checkpoints" / "last.ckpt")
    assert ckpt["hyper_parameters"]["tokenizer_state"]["name"] == "byte"
    assert ckpt["hyper_parameters"]["data_meta"]["python_version"] == sys.version


def _available(data_cfg: str) -> str | None:
    """Why a data config cannot run here (None when it can)."""
    needs = {"shakespeare": SHARED_DATA / "tinyshakespeare.txt", "ptb": SHARED_DATA / "ptb" / "ptb.train.txt"}
    for key, path in needs.items():
        if data_cfg.startswith(key) and not path.exists():
            return f"{path} not present"
    if data_cfg.split("_")[0] in ("enwik8", "text8", "wikitext103"):
        return f"{data_cfg}: corpus not available offline (download code is tested in test_data_downloads)"
    return None


@pytest.mark.parametrize("name", sorted(p.stem for p in (CONFIGS / "data").glob("*.yaml")))
def test_every_data_config_composes_and_runs(tmp_path, tiny_text, name):
    extra = [f"data.corpus.path={tiny_text}"] if name == "text" else []
    is_corpus = "corpus" in compose_train([f"data={name}", *extra], tmp_path).data
    if not is_corpus:  # generated tasks (synthetic_*): no corpus and no tokenizer to train
        extra += ["data.batch_size=2", "data.eval_batch_size=2"]
    cfg = compose_train([f"data={name}", *extra], tmp_path)
    assert cfg.data._target_
    reason = _available(name)
    if reason:
        pytest.skip(reason)
    if is_corpus:
        extra += ["data.batch_size=2", "data.seq_len=16", "data.eval_batch_size=2"]
        if name not in ("text", "stdlib_byte"):
            extra.append("+data.corpus.download=false")
    metrics, _ = run_train(tmp_path, f"data={name}", *extra)
    assert metrics["val/loss"] > 0


EXPERIMENTS = sorted(p.stem for p in (CONFIGS / "experiment").glob("*.yaml"))


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_experiment_composes(tmp_path, name):
    cfg = compose_train([f"experiment={name}"], tmp_path)
    from xvariants.training.validate import validate_train_config
    from omegaconf import OmegaConf

    plain = OmegaConf.to_container(cfg, resolve=True)
    validate_train_config(plain)


@pytest.mark.slow
@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_experiment_runs_a_few_steps(tmp_path, tiny_text, name):
    cfg = compose_train([f"experiment={name}"], tmp_path)
    overrides = [f"experiment={name}", "trainer.max_steps=2", "trainer.val_check_interval=1", "trainer.limit_val_batches=1"]
    corpus = cfg.data.corpus.get("name") if "corpus" in cfg.data else None
    if corpus and _available(str(corpus)) is not None:
        # the corpus is not here: same model and loop, on a small local text
        overrides += ["data.corpus.name=text", f"+data.corpus.path={tiny_text}", "~data.corpus.data_dir"]
        if cfg.model.get("adaptive_cutoffs"):  # a small local text has far fewer words than the cutoffs
            overrides += ["model.adaptive_cutoffs=null", "model.tie_projs=null", "model.div_val=1", "model.d_embed=null"]
    if "batch_size" in cfg.data:
        overrides += ["data.batch_size=2", "data.eval_batch_size=2"]
    metrics, _ = run_train(tmp_path, *overrides)
    assert any(k.startswith("val/") for k in metrics)


def test_resume_mid_epoch_gives_the_same_next_losses(tmp_path, tiny_text):
    base = [*small_text(tiny_text), "trainer.max_steps=8", "trainer.val_check_interval=100", "data.batches_per_epoch=50",
            "callbacks.model_checkpoint.every_n_train_steps=4", "callbacks.model_checkpoint.save_top_k=-1",
            "callbacks.model_checkpoint.filename='step{step}'", "callbacks.model_checkpoint.monitor=null", "model.dropout=0.1"]
    _, straight = run_train(tmp_path / "a", *base)
    full = train_losses(straight)
    ckpt = straight / "checkpoints" / "step4.ckpt"
    assert ckpt.exists(), sorted(p.name for p in (straight / "checkpoints").iterdir())
    # the resumed run only has the checkpoint: weights, optimizer, scheduler, step, data position
    _, resumed = run_train(tmp_path / "b", *base, f"ckpt_path={ckpt}")
    again = train_losses(resumed)
    later = [s for s in full if s >= 4]
    assert later and all(s in again for s in later)
    for s in later:
        assert again[s] == pytest.approx(full[s], abs=1e-6), (s, again[s], full[s])


def test_resume_refuses_a_checkpoint_of_another_model(tmp_path, tiny_text):
    _, out = run_train(tmp_path / "a", *small_text(tiny_text))
    with pytest.raises(CheckpointError, match="model.n_layers"):
        run_train(tmp_path / "b", *small_text(tiny_text), "model.n_layers=3", f"ckpt_path={out}/checkpoints/last.ckpt")


@pytest.mark.parametrize(
    "override, field",
    [
        ("model.n_heads=3", "model.n_heads"),
        ("tokenizer.name=sentencepiece", "tokenizer.name"),
        ("data.seq_len=-5", "data.seq_len"),
        ("data=text", "data.corpus.path"),
        ("model.dropout=1.5", "model.dropout"),
        ("optim.lr=0", "optim.lr"),
        ("+model.n_layer=3", "model.n_layer"),
        ("data.batching=shuffled", "data.batching"),
    ],
)
def test_bad_configs_fail_before_training_and_name_the_field(tmp_path, override, field):
    extra = ["+data.corpus.path=/nonexistent/corpus.txt"] if override == "data=text" else []
    from xvariants.training.run import train

    try:
        cfg = compose_train([*TINY, override, *extra], tmp_path)
    except Exception:
        pytest.fail(f"{override} should compose and be rejected by validation")
    with pytest.raises(ConfigError) as e:
        train(cfg)
    assert field in str(e.value)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_train_py_reports_config_errors_in_one_line(tmp_path):
    env = dict(os.environ, XVARIANTS_ROOT=str(ROOT))
    r = subprocess.run([sys.executable, "train.py", "model.n_heads=3", f"hydra.run.dir={tmp_path}"],
                       cwd=ROOT, capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 2
    assert "error: model.n_heads: d_model=128 is not divisible by n_heads=3" in r.stderr
    assert "Traceback" not in r.stderr
    r = subprocess.run([sys.executable, "train.py", "experiment=no_such_experiment", f"hydra.run.dir={tmp_path}"],
                       cwd=ROOT, capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode != 0 and "no_such_experiment" in r.stderr and "shakespeare_char_cpu" in r.stderr


class _Payload:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_checkpoint_with_pickle_payload_is_refused_never_executed(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": _Payload(str(marker))}, evil)
    with pytest.raises(CheckpointError, match="refusing to load"):
        safe_load(evil)
    assert not marker.exists()
    env = dict(os.environ, XVARIANTS_ROOT=str(ROOT))
    r = subprocess.run([sys.executable, "eval.py", f"ckpt_path={evil}", f"hydra.run.dir={tmp_path}/e"],
                       cwd=ROOT, capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 2 and "refusing to load" in r.stderr
    assert not marker.exists()


def test_checkpoint_errors_are_clear(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        safe_load(tmp_path / "missing.ckpt")
    (tmp_path / "garbage.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError):
        safe_load(tmp_path / "garbage.ckpt")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.ckpt")
    with pytest.raises(CheckpointError, match="not an xvariants"):
        safe_load(tmp_path / "other.ckpt")


def test_atomic_save_keeps_the_old_file_when_interrupted(tmp_path, monkeypatch):
    from xvariants import loading as ck

    path = tmp_path / "last.ckpt"
    ck.atomic_torch_save({"state_dict": {"a": torch.ones(1)}}, path)

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(ck.torch, "save", boom)
    with pytest.raises(KeyboardInterrupt):
        ck.atomic_torch_save({"state_dict": {"a": torch.zeros(1)}}, path)
    assert safe_load(path)["state_dict"]["a"].item() == 1.0
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


def test_eval_py_reports_test_metrics_of_a_checkpoint(tmp_path, tiny_text):
    _, out = run_train(tmp_path / "a", *small_text(tiny_text))
    env = dict(os.environ, XVARIANTS_ROOT=str(ROOT))
    r = subprocess.run([sys.executable, "eval.py", f"ckpt_path={out}/checkpoints/last.ckpt", f"hydra.run.dir={tmp_path}/e"],
                       cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "test/loss" in r.stdout and "test/bpc" in r.stdout and "bits per byte" in r.stdout


def test_ddp_two_cpu_processes_train_on_their_own_streams(tmp_path, tiny_text):
    probe = tmp_path / "probe"
    env = dict(os.environ, XVARIANTS_ROOT=str(ROOT), PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "train.py", "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2",
           *small_text(tiny_text), "data.batching=ordered", *TINY[:3], "trainer.accelerator=cpu",
           "trainer.devices=2", "optim.warmup_steps=1", "sample_tokens=0", "trainer.enable_progress_bar=false",
           "+callbacks.probe._target_=tests.helpers.BatchProbe", f"+callbacks.probe.out_dir={probe}",
           f"hydra.run.dir={tmp_path}/run", f"paths.cache_dir={tmp_path}/cache"]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    files = sorted(probe.glob("rank*.json"))
    assert [f.name[:5] for f in files] == ["rank0", "rank1"]
    r0, r1 = (json.loads(f.read_text()) for f in files)
    assert len(r0) == len(r1) == 4
    # each rank reads its own streams: different text, and each stream continues itself
    assert r0[0]["first_tokens"] != r1[0]["first_tokens"]
    for recs in (r0, r1):
        for a, b in zip(recs, recs[1:]):
            assert b["index"] == a["index"] + 1
            assert b["first_tokens"] == a["next_tokens"]


def test_weight_decay_hits_matrices_and_embeddings_only():
    from xvariants.models import build_language_model
    from xvariants.training.optim import param_groups

    model = build_language_model({"body": "vanilla", "d_model": 16, "n_layers": 1, "n_heads": 2, "max_len": 8}, 11)
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert {"embed.tok.weight", "embed.pos.weight", "body.blocks.0.attn.qkv.weight"} <= decayed
    assert not any(n.endswith("bias") or ".ln" in n for n in decayed)  # biases and LayerNorms are not decayed
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_validation_uses_the_experiments_eval_memory_and_restores_training_lengths():
    from xvariants.training.module import LMTask
    from xvariants.training.run import validation_lengths

    xl = {"body": "xl", "d_model": 16, "n_layers": 1, "n_heads": 2, "mem_len": 4}
    optim = {"lr": 1e-3}
    assert validation_lengths({"seq_len": 80, "mem_len": 2100}) is None  # eval.py's lengths, not validation's
    task = LMTask(model=xl, vocab_size=11, optim=optim, val_lengths=validation_lengths({"val_mem_len": 9}))
    body = task.model.body
    task.on_validation_epoch_start()
    assert body.mem_len == 9
    task.on_validation_epoch_end()
    assert body.mem_len == 4
    with pytest.raises(ConfigError, match="eval.val_mem_len"):
        validation_lengths({"val_mem_len": -1})
    vanilla = {"body": "vanilla", "d_model": 16, "n_layers": 1, "n_heads": 2, "max_len": 8}
    with pytest.raises(ConfigError, match="eval.val_mem_len"):
        LMTask(model=vanilla, vocab_size=11, optim=optim, val_lengths={"mem_len": 9})


GROUP_OPTIONS = [
    (group, p.stem)
    for group in ("model", "logger", "debug", "callbacks", "tokenizer", "trainer")
    for p in sorted((CONFIGS / group).glob("*.yaml"))
]


@pytest.mark.slow
@pytest.mark.parametrize("group, name", GROUP_OPTIONS, ids=[f"{g}={n}" for g, n in GROUP_OPTIONS])
def test_every_config_of_every_group_composes_and_runs(tmp_path, tiny_text, group, name):
    """Each option of each config group, on top of the defaults, trains a few steps."""
    from xvariants.training.run import train

    overrides = [o for o in TINY if not o.startswith(f"{group}=")] + [
        f"{group}={name}", "data=text", f"data.corpus.path={tiny_text}", "data.seq_len=16",
        "data.batch_size=2", "data.eval_batch_size=2", "model.d_model=32", "model.n_heads=2", "model.d_ff=64",
    ]
    if group == "model" and "xl" in name:
        overrides.append("data.batching=ordered")  # segment memory reads consecutive windows of each stream
    if group == "trainer" and name in ("gpu", "ddp"):
        overrides = [o for o in overrides if not o.startswith(("trainer.accelerator", "trainer.devices"))]
    cfg = compose_train(overrides, tmp_path)
    if group == "trainer" and name == "gpu" and not torch.cuda.is_available():
        pytest.skip("trainer=gpu composes; running it needs a CUDA device")
    if group == "trainer" and name == "ddp":
        pytest.skip("trainer=ddp composes; test_ddp_two_cpu_processes_train_on_their_own_streams runs it")
    metrics = train(cfg)
    assert metrics.get("val/loss", 0) > 0 or metrics.get("train/loss", 0) > 0, metrics

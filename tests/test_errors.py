"""One error path for train.py, eval.py and the interpret CLI (xvariants/errors.py): a user
error ends as one ``error:`` message naming the field or path, exit status 2, no traceback."""

from __future__ import annotations

import errno
import importlib.util
import logging
import os
import subprocess
import sys
import types
from pathlib import Path

import lightning.pytorch  # noqa: F401 - its log handlers bind to the session's stdout, not one test's
import pytest
import torch

from tests.conftest import ROOT, TINY, compose_train
from xvariants.config_errors import ConfigError
from xvariants.errors import describe, report
from xvariants.interpret.cli import main as interpret_main
from xvariants.loading import atomic_torch_save, model_differences, safe_load

SMALL = ["data.seq_len=16", "data.batch_size=2", "data.eval_batch_size=2", "model.d_model=16", "model.n_layers=1",
         "model.n_heads=4", "model.d_ff=32"]


def _script(name: str):
    spec = importlib.util.spec_from_file_location(f"{name}_script", ROOT / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def entry(name: str, args: list[str], tmp_path: Path, monkeypatch, capsys) -> tuple[int, str]:
    """Run train.py / eval.py in this process (a subprocess would import torch again: seconds);
    returns (exit status, stderr)."""
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    monkeypatch.delenv("XVARIANTS_DEBUG", raising=False)
    argv = [f"{name}.py", *args]
    if not any(a.startswith("hydra.run.dir=") for a in args):
        argv.append(f"hydra.run.dir={tmp_path}/run")
    monkeypatch.setattr(sys, "argv", argv)
    root, handlers, level = logging.getLogger(), logging.getLogger().handlers[:], logging.getLogger().level
    try:
        with pytest.raises(SystemExit) as e:
            _script(name).main()
    finally:  # Hydra's handlers write to this test's captured streams: do not leave them behind
        for handler in root.handlers:
            if handler not in handlers:
                handler.close()
        root.handlers[:] = handlers
        root.setLevel(level)
    err = capsys.readouterr().err
    assert "Traceback" not in err and "Error executing job" not in err, err
    return e.value.code, err


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    import inspect
    import json

    p = tmp_path_factory.mktemp("corpus") / "tiny.txt"
    p.write_text(inspect.getsource(json) * 3)
    return p


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, corpus) -> Path:
    """A 4-head vanilla checkpoint that records its data config (eval.py can rebuild it)."""
    from xvariants.loading import build_datamodule
    from xvariants.training.module import LMTask

    d = tmp_path_factory.mktemp("ckpt")
    data = {"_target_": "xvariants.data.LMDataModule", "tokenizer": {"name": "byte"},
            "corpus": {"name": "text", "path": str(corpus)}, "batch_size": 2, "seq_len": 16, "eval_batch_size": 2,
            "batching": "ordered", "cache_dir": str(d / "cache"), "seed": 0, "num_workers": 0}
    dm = build_datamodule(data)
    dm.setup("fit")
    model = {"body": "vanilla", "d_model": 16, "n_layers": 1, "n_heads": 4, "d_ff": 32, "dropout": 0.0}
    torch.manual_seed(0)
    task = LMTask(model=model, vocab_size=dm.vocab_size, optim={"lr": 1e-3}, tokenizer_state=dm.tokenizer.to_dict(),
                  data_meta=dm.meta, unit=dm.unit, data=data)
    path = d / "last.ckpt"
    torch.save({"state_dict": task.state_dict(), "hyper_parameters": dict(task.hparams)}, path)
    return path


@pytest.fixture
def text_file(tmp_path) -> Path:
    p = tmp_path / "notes.txt"
    p.write_text("hello, this is not a checkpoint\n")
    return p


# ---------------------------------------------------------------------- the shared path
def test_describe_names_the_path_of_filesystem_errors():
    assert describe(OSError(errno.ENOSPC, "No space left on device", "/r/last.ckpt")) == "No space left on device: /r/last.ckpt"
    assert describe(FileNotFoundError("corpus file not found: /x")) == "corpus file not found: /x"
    assert describe(ConfigError("optim.lr", "must be a number, got 'abc'")) == "optim.lr: must be a number, got 'abc'"
    assert describe(KeyError("bug")) is None and describe(TypeError("bug")) is None


def test_a_bug_keeps_its_traceback_and_debug_shows_user_errors(monkeypatch):
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    monkeypatch.delenv("XVARIANTS_DEBUG", raising=False)
    with pytest.raises(KeyError):
        report(KeyError("bug"))
    assert report(ConfigError("seed", "must be an integer")) == 2
    monkeypatch.setenv("XVARIANTS_DEBUG", "1")
    with pytest.raises(ConfigError):
        report(ConfigError("seed", "must be an integer"))


# ---------------------------------------------------------------------- config and data
@pytest.mark.parametrize(
    "override, message",
    [
        ("optim.lr=abc", "error: optim.lr: must be a number, got 'abc'"),
        ("model.dropout=abc", "error: model.dropout: must be a number, got 'abc'"),
        ("seed=abc", "error: seed: must be an integer, got 'abc'"),
        ("resume_on_new_data=maybe", "error: resume_on_new_data: must be true or false, got 'maybe'"),
    ],
)
def test_types_are_checked_before_values(override, message, tmp_path, monkeypatch, capsys):
    code, err = entry("train", [override], tmp_path, monkeypatch, capsys)
    assert code == 2 and err.strip().splitlines()[-1] == message


def test_explicit_files_mode_trains(tmp_path, corpus):
    from xvariants.training.run import train

    cfg = compose_train([*TINY, *SMALL, "trainer.max_steps=2", "data=text", f"data.corpus.train_file={corpus}",
                         f"data.corpus.valid_file={corpus}"], tmp_path)
    metrics = train(cfg)
    assert "val/loss" in metrics


def test_corpus_path_and_explicit_files_together(tmp_path, corpus, monkeypatch, capsys):
    code, err = entry("train", ["data=text", f"data.corpus.path={corpus}", f"data.corpus.train_file={corpus}"],
                      tmp_path, monkeypatch, capsys)
    assert code == 2
    assert err.strip().splitlines()[-1].startswith("error: data.corpus.path: given together with data.corpus.train_file")


@pytest.mark.parametrize("key", ["path", "train_file"])
def test_a_corpus_that_is_not_a_regular_file(key, tmp_path, corpus, monkeypatch, capsys):
    extra = [f"data.corpus.valid_file={corpus}"] if key == "train_file" else []
    code, err = entry("train", ["data=text", f"data.corpus.{key}=/dev/null", *extra], tmp_path, monkeypatch, capsys)
    kind = "not a regular file or folder" if key == "path" else "not a regular file"
    assert code == 2 and err.strip().splitlines()[-1] == f"error: data.corpus.{key}: {kind}: /dev/null"


def test_a_corpus_option_is_named_by_its_config_path(tmp_path, monkeypatch, capsys):
    code, err = entry("train", ["data=facts_tiny", "data.corpus.mentions=0"], tmp_path, monkeypatch, capsys)
    assert code == 2 and err.strip().splitlines()[-1] == "error: data.corpus.mentions: must be an integer >= 1, got 0"


def test_corpus_loader_says_what_is_wrong_with_dev_null():
    from xvariants.data.corpora import load_corpus
    from xvariants.config_errors import DataError

    with pytest.raises(DataError, match="not a regular file or folder: /dev/null"):
        load_corpus("text", path="/dev/null")
    with pytest.raises(DataError, match="not both"):
        load_corpus("text", path="/dev/null", train_file="/dev/null")


# ---------------------------------------------------------------------- checkpoints
@pytest.mark.parametrize("script", ["train", "eval"])
def test_a_text_file_as_checkpoint(script, text_file, tmp_path, monkeypatch, capsys):
    code, err = entry(script, [f"ckpt_path={text_file}"], tmp_path, monkeypatch, capsys)
    assert code == 2
    assert err.strip().splitlines()[-1].startswith(f"error: cannot read checkpoint {text_file}: it is not a PyTorch checkpoint")


def test_eval_on_settings_that_do_not_match_the_weights(ckpt, tmp_path, monkeypatch, capsys):
    raw = torch.load(ckpt, weights_only=True)
    raw["hyper_parameters"]["model"]["d_model"] = 32
    bad = tmp_path / "mismatch.ckpt"
    torch.save(raw, bad)
    code, err = entry("eval", [f"ckpt_path={bad}"], tmp_path, monkeypatch, capsys)
    assert code == 2
    assert f"error: {bad}: weights do not match the model its stored settings describe" in err
    assert "in the file" in err and "from the settings" in err


def test_different_model_message_puts_the_body_first_and_stays_short():
    stored = {"body": "vanilla", "d_model": 128, "n_layers": 4, "n_heads": 4, "d_ff": 512, "dropout": 0.0,
              "attn_dropout": None, "activation": "gelu", "bias": True, "init_std": 0.02, "rotary": False,
              "rotary_base": 10000.0, "rotary_fraction": 1.0, "positions": "learned", "max_len": 256}
    config = {"body": "xl", "d_model": 128, "n_layers": 4, "n_heads": 4, "d_head": 32, "d_ff": 512, "dropout": 0.1,
              "attn_dropout": 0.0, "mem_len": 128, "clamp_len": -1, "same_length": False, "untie_r": False,
              "positions": "none", "init_std": 0.02, "layer_norm_eps": 1e-5}
    text = model_differences(stored, config)
    assert text.startswith("model.body: checkpoint 'vanilla' vs config 'xl'; model.d_head")
    assert len(text) < 400


class _Payload:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_interpret_cli_reports_checkpoint_errors(text_file, tmp_path, capsys):
    cases = {
        str(tmp_path / "missing.ckpt"): "checkpoint not found",
        str(text_file): "it is not a PyTorch checkpoint",
    }
    truncated = tmp_path / "truncated.ckpt"
    torch.save({"state_dict": {"a": torch.zeros(1000)}}, truncated)
    truncated.write_bytes(truncated.read_bytes()[:300])
    cases[str(truncated)] = "cannot read checkpoint"
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": _Payload(str(marker))}, evil)
    cases[str(evil)] = "refusing to load"
    for path, message in cases.items():
        assert interpret_main(["flow", f"ckpt_path={path}", "text=abc", f"out_dir={tmp_path}/o"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and "Traceback" not in err
    assert not marker.exists()


@pytest.mark.parametrize(
    "option, message",
    [
        ("heads=7", "heads: vanilla_ckpt has 4 heads per layer, numbered 0..3; got 7"),
        ("heads=1,x", "heads: expected all or comma-separated head numbers"),
        ("tau=abc", "tau: expected a number, got 'abc'"),
        ("alpha=nan", "alpha: expected a finite number"),
        ("token=999", "token: position 999 is outside the text's 3 tokens"),
        ("direction=sideways", "direction: expected backward or forward, got 'sideways'"),
        ("merge=max", "merge: expected any or mean, got 'max'"),
        ("maxflow=perhaps", "maxflow: expected true or false, got 'perhaps'"),
        ("segment_len=-1", "segment_len: expected a positive integer"),
    ],
)
def test_interpret_cli_refuses_bad_values(option, message, ckpt, tmp_path, capsys):
    rc = interpret_main(["flow", f"ckpt_path={ckpt}", "text=abc", option, "name=vanilla_ckpt", f"out_dir={tmp_path}/o"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: ") and message in err, err
    assert not (tmp_path / "o" / "flow.json").exists()


def test_interpret_module_exits_2_without_traceback(text_file, tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("HYDRA_FULL_ERROR", "XVARIANTS_DEBUG")}
    r = subprocess.run([sys.executable, "-m", "xvariants.interpret", "flow", f"ckpt_path={text_file}", "text=abc"],
                       cwd=ROOT, capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr and r.stderr.startswith("error: cannot read checkpoint")


# ---------------------------------------------------------------------- filesystem
def test_unwritable_run_folder(text_file, tmp_path, monkeypatch, capsys):
    """A file where the run folder should be: Hydra's own folder creation fails, reported the same way."""
    run_dir = text_file / "run"
    code, err = entry("train", [f"hydra.run.dir={run_dir}"], tmp_path, monkeypatch, capsys)
    assert code == 2 and err.strip().splitlines()[-1] == f"error: Not a directory: {run_dir}"


def test_unwritable_token_cache(text_file, tmp_path, monkeypatch, capsys):
    code, err = entry("train", [f"paths.cache_dir={text_file}/cache"], tmp_path, monkeypatch, capsys)
    last = err.strip().splitlines()[-1]
    assert code == 2 and last.startswith("error: Not a directory: ") and str(text_file) in last


def _refuses_new_files(folder: Path) -> bool:
    try:
        (folder / ".xvariants-probe").write_text("x")
    except OSError:
        return True
    (folder / ".xvariants-probe").unlink()
    return False


def test_read_only_checkpoint_folder(tmp_path):
    """A folder the process may not write in: chmod stops a normal user but not root, for whom
    /sys (which refuses new entries) stands in."""
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        if not _refuses_new_files(folder):
            folder = Path("/sys")
            if not folder.is_dir() or not _refuses_new_files(folder):
                pytest.skip("no folder here refuses this process's writes (root, and /sys writable)")
        target = folder / "last.ckpt"
        with pytest.raises(OSError) as e:
            atomic_torch_save({"state_dict": {}}, target)
        message = describe(e.value)
        assert message.split(": ")[0] in ("Permission denied", "Operation not permitted", "Read-only file system")
        assert message.endswith(f": {target}")
    finally:
        (tmp_path / "ro").chmod(0o700)


def test_checkpoint_folder_under_a_file(text_file):
    with pytest.raises(OSError) as e:
        atomic_torch_save({"state_dict": {}}, text_file / "checkpoints" / "last.ckpt")
    assert describe(e.value) == f"Not a directory: {text_file / 'checkpoints'}"


class _FullDisk:
    """A file object that accepts ``room`` bytes, then fails like a full disk."""

    def __init__(self, f, room: int):
        self.f, self.room = f, room

    def write(self, data) -> int:
        if len(data) > self.room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= len(data)
        return self.f.write(data)

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


def fill_the_disk(monkeypatch, room: int = 512) -> None:
    """Checkpoint files (and only they: not the token cache) get ``room`` bytes."""
    from xvariants import loading

    fake_torch = types.ModuleType("torch")
    fake_torch.__dict__.update(torch.__dict__)
    fake_torch.save = lambda obj, f: torch.save(obj, _FullDisk(f, room))
    monkeypatch.setattr(loading, "torch", fake_torch)


def test_disk_full_during_save_keeps_the_earlier_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "checkpoints" / "last.ckpt"
    atomic_torch_save({"state_dict": {"w": torch.ones(4)}}, path)
    fill_the_disk(monkeypatch)
    with pytest.raises(OSError) as e:
        atomic_torch_save({"state_dict": {"w": torch.zeros(4096)}}, path)
    assert describe(e.value) == f"No space left on device: {path}"
    assert safe_load(path)["state_dict"]["w"].tolist() == [1.0] * 4
    assert [p.name for p in path.parent.iterdir()] == ["last.ckpt"]


def test_disk_full_during_training_is_one_line(tmp_path, corpus, monkeypatch, capsys):
    fill_the_disk(monkeypatch)
    args = [*TINY, *SMALL, "trainer.max_steps=2", "data=text", f"data.corpus.path={corpus}",
            f"paths.cache_dir={tmp_path}/cache"]
    code, err = entry("train", args, tmp_path, monkeypatch, capsys)
    last = err.strip().splitlines()[-1]
    assert code == 2 and last.startswith("error: No space left on device: ") and last.endswith(".ckpt")

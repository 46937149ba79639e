"""A run's records across resumes: metrics kept when resuming into the same folder, "best" never
another folder's, temporary files of killed saves removed, a corpus change refused."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from tests.conftest import TINY, compose_train
from xvariants.config_errors import ConfigError
from xvariants.loading import ATOMIC_TEMP_NAME, atomic_torch_save, remove_stale_temp_files, safe_load


def _run(tmp_path, *overrides):
    from xvariants.training.run import train

    cfg = compose_train([*TINY, *overrides], tmp_path)
    return train(cfg), Path(cfg.paths.output_dir)


def _small(text: Path, *extra: str) -> list[str]:
    return ["data=text", f"data.corpus.path={text}", "data.seq_len=16", "data.batch_size=2", "data.eval_batch_size=2",
            "model.d_model=16", "model.n_layers=1", "model.n_heads=2", "model.d_ff=32", *extra]


def _rows(run_dir: Path) -> list[dict]:
    with open(run_dir / "csv" / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_resume_into_the_original_folder_keeps_every_metrics_row(tmp_path, tiny_text, one_thread):
    _, out = _run(tmp_path, *_small(tiny_text))
    before = _rows(out)
    assert before and max(int(r["step"]) for r in before) == 3
    ckpts = out / "checkpoints"
    stale = ckpts / ".last.ckpt.k3j_x9a2.tmp"  # what a save killed with kill -9 leaves
    stale.write_bytes(b"half a checkpoint")
    others = [ckpts / "notes.tmp", ckpts / ".last.ckpt.tmp", ckpts / "last.ckpt.k3j_x9a2.tmp"]
    for p in others:
        p.write_text("not the atomic writer's")

    _, again = _run(tmp_path, *_small(tiny_text), "trainer.max_steps=6", f"ckpt_path={ckpts / 'last.ckpt'}")
    assert again == out
    after = _rows(out)
    # every earlier row is still there, first and unchanged; the resumed run's rows follow
    assert [{k: a[k] for k in b} for a, b in zip(after, before)] == before
    assert {int(r["step"]) for r in after[len(before):]} >= {4, 5}
    assert not stale.exists() and all(p.exists() for p in others)
    # the first start's config is kept beside the resumed run's
    assert "ckpt_path: null" in (out / "config.1.yaml").read_text()
    assert "last.ckpt" in (out / "config.yaml").read_text()


def test_stale_temp_pattern_is_the_atomic_writers(tmp_path, monkeypatch):
    from xvariants import atomic

    names = []
    real_mkstemp = atomic.tempfile.mkstemp

    def mkstemp(*args, **kwargs):
        fd, name = real_mkstemp(*args, **kwargs)
        names.append(Path(name).name)
        return fd, name

    monkeypatch.setattr(atomic.tempfile, "mkstemp", mkstemp)
    atomic_torch_save({"state_dict": {}}, tmp_path / "last.ckpt")
    assert names and ATOMIC_TEMP_NAME.fullmatch(names[0]), names
    (tmp_path / names[0]).write_bytes(b"left by a kill -9")
    assert remove_stale_temp_files(tmp_path) == [tmp_path / names[0]]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]


def test_resume_into_a_new_folder_never_uses_the_old_best(tmp_path, tiny_text, capsys, one_thread):
    _, old = _run(tmp_path / "a", *_small(tiny_text))
    old_best = old / "checkpoints" / "best.ckpt"
    assert old_best.exists()
    last = old / "checkpoints" / "last.ckpt"
    capsys.readouterr()

    # resumed at its last step: no validation here, so no best of this folder; the final weights are tested
    metrics, _ = _run(tmp_path / "b", *_small(tiny_text), "test=true", f"ckpt_path={last}")
    out = capsys.readouterr().out
    assert "test/loss" in metrics
    assert str(old_best) not in out and "tested: final weights of this run" in out

    # a resumed run that validates has a best of its own, in its own folder
    _, new = _run(tmp_path / "c", *_small(tiny_text), "trainer.max_steps=6", "test=true", f"ckpt_path={last}")
    out = capsys.readouterr().out
    assert str(old_best) not in out
    assert f"tested: best checkpoint of this run folder, {new / 'checkpoints' / 'best.ckpt'}" in out


def test_a_corpus_change_on_resume_is_refused_unless_asked(tmp_path, tiny_text, one_thread):
    _, first = _run(tmp_path / "a", *_small(tiny_text, "tokenizer=char"))
    last = first / "checkpoints" / "last.ckpt"
    other = tmp_path / "other.txt"
    other.write_text(tiny_text.read_text().upper().replace("E", "é") + "¿ünïcödé?\n" * 50)

    with pytest.raises(ConfigError, match=r"^data: corpus text") as err:
        _run(tmp_path / "b", *_small(other, "tokenizer=char"), f"ckpt_path={last}")
    message = str(err.value)
    assert str(last) in message and str(other.resolve()) in message and "resume_on_new_data=true" in message
    assert "outside the checkpoint's vocabulary" in message

    # continuing is an explicit choice (resumed at its last step: nothing left to train)
    with pytest.warns(UserWarning, match="resume_on_new_data=true: corpus text"):
        _run(tmp_path / "c", *_small(other, "tokenizer=char"), f"ckpt_path={last}", "resume_on_new_data=true")

    # a checkpoint from before fingerprints still resumes, and says it cannot check
    ckpt = safe_load(last)
    del ckpt["hyper_parameters"]["data_meta"]["text_sha256"]
    atomic_torch_save(ckpt, tmp_path / "old.ckpt")
    with pytest.warns(UserWarning, match="records no corpus fingerprint"):
        _run(tmp_path / "d", *_small(tiny_text, "tokenizer=char"), f"ckpt_path={tmp_path / 'old.ckpt'}")


def test_resume_on_new_data_must_be_a_bool():
    from xvariants.training.run import check_resume_data

    with pytest.raises(ConfigError, match="^resume_on_new_data: must be true or false"):
        check_resume_data({}, None, "x.ckpt", "yes")

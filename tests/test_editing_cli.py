"""``python -m xvariants.interpret edit`` and ``edit_eval`` (xvariants/interpret/edit_cli.py,
edit_eval_cli.py, edit_setup.py), run in-process on a tiny checkpoint that learned some facts of
a facts_tiny corpus: an edit changes the prediction, a saved edit loads and predicts the new
object while the original file stays as it was, the tables equal record_metrics/aggregate
called directly, and each bad input ends as one message with exit status 2."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.test_interpret_trace_cli import save_checkpoint
from xvariants.data.corpora.facts import load_facts
from xvariants.data.tokenizers import WordTokenizer
from xvariants.editing import aggregate, key_stats, record_metrics, rome_edit
from xvariants.editing.requests import encode
from xvariants.interpret import edit_cli
from xvariants.interpret.cli import main
from xvariants.interpret.trace_cli import plain
from xvariants.loading import load_model
from xvariants.models import build_language_model

pytestmark = pytest.mark.usefixtures("one_thread")

VANILLA = {"body": "vanilla", "d_model": 32, "n_layers": 3, "n_heads": 2, "d_ff": 64, "dropout": 0.0, "max_len": 32}
#: records whose ROME edit at layer 0 flips this model's greedy object (a model this small knows
#: about half its facts; an edit there flips the greedy word for a quarter of the records)
FLIPS = (41, 26)
CORPUS = {"name": "facts", "seed": 0, "n_subjects": 8, "mentions": 2, "mix": "none"}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A 3-layer vanilla checkpoint trained on the text of an 8-person facts corpus (as a language
    model: ROME needs facts recalled from the subject's tokens), recording its data config (so
    stats=auto can rebuild the training text) and its files."""
    d = tmp_path_factory.mktemp("edit_cli")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # module fixtures start before one_thread
    corpus = load_facts(**{k: v for k, v in CORPUS.items() if k != "name"}, out_dir=d / "facts")
    files = corpus.meta["facts_files"]
    known = json.loads(Path(files["known_facts"]).read_text())
    records = json.loads(Path(files["counterfact"]).read_text())
    prompts = [p for r in records for p in (*r["paraphrase_prompts"], *r["neighborhood_prompts"])]
    tokenizer = WordTokenizer.train("\n".join([corpus.train, *prompts, *(k["prompt"] for k in known)]))
    model = train_lm(tokenizer, corpus.train)
    torch.set_num_threads(threads)
    data = {"_target_": "xvariants.data.LMDataModule", "corpus": {**CORPUS, "out_dir": str(d / "facts")},
            "tokenizer": {"name": "word"}, "batch_size": 4, "seq_len": 32, "eval_batch_size": 4,
            "cache_dir": str(d / "token-cache")}
    ckpt = save_checkpoint(d / "tiny.ckpt", model, VANILLA, tokenizer, {"facts_files": files})
    raw = torch.load(ckpt, weights_only=True)
    raw["hyper_parameters"]["data"] = data
    torch.save(raw, ckpt)
    text = d / "train.txt"
    text.write_text(corpus.train)
    return {"ckpt": ckpt, "tokenizer": tokenizer, "known": known, "records": records, "stats": text, "dir": d}


def train_lm(tokenizer, text: str, steps: int = 200, T: int = 32):
    """Next-token training on every window of ``text``, the windows shifted by one token each step
    (~800 tokens: 25 windows a step, ~4 s on one core)."""
    ids = torch.as_tensor(tokenizer.encode(text), dtype=torch.long)
    torch.manual_seed(0)
    model = build_language_model(dict(VANILLA), tokenizer.vocab_size)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for step in range(steps):
        o = step % T
        n = (len(ids) - 1 - o) // T * T
        logits = model(ids[o : o + n].view(-1, T))
        logits = getattr(logits, "logits", logits)
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), ids[o + 1 : o + 1 + n])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def cli(command: str, *args: str, capsys) -> tuple[int, str, str]:
    rc = main([command, *args])
    out = capsys.readouterr()
    return rc, out.out, out.err


def next_word(model, tokenizer, text: str) -> str:
    ids = torch.tensor([encode(tokenizer, text).ids])
    with torch.no_grad():
        logits = model(ids)
    return tokenizer.decode([int(getattr(logits, "logits", logits)[0, -1].argmax())]).strip()


def request_args(world, record: dict, **extra) -> list[str]:
    rw = record["requested_rewrite"]
    opts = {"ckpt_path": world["ckpt"], "prompt": rw["prompt"], "subject": rw["subject"],
            "target_new": rw["target_new"]["str"], "target_true": rw["target_true"]["str"],
            "stats": world["stats"], "stats_cache": world["dir"] / "cache", "generate": 3, **extra}
    return [f"{k}={v}" for k, v in opts.items()]


# ---------------------------------------------------------------------- edit
def test_edit_changes_the_prediction_and_the_saved_checkpoint_keeps_it(world, tmp_path, capsys):
    record = world["records"][FLIPS[0]]
    rw = record["requested_rewrite"]
    text = rw["prompt"].replace("{}", rw["subject"])
    original = load_model(world["ckpt"])[0].eval()
    assert next_word(original, world["tokenizer"], text) != rw["target_new"]["str"]
    before = sha(world["ckpt"])
    out_ckpt = tmp_path / "edited.ckpt"
    cache = tmp_path / "cache"
    args = request_args(world, record, layer=0, stats="auto", stats_cache=cache, save=out_ckpt)
    rc, out, err = cli("edit", *args, capsys=capsys)
    assert rc == 0, err
    assert f"p({rw['target_new']['str']})" in out and "greedy generations" in out and f"saved: {out_ckpt}" in out
    assert sha(world["ckpt"]) == before  # the original checkpoint is untouched
    edited, _ = load_model(out_ckpt)
    assert next_word(edited.eval(), world["tokenizer"], text) == rw["target_new"]["str"]
    assert torch.load(out_ckpt, weights_only=True)["xvariants_edit"]["target_new"] == rw["target_new"]["str"]
    # stats=auto streamed the checkpoint's own training text, rebuilt from its data config
    files = list(cache.rglob("*.safetensors"))
    assert len(files) == 1 and files[0].parent.name.startswith("facts-train")
    from xvariants.loading import build_datamodule

    raw = torch.load(world["ckpt"], weights_only=True)["hyper_parameters"]
    dm = build_datamodule(raw["data"], raw["tokenizer_state"])
    dm.setup("fit")
    ids = np.array(dm.tokens("train"))
    direct = key_stats(original, 0, ids, corpus="direct", n_tokens=len(ids), seq_len=32)
    cached = key_stats(original, 0, None, corpus=files[0].parent.name, n_tokens=len(ids), seq_len=32, cache_dir=cache)
    assert torch.equal(direct.moment, cached.moment)


def test_edit_report_and_safetensors_hold_the_edited_weights(world, tmp_path, capsys):
    from safetensors.torch import load_file

    record = world["records"][FLIPS[1]]
    rw = record["requested_rewrite"]
    out = tmp_path / "edited.safetensors"
    report = edit_cli.run(edit_cli.parse(request_args(world, record, layer=0, save=out)))
    capsys.readouterr()
    new, true = rw["target_new"]["str"], rw["target_true"]["str"]
    after, before = report["after"]["p"], report["before"]["p"]
    assert after[new] > after[true] and after[new] > before[new]
    model = load_model(world["ckpt"])[0].eval()
    model.load_state_dict(load_file(out))  # strict: every weight, tied ones included
    assert edit_cli.probability(model, world["tokenizer"], rw["prompt"].replace("{}", rw["subject"]), new) == \
        pytest.approx(report["after"]["p"][new], rel=1e-9)
    gen = report["after"]["generations"]
    assert list(gen) == [rw["prompt"].replace("{}", rw["subject"]), f"{rw['subject']} is"]


# ---------------------------------------------------------------------- edit_eval
def test_edit_eval_tables_equal_the_direct_calls(world, tmp_path, capsys):
    out = tmp_path / "tables"
    common = [f"ckpt_path={world['ckpt']}", "n=3", f"stats={world['stats']}", f"stats_cache={world['dir'] / 'cache'}",
              f"out_dir={out}"]
    assert cli("edit_eval", *common, "method=rome", "layer=1", capsys=capsys)[0] == 0
    assert cli("edit_eval", *common, "method=memit", "batch=3", capsys=capsys)[0] == 0
    rome = json.loads((out / "rome.json").read_text())
    memit = json.loads((out / "memit_b3.json").read_text())
    assert "| rome |" in (out / "rome.md").read_text() and (out / "memit_b3.md").is_file()
    records = [world["records"][i * len(world["records"]) // 3] for i in range(3)]
    assert [r["case_id"] for r in rome["records"]] == [r["case_id"] for r in records]
    model, hp = load_model(world["ckpt"])
    model.eval()
    tok = world["tokenizer"]
    stats = key_stats(model, 1, None, corpus=rome["stats"]["cache_name"], n_tokens=rome["stats"]["n_tokens"],
                      seq_len=32, cache_dir=world["dir"] / "cache")
    direct = []
    for r in records:
        with rome_edit(model, tok, r, layer=1, stats=stats):
            direct.append(record_metrics(model, tok, r))
    assert rome["aggregate"] == plain(aggregate(direct))
    assert rome["n_edits"] == 3 and rome["groups"] == [[r["case_id"]] for r in records] and rome["seconds_per_edit"] > 0
    assert memit["n_edits"] == 3 and memit["groups"] == [[r["case_id"] for r in records]]
    # sequential ROME: both edits of a group in place, one on top of the other, when it is evaluated
    assert cli("edit_eval", *common[:1], "n=2", *common[2:], "method=rome", "layer=1", "batch=2", "sequential=true",
               capsys=capsys)[0] == 0
    seq = json.loads((out / "rome_seq_b2.json").read_text())
    pair = [world["records"][i * len(world["records"]) // 2] for i in range(2)]
    with rome_edit(model, tok, pair[0], layer=1, stats=stats), rome_edit(model, tok, pair[1], layer=1, stats=stats):
        both = [record_metrics(model, tok, r) for r in pair]
    assert seq["aggregate"] == plain(aggregate(both)) and seq["groups"] == [[r["case_id"] for r in pair]]
    assert memit["options"]["layers"] == [0, 1] and memit["options"]["lambda"] == pytest.approx(15000 * 64 / 16384)


# ---------------------------------------------------------------------- bad input
BAD = {
    "target_new equals target_true": (["target_new=Rome", "target_true=Rome"], "equals target_true"),
    "subject not in the prompt": (["prompt=Somebody was born in"], "is not in the prompt"),
    "layer out of range": (["layer=5"], "layer 5 is out of range: this model has 3 MLP layers"),
    "statistics too small": (["stats_tokens=40"], "40 keys for d_mlp = 64"),
    "unknown method": (["method=knn"], "method: expected rome, memit, ft"),
    "unknown option": (["lyer=1"], "did you mean layer?"),
    "rome on two layers": (["layers=0,1"], "ROME edits one layer"),
    "lambda without memit": (["lambda=500"], "only MEMIT"),
    "bad save path": (["save=edited.txt"], "save: expected a .ckpt or .safetensors path"),
}


@pytest.mark.parametrize("case", list(BAD), ids=list(BAD))
def test_bad_edit_input_one_message_model_unchanged(world, tmp_path, capsys, case):
    extra, message = BAD[case]
    fact = world["records"][0]
    base = {a.split("=", 1)[0]: a for a in request_args(world, fact, save=tmp_path / "out.ckpt")}
    for a in extra:
        base[a.split("=", 1)[0]] = a
    if case == "subject not in the prompt":
        base["subject"] = "subject=Nobody Atall"
    before = sha(world["ckpt"])
    rc, out, err = cli("edit", *base.values(), capsys=capsys)
    assert rc == 2 and message in err, err
    assert err.startswith("error: ") and err.count("error:") == 1
    assert sha(world["ckpt"]) == before and not (tmp_path / "out.ckpt").exists()


def test_a_target_the_model_already_gives_is_refused(world, capsys):
    model = load_model(world["ckpt"])[0].eval()
    fact = next(k for k in world["known"] if next_word(model, world["tokenizer"], k["prompt"]) == k["answer"])
    rc, _, err = cli("edit", f"ckpt_path={world['ckpt']}", f"prompt={fact['prompt']}", f"subject={fact['subject']}",
                     f"target_new={fact['answer']}", f"stats={world['stats']}", capsys=capsys)
    assert rc == 2 and "is what the model already gives" in err


@pytest.mark.parametrize("args, message", [
    (["method=rome", "batch=2"], "needs sequential=true"),
    (["n=1000"], "the records file has only 48 records"),
    (["batch=2", "sequential=true", "method=none"], "needs batch=N > 1 and a method"),
    (["records=missing.json"], "records: file not found"),
])
def test_bad_edit_eval_input(world, capsys, args, message):
    rc, _, err = cli("edit_eval", f"ckpt_path={world['ckpt']}", f"stats={world['stats']}", *args, capsys=capsys)
    assert rc == 2 and message in err, err

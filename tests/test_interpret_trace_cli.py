"""``python -m xvariants.interpret trace`` (xvariants/interpret/trace_cli.py and its single-fact
and batch modules, trace_views.py), run in-process on tiny checkpoints: the files it writes
hold the numbers trace_fact / severed_trace / average_effects give for the same seed, and each
bad input ends as one message with exit status 2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from xvariants.data.facts import generate
from xvariants.data.spans import encode_fact
from xvariants.data.tokenizers import WordTokenizer
from xvariants.interpret.causal_effects import average_effects, average_severed
from xvariants.interpret.causal_trace import WrongPrediction, embedding_std, severed_trace, trace_fact
from xvariants.interpret.cli import main
from xvariants.loading import load_model
from xvariants.models import build_language_model

pytestmark = pytest.mark.usefixtures("one_thread")

VANILLA = {"body": "vanilla", "d_model": 32, "n_layers": 2, "n_heads": 2, "d_ff": 64, "dropout": 0.0, "max_len": 32}
UNIVERSAL = {"body": "universal", "d_model": 32, "n_heads": 2, "d_ff": 64, "dropout": 0.0, "act": True, "max_steps": 3,
             "max_len": 32}
FAST = ["samples=3", "window=2"]


def save_checkpoint(path: Path, model, cfg: dict, tokenizer, data_meta: dict | None = None) -> Path:
    """The keys ``load_model`` reads from a training checkpoint (LMTask's hyper-parameters)."""
    hp = {"model": cfg, "vocab_size": tokenizer.vocab_size, "tokenizer_state": tokenizer.to_dict(), "unit": "word",
          "data_meta": data_meta or {}}
    torch.save({"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()}, "hyper_parameters": hp}, path)
    return path


def teach(model, tokenizer, known: list[dict], steps: int = 60) -> None:
    """Fit the answer after each prompt (right-padded: a causal model never reads the padding)."""
    facts = [encode_fact(tokenizer, k["prompt"], k["subject"], k["answer"]) for k in known]
    x = torch.zeros(len(facts), max(len(f.ids) for f in facts), dtype=torch.long)
    for i, f in enumerate(facts):
        x[i, : len(f.ids)] = torch.as_tensor(f.ids, dtype=torch.long)
    last = torch.tensor([len(f.ids) - 1 for f in facts])
    y = torch.tensor([f.answer_id for f in facts])
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        out = model(x)
        logits = getattr(out, "logits", out)
        loss = torch.nn.functional.cross_entropy(logits[torch.arange(len(facts)), last], y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A vanilla checkpoint that learned two templates of every fact of a 4-person facts set
    and records its known-facts file (as data=facts does), and a random ACT checkpoint that
    records none; both read the same word tokenizer."""
    d = tmp_path_factory.mktemp("trace_cli")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # module fixtures start before one_thread; tiny models run faster on one
    facts = generate(seed=0, n_subjects=4, mentions=1)
    files = facts.write(d / "facts")
    tokenizer = WordTokenizer.train("\n".join(f"{k['prompt']} {k['answer']}" for k in facts.known))
    torch.manual_seed(0)
    vanilla = build_language_model(dict(VANILLA), tokenizer.vocab_size)
    teach(vanilla, tokenizer, [k for k in facts.known if k["template_id"].endswith(("/0", "/1"))])
    universal = build_language_model(dict(UNIVERSAL), tokenizer.vocab_size).eval()
    torch.set_num_threads(threads)
    return {
        "known": facts.known, "files": files, "tokenizer": tokenizer,
        "vanilla": save_checkpoint(d / "facts_vanilla.ckpt", vanilla, VANILLA, tokenizer, {"facts_files": files}),
        "universal": save_checkpoint(d / "universal.ckpt", universal, UNIVERSAL, tokenizer),
    }


def cli(*args: str, capsys) -> tuple[int, str, str]:
    rc = main(["trace", *args])
    out = capsys.readouterr()
    return rc, out.out, out.err


def encoded(world, entry: dict, answer: bool = True):
    f = encode_fact(world["tokenizer"], entry["prompt"], entry["subject"], entry["answer"] if answer else None)
    return torch.as_tensor(f.ids, dtype=torch.long), f.subject, f.answer_id


def file_sigma(model, world) -> float:
    """sigma over every distinct subject of the known-facts file, each inside its first prompt."""
    first = {}
    for k in world["known"]:
        first.setdefault(k["subject"], k)
    return embedding_std(model, [encoded(world, k, answer=False)[:2] for k in first.values()])


# ---------------------------------------------------------------------- one fact
def test_one_fact_writes_the_numbers_trace_fact_gives(world, tmp_path, capsys):
    fact = world["known"][0]
    rc, out, err = cli(f"ckpt_path={world['vanilla']}", f"prompt={fact['prompt']}", f"subject={fact['subject']}",
                       f"answer={fact['answer']}", *FAST, "seed=3", f"out_dir={tmp_path}", capsys=capsys)
    assert rc == 0, err
    js = json.loads((tmp_path / "trace.json").read_text())
    assert (tmp_path / "trace.png").stat().st_size > 10_000 and not (tmp_path / "severed.png").exists()
    model = load_model(world["vanilla"])[0].eval()
    tokens, subject, answer = encoded(world, fact)
    sigma = file_sigma(model, world)
    direct = trace_fact(model, tokens, subject, noise="s3", sigma=sigma, samples=3, window=2, seed=3, answer=answer)
    assert js["noise"]["sigma"] == sigma and js["noise"]["std"] == 3 * sigma
    assert js["noise"]["sigma_from"] == f"the subject tokens of 4 subjects in {world['files']['known_facts']}"
    assert js["trace"] == direct.to_dict()
    assert direct.p_clean > direct.p_corrupt and set(js["trace"]["scores"]) == {"resid", "mlp", "attn"}
    assert js["labels"][:2] == fact["subject"].split() and js["answer_text"] == fact["answer"]
    torch.testing.assert_close(torch.tensor(js["indirect_effect"]["mlp"], dtype=torch.float64),
                               direct.indirect_effect("mlp").double(), rtol=0, atol=1e-12)
    best = torch.tensor(js["trace"]["scores"]["resid"]).argmax()
    assert js["peaks"]["resid"]["token"] * 2 + js["peaks"]["resid"]["layer"] == int(best)
    assert f"clean {direct.p_clean:.4f}, corrupted {direct.p_corrupt:.4f}" in out
    assert "peak resid:" in out and "peak attn:" in out and f"wrote {tmp_path / 'trace.json'}" in out


def test_act_model_absolute_noise_severed_and_prompt_sigma(world, tmp_path, capsys):
    fact = world["known"][11]
    base = [f"ckpt_path={world['universal']}", f"prompt={fact['prompt']}", f"subject={fact['subject']}", *FAST]
    rc, out, err = cli(*base, "noise=0.5", "severed=true", "kinds=resid,attn", f"out_dir={tmp_path / 'a'}", capsys=capsys)
    assert rc == 0, err
    js = json.loads((tmp_path / "a" / "trace.json").read_text())
    assert (tmp_path / "a" / "severed.png").exists() and (tmp_path / "a" / "trace.png").exists()
    model = load_model(world["universal"])[0].eval()
    tokens, subject, _ = encoded(world, fact, answer=False)
    direct = trace_fact(model, tokens, subject, noise=0.5, samples=3, window=2, kinds=("resid", "attn"))
    cut = severed_trace(model, tokens, subject, noise=0.5, samples=3)
    assert js["trace"] == direct.to_dict() and js["severed"] == cut.to_dict()
    assert js["noise"] == {"spec": 0.5, "sigma": None, "sigma_from": "absolute noise", "std": 0.5}
    assert js["trace"]["ponder"]["clean"] == direct.ponder["clean"].tolist() and "resid" in js["trace"]["ponder"]
    assert js["layer_word"] == "step" and "ponder (ACT):" in out and "severed at token 1" in out
    # no known-facts file recorded: sigma of this prompt's own subject, and the output says so
    rc, out, err = cli(*base, "kinds=resid", f"out_dir={tmp_path / 'b'}", capsys=capsys)
    js = json.loads((tmp_path / "b" / "trace.json").read_text())
    assert rc == 0 and js["noise"]["sigma"] == embedding_std(model, [(tokens, subject)])
    assert "sigma over the subject tokens of this prompt (no known-facts file recorded with the model)" in out


# ---------------------------------------------------------------------- batch mode
def test_batch_mode_skips_wrong_facts_and_averages_the_rest(world, tmp_path, capsys):
    rc, out, err = cli(f"ckpt_path={world['vanilla']}", "facts=auto", "limit=12", *FAST, "severed=true",
                       f"out_dir={tmp_path}", capsys=capsys)
    assert rc == 0, err
    model = load_model(world["vanilla"])[0].eval()
    sigma = file_sigma(model, world)
    results, severed, wrong = [], [], []
    for k in world["known"][:12]:
        tokens, subject, answer = encoded(world, k)
        try:
            results.append(trace_fact(model, tokens, subject, noise="s3", sigma=sigma, samples=3, window=2, answer=answer))
        except WrongPrediction:
            wrong.append(k["known_id"])
            continue
        severed.append(severed_trace(model, tokens, subject, noise="s3", sigma=sigma, samples=3, answer=answer))
    assert results and wrong, "the fixture model should know some of these facts and miss others"
    summary = json.loads((tmp_path / "summary.json").read_text())
    expected = average_effects(results).summary()
    assert list(summary) == list(expected) and summary == expected
    effects = json.loads((tmp_path / "effects.json").read_text())
    assert effects["skipped_wrong"] == wrong and effects["n_traced"] == len(results) and effects["unusable"] == []
    assert effects["effects"]["ate_ci"] == pytest.approx(average_effects(results).ate_ci)
    for kind, curve in average_severed(severed).items():
        assert effects["severed"][kind]["aie"] == pytest.approx(curve["aie"], nan_ok=True)
    per_fact = sorted(int(p.stem) for p in (tmp_path / "facts").glob("*.json"))
    assert per_fact == [k["known_id"] for k in world["known"][:12] if k["known_id"] not in wrong]
    first = json.loads((tmp_path / "facts" / f"{per_fact[0]}.json").read_text())
    assert first["trace"] == results[0].to_dict()
    for png in ("aie_heatmap.png", "aie_lines.png", "severed.png"):
        assert (tmp_path / png).stat().st_size > 10_000
    assert f"{len(results)} traced, {len(wrong)} skipped" in out and "peak AIE resid:" in out


def test_batch_split_picks_the_facts_of_that_split(world, tmp_path, capsys):
    rc, _, err = cli(f"ckpt_path={world['vanilla']}", f"facts={world['files']['known_facts']}", "split=heldout",
                       "limit=6", "kinds=resid", "noise=1.0", *FAST, f"out_dir={tmp_path}", capsys=capsys)
    assert rc == 0, err
    heldout = [k["known_id"] for k in world["known"] if k["split"] == "heldout"][:6]
    effects = json.loads((tmp_path / "effects.json").read_text())
    traced = {int(p.stem) for p in (tmp_path / "facts").glob("*.json")}
    assert effects["n_chosen"] == 6 and traced and traced | set(effects["skipped_wrong"]) == set(heldout)
    assert all(json.loads((tmp_path / "facts" / f"{i}.json").read_text())["split"] == "heldout" for i in traced)


def test_batch_counts_facts_it_cannot_encode_and_refuses_an_all_wrong_file(world, tmp_path, capsys):
    good = world["known"][0]
    entries = [
        {**good, "known_id": "a/b"},  # an id from the file never names a path outside out_dir
        {**good, "known_id": 1, "subject": "Hashoux Zud"},
        {**good, "known_id": 2, "prompt": good["prompt"] + " and" * 40},
    ]
    path = tmp_path / "mine.json"
    path.write_text(json.dumps(entries))
    rc, out, err = cli(f"ckpt_path={world['vanilla']}", f"facts={path}", "kinds=resid", *FAST, f"out_dir={tmp_path / 'o'}",
                       capsys=capsys)
    assert rc == 0, err
    effects = json.loads((tmp_path / "o" / "effects.json").read_text())
    assert effects["n_traced"] == 1 and [u["known_id"] for u in effects["unusable"]] == [1, 2]
    assert "covers part of token 1 'Zudren'" in effects["unusable"][0]["reason"]
    assert "longer than the model's context of 32" in effects["unusable"][1]["reason"]
    assert [p.name for p in (tmp_path / "o" / "facts").iterdir()] == ["a_b.json"] and "2 unusable" in out
    path.write_text(json.dumps([{**good, "answer": "Tokyo"}]))
    rc, _, err = cli(f"ckpt_path={world['vanilla']}", f"facts={path}", *FAST, f"out_dir={tmp_path / 'x'}", capsys=capsys)
    assert rc == 2 and "predicts the answer of none of the 1 facts" in err and not (tmp_path / "x" / "summary.json").exists()


# ---------------------------------------------------------------------- bad input
BAD = [
    (["subject=Nobody Here"], "subject 'Nobody Here' does not occur in the prompt"),
    (["subject=Hashoux Zud"], "covers part of token 1 'Zudren'"),
    (["prompt=Hashoux Zudren" + " was born in" * 12], "the prompt has 38 tokens, longer than the model's context of 32"),
    (["answer=Tokyo"], "not 'Tokyo'"),
    (["kinds=resid,mpl"], "kinds: unknown kind 'mpl' (allowed: resid, mlp, attn)"),
    (["sampels=3"], "unknown option 'sampels'; did you mean samples?"),
    (["noise=loud"], "noise: expected a number, got 'loud'"),
    (["noise=s"], "noise: unknown noise 's'"),
    (["samples=0"], "samples: expected an integer >= 1, got '0'"),
    (["severed=maybe"], "severed: expected true or false, got 'maybe'"),
    (["limit=3"], "limit=: only with facts=PATH|auto"),
]


@pytest.mark.parametrize("extra, message", BAD, ids=[m.split(":")[0][:30] for _, m in BAD])
def test_bad_single_fact_input_is_one_message(world, extra, message, tmp_path, capsys):
    fact = world["known"][0]
    opts = {"prompt": fact["prompt"], "subject": fact["subject"], "answer": fact["answer"]}
    for e in extra:
        k, v = e.split("=", 1)
        opts[k] = v
    rc, _, err = cli(f"ckpt_path={world['vanilla']}", *FAST, *[f"{k}={v}" for k, v in opts.items()],
                       f"out_dir={tmp_path}", capsys=capsys)
    assert rc == 2 and err.startswith("error: ") and message in err and "Traceback" not in err, err
    assert err.count("\n") == 1 and not (tmp_path / "trace.json").exists()


def test_bad_sources_and_files_are_one_message(world, tmp_path, capsys):
    fact = world["known"][0]
    one = [f"prompt={fact['prompt']}", f"subject={fact['subject']}"]
    cases = [
        ([f"ckpt_path={tmp_path / 'missing.ckpt'}", *one], "checkpoint not found"),
        ([f"ckpt_path={world['vanilla']}", f"facts={tmp_path / 'missing.json'}"], "facts: file not found"),
        ([f"ckpt_path={world['universal']}", "facts=auto"], "facts=auto: universal records no known-facts file"),
        ([f"ckpt_path={world['vanilla']}", "facts=auto", "split=dev"], "split: expected train, heldout, all"),
        ([f"ckpt_path={world['vanilla']}", "facts=auto", *one], "prompt=, subject= trace one fact"),
        ([f"ckpt_path={world['vanilla']}", "prompt=x"], 'prompt="..." and subject="..." are required'),
        ([*one], "give exactly one of ckpt_path=... or hf_model=..."),
    ]
    not_json = tmp_path / "notes.json"
    not_json.write_text("[1, 2]")
    cases.append(([f"ckpt_path={world['vanilla']}", f"facts={not_json}"], "entry 0 of"))
    for args, message in cases:
        rc, _, err = cli(*args, f"out_dir={tmp_path / 'o'}", capsys=capsys)
        assert rc == 2 and err.startswith("error: ") and message in err and "Traceback" not in err, (args, err)
    assert main(["trac", f"ckpt_path={world['vanilla']}"]) == 2
    assert "unknown command 'trac'; the commands are `flow` and `trace`" in capsys.readouterr().err
    assert main(["trace", "--help"]) == 0 and "facts=PATH|auto" in capsys.readouterr().out


# ---------------------------------------------------------------------- the views
def test_fact_view_stars_the_subject_hatches_na_cells_and_floors_at_the_corrupted_run():
    from matplotlib.patches import Rectangle

    from xvariants.interpret.causal_effects import token_categories
    from xvariants.interpret.causal_trace import TraceResult
    from xvariants.interpret.trace_views import CMAPS, plot_fact

    T, L = 5, 3
    r = TraceResult(torch.arange(T), (1, 3), 7, 0.9, 0.2, 1.0, 3, 2, categories=token_categories((1, 3), T))
    for k in ("resid", "mlp"):
        r.scores[k] = torch.linspace(0.0, 0.8, T * L, dtype=torch.float64).reshape(T, L)
        r.na[k] = torch.zeros(T, L, dtype=torch.bool)
    r.na["mlp"][0, 1:] = True
    fig = plot_fact(r, ["a", "b", "c", "d", "e"], answer=" Rome", layer_word="step")
    resid, mlp = [ax for ax in fig.axes if ax.get_label() != "<colorbar>"][:2]
    assert [t.get_text() for t in resid.get_yticklabels()] == ["a", "b*", "c*", "d", "e"]
    hatched = [p for p in mlp.patches if isinstance(p, Rectangle) and p.get_hatch()]
    assert sorted((p.get_x(), p.get_y()) for p in hatched) == [(1, 0), (2, 0)] and not resid.patches
    mesh = resid.collections[0]
    assert mesh.get_clim() == (0.2, 0.8) and mesh.get_cmap().name.startswith(CMAPS["resid"])
    mask = mlp.collections[0].get_array().mask
    assert mask[0, 1:].all() and mask.sum() == 2  # grey under the hatching, not a colour of the scale
    assert [ax.get_title() for ax in fig.axes if ax.get_label() == "<colorbar>"] == ["p(Rome)", "p(Rome)"]
    assert "answer 'Rome', p clean 0.900, p corrupted 0.200; hatched: step never run" in fig._suptitle.get_text()


def test_average_views_leave_out_categories_without_samples_and_draw_the_intervals():
    from xvariants.interpret.causal_effects import token_categories
    from xvariants.interpret.causal_trace import SeveredResult, TraceResult
    from xvariants.interpret.trace_views import plot_aie_lines, plot_average_heatmap, plot_severed

    g = torch.Generator().manual_seed(0)
    results = []
    for _ in range(4):  # two-token subjects: no middle subject token
        r = TraceResult(torch.arange(6), (1, 3), 7, 0.9, 0.2, 1.0, 3, 2, categories=token_categories((1, 3), 6))
        r.scores["attn"] = 0.2 + 0.5 * torch.rand(6, 4, generator=g, dtype=torch.float64)
        r.na["attn"] = torch.zeros(6, 4, dtype=torch.bool)
        results.append(r)
    effects = average_effects(results)
    heat = plot_average_heatmap(effects)
    labels = [t.get_text() for t in heat.axes[0].get_yticklabels()]
    assert labels == ["First subject token", "Last subject token", "First subsequent token", "Further tokens", "Last token"]
    assert heat.axes[0].collections[0].get_clim()[0] == 0.0
    lines = plot_aie_lines(effects).axes[0]
    assert len(lines.get_lines()) == 5 + 1  # five categories and the zero line
    last = lines.get_lines()[4]
    assert last.get_ydata().tolist() == effects.aie["attn"][5].tolist()
    band = lines.collections[4].get_paths()[0].vertices[:, 1]
    top = (effects.aie["attn"][5] + effects.ci["attn"][5]).max().item()
    assert band.max() == pytest.approx(top)
    cut = [SeveredResult(2, 7, 0.9, 0.2, {k: torch.full((4,), 0.5) for k in ("none", "mlp", "attn")},
                         torch.zeros(4, dtype=torch.bool)) for _ in range(3)]
    bars = plot_severed(average_severed(cut)).axes[0]
    assert [round(b.get_height(), 9) for b in bars.patches] == [0.3] * 12
    assert [t.get_text() for t in bars.get_legend().get_texts()] == ["no module severed", "attention severed", "MLP severed"]

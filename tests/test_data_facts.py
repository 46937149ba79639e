"""The known-facts corpus: determinism, counts, where facts are written (and where not),
CounterFact records, the corpus files and mixing, and a few training steps on data=facts_tiny."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from xvariants.config_errors import ConfigError, DataError
from xvariants.data.corpora import fetch, load_corpus
from xvariants.data.facts import RELATIONS, generate, prompt_of
from xvariants.data.facts.factset import sentence_of
from xvariants.data.spans import encode_fact, find_subject
from xvariants.data.tokenizers import BPETokenizer, CharTokenizer, WordTokenizer

SMALL = {"seed": 3, "n_subjects": 12, "mentions": 3}


@pytest.fixture(scope="module")
def facts():
    return generate(**SMALL)


@pytest.fixture
def no_local_corpora(monkeypatch, tmp_path):
    """Only the data_dir a test gives is searched (not the shared data, a user's data dir or cache)."""
    monkeypatch.setattr(fetch, "SHARED_DATA_DIR", tmp_path / "no-shared")
    monkeypatch.delenv(fetch.DATA_DIR_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "no-cache"))


def test_same_seed_same_set_other_seed_other_set(facts):
    again = generate(**SMALL)
    assert (again.subjects, again.facts, again.paragraphs, again.known, again.counterfact) == (
        facts.subjects, facts.facts, facts.paragraphs, facts.known, facts.counterfact)
    other = generate(**{**SMALL, "seed": 4})
    assert set(other.subjects) != set(facts.subjects)


def test_relations_objects_and_templates_meet_the_counts():
    assert len(RELATIONS) >= 6
    objects = [o for r in RELATIONS for o in r.objects]
    assert len(objects) == len(set(objects)) and all(len(o.split()) == 1 for o in objects)
    template_words = {w for r in RELATIONS for t in r.train_templates for w in t.split()}
    for r in RELATIONS:
        assert 15 <= len(r.objects) <= 25, r.name
        assert len(r.templates) >= 10 and r.train_templates and r.heldout_templates, r.name
        assert len(set(r.templates)) == len(r.templates)
        for t in r.templates:
            assert t.endswith(" {object}") and t.count("{subject}") == 1 and t.count("{object}") == 1, t
        for t in r.heldout_templates:  # no word a word-level model never saw in training text
            assert set(t.split()) <= template_words, t


def test_subjects_are_unique_two_word_fictional_names(facts):
    big = generate(seed=0, n_subjects=400, mentions=1)
    for subjects in (facts.subjects, big.subjects):
        assert len(set(subjects)) == len(subjects)
        assert all(len(s.split()) == 2 and all(p[0].isupper() for p in s.split()) for s in subjects)
    reserved = {o.lower() for r in RELATIONS for o in r.objects} | {
        w.lower() for r in RELATIONS for t in r.templates for w in t.split()}
    assert not {p.lower() for s in big.subjects for p in s.split()} & reserved
    firsts = [s.split()[0] for s in big.subjects]
    assert len(set(firsts)) < len(firsts)  # name parts are shared: only the whole name identifies


def test_every_fact_is_in_the_training_text_with_training_templates_only(facts):
    train_text = "\n".join(facts.paragraphs["train"])
    all_text = "\n".join(line for split in facts.paragraphs.values() for line in split)
    by_name = {r.name: r for r in RELATIONS}
    for f in facts.facts:
        r = by_name[f.relation]
        used = [t for t in r.train_templates if sentence_of(t, f.subject, f.object) in train_text]
        assert len(used) >= min(facts.mentions, len(r.train_templates)), f
        for t in r.heldout_templates:
            assert prompt_of(t, f.subject) not in all_text, (f, t)
    assert len(facts.paragraphs["train"]) == facts.n_subjects * facts.mentions
    assert len(facts.paragraphs["valid"]) == len(facts.paragraphs["test"]) == facts.n_subjects


def test_known_facts_cover_every_fact_and_template(facts):
    assert len(facts.known) == sum(len(r.templates) for r in RELATIONS) * facts.n_subjects
    truth = {(f.subject, f.relation): f.object for f in facts.facts}
    for entry in facts.known:
        assert set(entry) == {"known_id", "subject", "relation", "prompt", "answer", "template_id", "split"}
        assert truth[(entry["subject"], entry["relation"])] == entry["answer"]
        assert entry["subject"] in entry["prompt"] and not entry["prompt"].endswith(" ")
        relation = next(r for r in RELATIONS if r.name == entry["relation"])
        t = int(entry["template_id"].split("/")[1])
        assert entry["prompt"] == prompt_of(relation.templates[t], entry["subject"])
        assert entry["split"] == ("train" if relation.templates[t] in relation.train_templates else "heldout")


def test_counterfact_records_are_well_formed(facts):
    truth = {(f.subject, f.relation): f.object for f in facts.facts}
    assert len(facts.counterfact) == len(facts.facts)
    for record in facts.counterfact:
        rw = record["requested_rewrite"]
        subject, relation = rw["subject"], rw["relation_id"]
        true, new = rw["target_true"]["str"], rw["target_new"]["str"]
        r = next(r for r in RELATIONS if r.name == relation)
        assert true == truth[(subject, relation)] and new != true and new in r.objects
        assert "{}" in rw["prompt"] and rw["prompt"].format(subject) in {prompt_of(t, subject) for t in r.train_templates}
        assert record["paraphrase_prompts"] == [prompt_of(t, subject) for t in r.heldout_templates]
        assert record["neighborhood_prompts"] and len(record["neighborhood_prompts"]) == len(record["neighborhood_subjects"])
        for s, p in zip(record["neighborhood_subjects"], record["neighborhood_prompts"]):
            assert s != subject and truth[(s, relation)] == true and s in p
        assert record["attribute_subjects"]
        for s, p in zip(record["attribute_subjects"], record["attribute_prompts"]):
            assert truth[(s, relation)] == new and s in p


def test_bad_settings_name_their_field(tmp_path):
    with pytest.raises(ConfigError, match="corpus.n_subjects"):
        load_corpus("facts", n_subjects=2, mix="none")
    with pytest.raises(ConfigError, match="corpus.mix"):
        load_corpus("facts", n_subjects=4, mix="wikipedia")
    with pytest.raises(ConfigError, match="corpus.mix_ratio"):
        load_corpus("facts", n_subjects=4, mix="none", mix_ratio=-1)
    with pytest.raises(DataError, match="corpus.n_subject "):
        load_corpus("facts", n_subject=4)
    with pytest.raises(DataError, match="corpus.n_subjects does not apply"):
        load_corpus("stdlib", n_subjects=4)


def test_corpus_writes_its_files_and_is_multi_token_under_each_tokenizer(tmp_path, facts):
    corpus = load_corpus("facts", **SMALL, mix="none", out_dir=tmp_path / "out")
    files = corpus.meta["facts_files"]
    def read(name):
        return json.loads(Path(files[name]).read_text(encoding="utf-8"))

    assert read("known_facts") == facts.known and read("counterfact") == facts.counterfact
    assert read("facts")["subjects"] == facts.subjects
    assert corpus.train == "".join(p + "\n" for p in facts.paragraphs["train"])
    assert corpus.meta["mix"] == "none" and corpus.meta["n_facts"] == len(facts.facts)
    for tok in (WordTokenizer.train(corpus.train), CharTokenizer.train(corpus.train),
                BPETokenizer.train(corpus.train, vocab_size=512)):
        for entry in facts.known[:: len(RELATIONS[0].templates)]:
            start, end = find_subject(tok, entry["prompt"], entry["subject"])
            assert end - start >= 2, (tok.name, entry["subject"])
    word = WordTokenizer.train(corpus.train)
    for f in facts.facts:  # each answer is one known word (then the line's <eos>)
        ids = word.encode(f.object)
        assert len(ids) == 2 and word.unk_id not in ids
    for entry in facts.known:  # what a trace reads: two subject tokens, the answer word's id
        fact = encode_fact(word, entry["prompt"], entry["subject"], entry["answer"])
        assert fact.answer_id == word.encode(entry["answer"])[0] and fact.subject[1] - fact.subject[0] == 2
        assert word.unk_id not in fact.ids


def test_mix_auto_takes_the_first_real_corpus_found(tmp_path, no_local_corpora):
    data = tmp_path / "data"
    (data / "wikitext-2").mkdir(parents=True)
    (data / "tinyshakespeare.txt").write_text("First Citizen:\nBefore we proceed any further, hear me speak.\n" * 50)
    shakes = load_corpus("facts", n_subjects=4, mentions=1, mix="auto", data_dir=data)
    assert shakes.meta["mix"] == "shakespeare" and "First Citizen:\n" in shakes.train
    for split in ("valid", "test"):
        (data / "wikitext-2" / f"{split}.txt").write_text(f" = {split} heading = \n the {split} text .\n" * 40)
    wiki = load_corpus("facts", n_subjects=4, mentions=1, mix="auto", data_dir=data, mix_ratio=0.5)
    assert wiki.meta["mix"] == "wikitext2"
    assert "the valid text ." in wiki.train and "the test text ." in wiki.valid and "the test text ." in wiki.test
    paragraphs = generate(n_subjects=4, mentions=1).paragraphs["train"]
    assert wiki.train.splitlines()[0] == paragraphs[0]
    bio = sum(len(p) + 1 for p in paragraphs)
    assert abs((len(wiki.train) - bio) / bio - 0.5) < 0.1  # filler is about mix_ratio of the paragraphs
    with pytest.raises(FileNotFoundError):
        load_corpus("facts", n_subjects=4, mix="shakespeare", data_dir=tmp_path / "empty")


@pytest.mark.slow
def test_train_py_runs_a_few_steps_on_facts_tiny(tmp_path, no_local_corpora):
    from tests.conftest import TINY, compose_train
    from xvariants.training.run import train

    cfg = compose_train([*TINY, "data=facts_tiny", "data.corpus.mix=none", "model.d_model=32", "model.n_layers=2",
                         "model.n_heads=2", "model.d_ff=64"], tmp_path)
    assert cfg.data.tokenizer.name == "word" and cfg.data.corpus.n_subjects == 8
    metrics = train(cfg)
    assert metrics["val/loss"] > 0
    folder = next((tmp_path.parent / "token-cache" / "facts").glob("facts-v1-seed0-n8-m8"))
    assert (folder / "known_facts.json").is_file() and (folder / "counterfact.json").is_file()


@pytest.mark.slow
def test_the_ci_sized_twin_learns_its_facts(tmp_path, no_local_corpora):
    """experiment=facts_tiny as configured (600 steps, ~30 s on one core) knows most of its
    facts on the training templates and some on the held-out paraphrases (measured 0.81 and
    0.53 with the real-text mix; the bounds leave room for thread counts and the mix)."""

    from tests.conftest import compose_train
    from xvariants.data.tokenizers import tokenizer_from_dict
    from xvariants.evaluation.facts import fact_accuracy, load_known_facts
    from xvariants.loading import load_model
    from xvariants.training.run import train

    cfg = compose_train(["experiment=facts_tiny", "data.corpus.mix=none", "trainer.accelerator=cpu",
                         "trainer.devices=1", "logger=csv"], tmp_path)
    train(cfg)
    model, hp = load_model(Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt")
    records = load_known_facts(hp["data_meta"]["facts_files"]["known_facts"])
    acc = fact_accuracy(model, tokenizer_from_dict(hp["tokenizer_state"]), records)
    assert acc.splits["train"].accuracy >= 0.6, acc.to_dict()
    assert acc.splits["heldout"].accuracy >= 0.3, acc.to_dict()

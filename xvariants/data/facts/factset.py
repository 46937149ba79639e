"""Generate a known-facts set: fictional people, one object per relation, biography
paragraphs, the known-facts prompts and CounterFact-style editing records.

Everything follows from ``seed`` (string-seeded ``random.Random`` streams, stable across
Python versions), so the same arguments give the same set on every machine.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from xvariants.atomic import write_atomic
from xvariants.config_errors import require

from .relations import RELATIONS, Relation

SPLITS = ("train", "valid", "test")
# Bump when what a seed generates changes, so cached files of the old meaning are not reused.
FACTS_FORMAT = 1
MAX_SUBJECTS = 20000
# neighbourhood / attribute prompts per CounterFact record (CounterFact has about 10)
N_NEIGHBOURS = 10

_ONSETS = ("b", "d", "f", "g", "h", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z",
           "br", "dr", "gr", "kr", "st", "tr", "th", "sh")
_VOWELS = ("a", "e", "i", "o", "u", "ai", "ei", "ou", "ia")
_CODAS = ("", "n", "r", "l", "s", "m", "th", "nd", "rk", "x", "v")


@dataclass(frozen=True)
class Fact:
    """``subject`` has ``object`` for ``relation``."""

    subject: str
    relation: str
    object: str


def prompt_of(template: str, subject: str) -> str:
    """The template's text before ``{object}`` with the subject filled in: the prompt stops right
    before the answer (no trailing space; the text goes on with one space and the answer)."""
    return template.split("{object}")[0].rstrip().replace("{subject}", subject)


def sentence_of(template: str, subject: str, obj: str) -> str:
    return template.replace("{subject}", subject).replace("{object}", obj) + " ."


@dataclass
class FactsSet:
    """A generated known-facts set.

    ``paragraphs[split]``: biography paragraphs (one line each, training templates only):
    ``mentions`` per subject in train, one per subject in valid and in test, every one
    stating all of the subject's facts. ``known``: one entry per (fact, template), training
    and held-out. ``counterfact``: one editing record per fact.
    """

    seed: int
    n_subjects: int
    mentions: int
    subjects: list[str]
    facts: list[Fact]
    paragraphs: dict[str, list[str]] = field(repr=False)
    known: list[dict[str, Any]] = field(repr=False)
    counterfact: list[dict[str, Any]] = field(repr=False)

    @property
    def relations(self) -> tuple[Relation, ...]:
        return RELATIONS

    def params(self) -> dict[str, Any]:
        return {"format": FACTS_FORMAT, "seed": self.seed, "n_subjects": self.n_subjects, "mentions": self.mentions}

    def write(self, folder: str | Path) -> dict[str, str]:
        """Write ``known_facts.json``, ``counterfact.json`` and ``facts.json`` (parameters,
        subjects, the fact table) into ``folder``; return their paths by name."""
        folder = Path(folder)
        payloads = {
            "known_facts": self.known,
            "counterfact": self.counterfact,
            "facts": {**self.params(), "subjects": self.subjects, "facts": [vars(f) for f in self.facts]},
        }
        paths = {}
        for name, payload in payloads.items():
            path = folder / f"{name}.json"
            data = json.dumps(payload, indent=1, ensure_ascii=False).encode("utf-8")
            write_atomic(path, lambda f, data=data: f.write(data))
            paths[name] = str(path)
        return paths


def _rng(seed: int, purpose: str) -> random.Random:
    return random.Random(f"xvariants-facts/{seed}/{purpose}")


def _name_part(rng: random.Random, syllables: int) -> str:
    word = "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) for _ in range(syllables)) + rng.choice(_CODAS)
    return word.capitalize()


def _name_pool(rng: random.Random, size: int, syllables: tuple[int, ...], taken: set[str]) -> list[str]:
    """``size`` new name parts, none a template word, an object or already ``taken`` (any case)."""
    pool: list[str] = []
    while len(pool) < size:
        part = _name_part(rng, rng.choice(syllables))
        if len(part) >= 4 and part.lower() not in taken:
            taken.add(part.lower())
            pool.append(part)
    return pool


def _reserved_words() -> set[str]:
    words = set()
    for relation in RELATIONS:
        words.update(o.lower() for o in relation.objects)
        for template in relation.templates:
            words.update(w.lower() for w in template.split())
    return words


def make_subjects(seed: int, n_subjects: int) -> list[str]:
    """``n_subjects`` unique two-word names. First and last names come from pools of about
    ``n_subjects / 2`` each, so most parts are shared by several people and only the whole
    name identifies one (as with real names)."""
    rng = _rng(seed, "subjects")
    taken = _reserved_words()
    size = max(2, math.ceil(n_subjects / 2))
    first = _name_pool(rng, size, (2,), taken)
    last = _name_pool(rng, size, (2, 3), taken)
    pairs = rng.sample(range(size * size), n_subjects)
    return [f"{first[p // size]} {last[p % size]}" for p in pairs]


def _assign_objects(rng: random.Random, relation: Relation, subjects: list[str]) -> dict[str, str]:
    """Balanced assignment over ``min(#objects, n/2)`` objects: every object used is the true
    object of at least two subjects (so each fact has a neighbourhood) and no object is
    much more frequent than another (a model cannot win on the prior)."""
    used = list(relation.objects)
    rng.shuffle(used)
    used = used[: min(len(used), len(subjects) // 2)]
    order = list(subjects)
    rng.shuffle(order)
    return {s: used[i % len(used)] for i, s in enumerate(order)}


def generate(seed: int = 0, n_subjects: int = 200, mentions: int = 4) -> FactsSet:
    """Generate the known-facts set of ``seed``.

    :param seed: the facts' own seed (kept apart from the training seed, so models trained
        with different seeds learn the same facts).
    :param n_subjects: number of fictional people (>= 4); each has one fact per relation.
    :param mentions: training paragraphs per subject; mention ``k`` states each fact with a
        different training template (cycling after 7).
    """
    for value, name, low in ((seed, "seed", 0), (n_subjects, "n_subjects", 4), (mentions, "mentions", 1)):
        require(isinstance(value, int) and not isinstance(value, bool) and value >= low,
                name, f"must be an integer >= {low}, got {value!r}")
    require(n_subjects <= MAX_SUBJECTS, "n_subjects", f"must be at most {MAX_SUBJECTS}, got {n_subjects}")

    subjects = make_subjects(seed, n_subjects)
    assign = _rng(seed, "objects")
    truth = {r.name: _assign_objects(assign, r, subjects) for r in RELATIONS}
    facts = [Fact(s, r.name, truth[r.name][s]) for s in subjects for r in RELATIONS]

    # per (subject, relation) a fixed order of training templates: mention k uses order[k]
    orders = _rng(seed, "templates")
    template_order = {
        (s, r.name): orders.sample(range(len(r.train_templates)), len(r.train_templates))
        for s in subjects
        for r in RELATIONS
    }
    by_name = {r.name: r for r in RELATIONS}
    rounds = {"train": range(mentions), "valid": [mentions], "test": [mentions + 1]}
    text_rng = _rng(seed, "paragraphs")
    paragraphs: dict[str, list[str]] = {}
    for split in SPLITS:
        lines = []
        for k in rounds[split]:
            for subject in subjects:
                relations = list(RELATIONS)
                text_rng.shuffle(relations)
                sentences = []
                for r in relations:
                    order = template_order[(subject, r.name)]
                    template = r.train_templates[order[k % len(order)]]
                    sentences.append(sentence_of(template, subject, truth[r.name][subject]))
                lines.append(" ".join(sentences))
        text_rng.shuffle(lines)
        paragraphs[split] = lines

    known = []
    for f in facts:
        relation = by_name[f.relation]
        for t, template in enumerate(relation.templates):
            known.append({
                "known_id": len(known),
                "subject": f.subject,
                "relation": f.relation,
                "prompt": prompt_of(template, f.subject),
                "answer": f.object,
                "template_id": f"{f.relation}/{t}",
                "split": "train" if t < len(relation.train_templates) else "heldout",
            })
    counterfact = _counterfact(_rng(seed, "counterfact"), facts, truth, by_name)
    return FactsSet(seed, n_subjects, mentions, subjects, facts, paragraphs, known, counterfact)


def _counterfact(
    rng: random.Random, facts: list[Fact], truth: dict[str, dict[str, str]], by_name: dict[str, Relation]
) -> list[dict[str, Any]]:
    """One CounterFact-layout record per fact (see docs/interpretability.md): the rewrite uses a
    training template, the paraphrases the held-out ones, neighbourhood prompts other subjects
    with the same true object, attribute prompts subjects whose true object is ``target_new``."""
    holders: dict[tuple[str, str], list[str]] = {}
    for f in facts:
        holders.setdefault((f.relation, f.object), []).append(f.subject)
    records = []
    for case_id, f in enumerate(facts):
        relation = by_name[f.relation]
        template = rng.choice(relation.train_templates)
        new = rng.choice(sorted({o for (r, o) in holders if r == f.relation} - {f.object}))
        neighbours = [s for s in holders[(f.relation, f.object)] if s != f.subject][:N_NEIGHBOURS]
        attribute = holders[(f.relation, new)][:N_NEIGHBOURS]
        records.append({
            "case_id": case_id,
            "requested_rewrite": {
                "prompt": prompt_of(template, "{}"),
                "relation_id": f.relation,
                "subject": f.subject,
                "target_new": {"str": new},
                "target_true": {"str": f.object},
            },
            "paraphrase_prompts": [prompt_of(t, f.subject) for t in relation.heldout_templates],
            "neighborhood_prompts": [prompt_of(rng.choice(relation.train_templates), s) for s in neighbours],
            "neighborhood_subjects": neighbours,
            "attribute_prompts": [prompt_of(rng.choice(relation.train_templates), s) for s in attribute],
            "attribute_subjects": attribute,
        })
    return records

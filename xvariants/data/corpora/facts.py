"""The ``facts`` corpus: generated biography paragraphs (``xvariants.data.facts``) mixed with
real text, plus the known-facts and CounterFact files written beside the token cache.

Nothing is downloaded. The real text ("filler") is, with ``mix=auto``, the first of
WikiText-2, Tiny Shakespeare and the embedded stdlib corpus found locally (``data_dir``,
``$XVARIANTS_DATA_DIR``, ``../shared/data``, the download cache); ``meta["mix"]`` says
which. WikiText-2 as found in the shared data has no train split: its valid file then
fills our train split and the two halves of its test file our valid and test splits.
"""

from __future__ import annotations

from pathlib import Path

from xvariants.config_errors import config_scope, require

from ..facts import generate
from ..facts.factset import SPLITS, FactsSet
from .base import Corpus, CorpusNotFoundError, read_text
from .fetch import candidate_paths, find_file

MIX_SOURCES = ("auto", "wikitext2", "shakespeare", "stdlib", "none")
_AUTO_ORDER = ("wikitext2", "shakespeare", "stdlib")
FACTS_OPTIONS = ("seed", "n_subjects", "mentions", "mix", "mix_ratio", "out_dir")


def _wikitext2(data_dir: str | Path | None) -> dict[str, str]:
    from .wikitext import load_wikitext

    try:
        corpus = load_wikitext("wikitext2", path=None, data_dir=data_dir, download=False, files={})
        return {s: corpus.split(s) for s in SPLITS}
    except CorpusNotFoundError:
        pass
    found = {
        s: find_file(candidate_paths("wikitext2", [f"wiki.{s}.tokens", f"{s}.txt"],
                                     [f"wikitext-2/wiki.{s}.tokens", f"wikitext-2/{s}.txt"],
                                     path=None, data_dir=data_dir))
        for s in ("valid", "test")
    }
    if found["valid"] is None or found["test"] is None:
        raise CorpusNotFoundError("WikiText-2 valid/test files not found locally")
    test = read_text(found["test"])
    half = test.find("\n", len(test) // 2) + 1
    return {"train": read_text(found["valid"]), "valid": test[:half], "test": test[half:]}


def _shakespeare(data_dir: str | Path | None) -> dict[str, str]:
    from .shakespeare import DEFAULT_SPLIT, load_shakespeare

    corpus = load_shakespeare(DEFAULT_SPLIT, path=None, data_dir=data_dir, download=False)
    return {s: corpus.split(s) for s in SPLITS}


def _stdlib(data_dir: str | Path | None) -> dict[str, str]:
    from .stdlib import load_stdlib

    corpus = load_stdlib((0.9, 0.05, 0.05))
    return {s: corpus.split(s) for s in SPLITS}


_FILLERS = {"wikitext2": _wikitext2, "shakespeare": _shakespeare, "stdlib": _stdlib}


def load_filler(mix: str, data_dir: str | Path | None) -> tuple[str, dict[str, str]]:
    """``(source, {split: text})`` of the real text to mix in; ``mix="none"`` gives empty texts."""
    require(mix in MIX_SOURCES, "mix", f"unknown mix source {mix!r}", MIX_SOURCES)
    if mix == "none":
        return "none", {s: "" for s in SPLITS}
    for name in _AUTO_ORDER if mix == "auto" else (mix,):
        try:
            return name, _FILLERS[name](data_dir)
        except CorpusNotFoundError:
            if mix != "auto":
                raise
    raise AssertionError("the stdlib corpus is always available")


def _take_lines(text: str, start: int, n_chars: int) -> tuple[str, int]:
    """Whole lines of ``text`` from ``start`` (a line start) covering at least ``n_chars``
    characters or up to the end; the next start wraps to 0 at the end."""
    if start >= len(text):
        start = 0
    stop = text.find("\n", start + max(n_chars, 1) - 1)
    stop = len(text) if stop < 0 else stop + 1
    chunk = text[start:stop]
    return (chunk if chunk.endswith("\n") else chunk + "\n"), stop


def interleave(paragraphs: list[str], filler: str, mix_ratio: float) -> str:
    """Each paragraph as a line, followed by whole filler lines (in order from ``filler``, from its
    start again when it runs out) while the filler written so far is short of ``mix_ratio`` times
    the paragraphs written so far: long filler lines (WikiText paragraphs) are paid back later."""
    out: list[str] = []
    at, owed = 0, 0.0
    for paragraph in paragraphs:
        out.append(paragraph + "\n")
        owed += mix_ratio * len(paragraph)
        if filler and owed > 0:
            chunk, at = _take_lines(filler, at, round(owed))
            out.append(chunk)
            owed -= len(chunk)
    return "".join(out)


def facts_folder(out_dir: str | Path, facts: FactsSet) -> Path:
    """Where the files of ``facts`` go under ``out_dir``: one folder per generation setting."""
    p = facts.params()
    return Path(out_dir) / f"facts-v{p['format']}-seed{p['seed']}-n{p['n_subjects']}-m{p['mentions']}"


def load_facts(
    *,
    seed: int = 0,
    n_subjects: int = 200,
    mentions: int = 4,
    mix: str = "auto",
    mix_ratio: float = 1.0,
    out_dir: str | Path | None = None,
    data_dir: str | Path | None = None,
) -> Corpus:
    """Generate the facts set, mix it with real text, write its files to ``out_dir`` (when given).

    ``meta["facts_files"]`` holds the paths of ``known_facts.json``, ``counterfact.json`` and
    ``facts.json``. Errors name the field as ``corpus.<option>``.
    """
    with config_scope("corpus."):
        require(isinstance(mix_ratio, (int, float)) and not isinstance(mix_ratio, bool) and mix_ratio >= 0,
                "mix_ratio", f"must be a number >= 0, got {mix_ratio!r}")
        facts = generate(seed=seed, n_subjects=n_subjects, mentions=mentions)
        source, filler = load_filler(mix, data_dir)
    texts = {s: interleave(facts.paragraphs[s], filler[s], float(mix_ratio)) for s in SPLITS}
    meta = {
        "source": "facts",
        **facts.params(),
        "mix": source,
        "mix_ratio": float(mix_ratio),
        "n_facts": len(facts.facts),
        "split_rule": "generated: train mentions x subjects paragraphs, valid and test one per subject",
        "test_is_valid": False,
        "chars": {s: len(texts[s]) for s in SPLITS},
    }
    if out_dir is not None:
        meta["facts_files"] = facts.write(facts_folder(out_dir, facts))
    return Corpus("facts", texts["train"], texts["valid"], texts["test"], meta)

"""WikiText-2 and WikiText-103 (Merity et al., 2016), tokenized v1, CC BY-SA 3.0."""

from __future__ import annotations

from pathlib import Path

from .base import Corpus, read_text
from .fetch import Source, resolve_files

SPLITS = ("train", "valid", "test")
BASE_URL = "https://wikitext.smerity.com"

# Folder names used inside the official zips (and in the project's shared data).
FOLDERS = {"wikitext2": "wikitext-2", "wikitext103": "wikitext-103"}

SOURCES = {
    "wikitext2": Source(
        url=f"{BASE_URL}/wikitext-2-v1.zip",
        own_names={f"wiki.{s}.tokens": f"wikitext-2/wiki.{s}.tokens" for s in SPLITS},
        sha256={
            "wiki.train.tokens": "9e9fa1ad55b1c2c95b08e37dd8e653f638fac2c6de904b79e813611eefbc985f",
            "wiki.valid.tokens": "f0737ed31fc1329026e95cb8b98e19c2a182c39c240ab909dc31abf2f8af58e8",
            "wiki.test.tokens": "d790b833ef8cf03a90db7bf1271b7520b83c45ce07ba3c1a9699df81e239eca0",
        },
    ),
    "wikitext103": Source(
        url=f"{BASE_URL}/wikitext-103-v1.zip",
        own_names={f"wiki.{s}.tokens": f"wikitext-103/wiki.{s}.tokens" for s in SPLITS},
    ),
}


def load_wikitext(
    name: str,
    *,
    path: str | Path | None,
    data_dir: str | Path | None,
    download: bool,
    files: dict[str, str | Path | None],
) -> Corpus:
    """Load ``wiki.{train,valid,test}.tokens`` of ``name`` ("wikitext2" or "wikitext103").

    Also accepted: ``<folder>/{split}.txt`` as in the shared data, where
    WikiText-2 has valid and test only; without a train file the load fails
    (after trying the download, when allowed) with a message saying where to put it.
    """
    folder = FOLDERS[name]
    wanted = {
        s: (
            [f"wiki.{s}.tokens", f"{s}.txt"],
            [f"{folder}/wiki.{s}.tokens", f"{folder}/{s}.txt", f"{folder}-v1/{folder}/wiki.{s}.tokens"],
        )
        for s in SPLITS
        if files.get(s) is None
    }
    source = SOURCES[name]
    found = resolve_files(name, wanted, source, path=path, data_dir=data_dir, download=download) if wanted else {}
    paths = {s: Path(files[s]) if files.get(s) is not None else found[s] for s in SPLITS}  # type: ignore[arg-type]
    texts = {s: read_text(paths[s]) for s in SPLITS}
    meta = {
        "source": name,
        "files": {s: str(paths[s].resolve()) for s in SPLITS},
        "split_rule": "official wiki.{train,valid,test}.tokens",
        "test_is_valid": False,
        "chars": {s: len(texts[s]) for s in SPLITS},
    }
    return Corpus(name, texts["train"], texts["valid"], texts["test"], meta)

"""Penn Treebank, Mikolov's language-modelling version (``simple-examples``).

About 929k / 73k / 82k words, a 10k vocabulary with ``<unk>`` already in the
text. Derived from LDC's Penn Treebank: research and evaluation use only.
"""

from __future__ import annotations

from pathlib import Path

from .base import Corpus, read_text
from .fetch import Source, resolve_files

SPLITS = ("train", "valid", "test")

SOURCE = Source(
    url="http://www.fit.vutbr.cz/~imikolov/rnnlm/simple-examples.tgz",
    own_names={f"ptb.{s}.txt": f"simple-examples/data/ptb.{s}.txt" for s in SPLITS},
    sha256={
        "ptb.train.txt": "fcea919f6cf83f35d4d00c6cbf08040d13d4155226340912e2fef9c9c4102cbf",
        "ptb.valid.txt": "c9fe6985fe0d4ccb578183407d7668fc6066c20700cb4cf87d8ff1cc34df1bf2",
        "ptb.test.txt": "dd65dff31e70846b2a6030a87482edcd5d199130cdcfa1f3dccbb033728deee0",
    },
)


def load_ptb(
    *,
    path: str | Path | None,
    data_dir: str | Path | None,
    download: bool,
    files: dict[str, str | Path | None],
) -> Corpus:
    """Load ``ptb.{train,valid,test}.txt``; ``files`` overrides the lookup of any split."""
    wanted = {
        s: ([f"ptb.{s}.txt"], [f"ptb.{s}.txt", f"simple-examples/data/ptb.{s}.txt"])
        for s in SPLITS
        if files.get(s) is None
    }
    found = resolve_files("ptb", wanted, SOURCE, path=path, data_dir=data_dir, download=download) if wanted else {}
    paths = {s: Path(files[s]) if files.get(s) is not None else found[s] for s in SPLITS}  # type: ignore[arg-type]
    texts = {s: read_text(paths[s]) for s in SPLITS}
    meta = {
        "source": "ptb",
        "files": {s: str(paths[s].resolve()) for s in SPLITS},
        "split_rule": "official ptb.{train,valid,test}.txt",
        "test_is_valid": False,
        "chars": {s: len(texts[s]) for s in SPLITS},
    }
    return Corpus("ptb", texts["train"], texts["valid"], texts["test"], meta)

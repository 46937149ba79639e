"""Finding corpus files on disk, and downloading them from their canonical source when absent.

Local lookup, in order, for a corpus called ``name``:

1. ``path`` (a folder given for this corpus),
2. ``data_dir`` (argument), 3. ``$XVARIANTS_DATA_DIR``,
4. ``<repo_root>/../shared/data`` (the project's read-only shared corpora),
5. the download folder ``$XDG_CACHE_HOME/xvariants/data`` (default ``~/.cache/...``).

In each base folder ``D`` the corpus's own file names are looked for in ``D/<name>``
(e.g. ``D/ptb/ptb.train.txt``, ``D/shakespeare/input.txt``), and its distinctive
names in ``D`` itself (e.g. ``D/tinyshakespeare.txt``, ``D/wikitext-2/valid.txt``).
Downloads go to ``<first of data_dir, $XVARIANTS_DATA_DIR, cache folder>/<name>``
under the corpus's own file names, so the next lookup finds them.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.request
import zipfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from xvariants.atomic import write_atomic

from .base import ChecksumError, CorpusNotFoundError

DATA_DIR_ENV = "XVARIANTS_DATA_DIR"
REPO_ROOT = Path(__file__).resolve().parents[3]
SHARED_DATA_DIR = REPO_ROOT.parent / "shared" / "data"
DOWNLOAD_TIMEOUT_S = 60
_CHUNK = 1 << 20


def default_download_dir() -> Path:
    cache_home = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache_home) / "xvariants" / "data"


@dataclass(frozen=True)
class Source:
    """Where a corpus's files come from and what they are called.

    ``own_names`` maps each local file name the loader reads (as written by the
    download) to the name of that file inside the archive at ``url``, or ``""``
    when ``url`` is the file itself. ``sha256`` gives published checksums of
    local files, checked on download.
    """

    url: str
    own_names: dict[str, str]
    sha256: dict[str, str] = field(default_factory=dict)


def base_dirs(data_dir: str | Path | None) -> list[Path]:
    """The base folders searched, in order (see the module docstring)."""
    dirs: list[Path] = []
    if data_dir:
        dirs.append(Path(data_dir))
    if os.environ.get(DATA_DIR_ENV):
        dirs.append(Path(os.environ[DATA_DIR_ENV]))
    dirs.append(SHARED_DATA_DIR)
    dirs.append(default_download_dir())
    return dirs


def candidate_paths(
    name: str,
    own_names: Iterable[str],
    root_names: Iterable[str],
    *,
    path: str | Path | None,
    data_dir: str | Path | None,
) -> list[Path]:
    """Every place a file may be, in lookup order."""
    own_names, root_names = list(own_names), list(root_names)
    places: list[Path] = []
    if path is not None:
        places += [Path(path) / n for n in own_names]
    for base in base_dirs(data_dir):
        places += [base / name / n for n in own_names]
        places += [base / n for n in root_names]
    return places


def find_file(candidates: Iterable[Path]) -> Path | None:
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    return None


def download_dir(name: str, data_dir: str | Path | None) -> Path:
    """The folder downloads of corpus ``name`` go to."""
    base = data_dir or os.environ.get(DATA_DIR_ENV) or default_download_dir()
    return Path(base) / name


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _write_atomic(stream: BinaryIO, dest: Path, expected_sha256: str | None, origin: str) -> None:
    """Copy ``stream`` to ``dest`` atomically, checking its sha256 before it appears."""

    def copy(out) -> None:
        digest = hashlib.sha256()
        for chunk in iter(lambda: stream.read(_CHUNK), b""):
            digest.update(chunk)
            out.write(chunk)
        if expected_sha256 and digest.hexdigest() != expected_sha256:
            raise ChecksumError(
                f"checksum mismatch for {dest.name} from {origin}: expected sha256 "
                f"{expected_sha256}, got {digest.hexdigest()}; the download is corrupt or "
                f"not the published file, nothing was written to {dest}"
            )

    write_atomic(dest, copy)


@contextmanager
def _open_member(archive: Path, member: str) -> Iterator[BinaryIO]:
    """Stream ``member`` out of a zip or tar archive; ``KeyError`` if it is not there."""
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf, zf.open(member) as stream:
            yield stream  # type: ignore[misc]
        return
    if tarfile.is_tarfile(archive):
        with tarfile.open(archive) as tf:
            for info in tf:
                if info.isfile() and info.name.removeprefix("./") == member.removeprefix("./"):
                    stream = tf.extractfile(info)
                    assert stream is not None
                    with stream:
                        yield stream
                    return
        raise KeyError(member)
    raise CorpusNotFoundError(f"the download saved at {archive} is neither a zip nor a tar archive")


def fetch(source: Source, dest_dir: Path) -> None:
    """Download ``source.url`` and place its files in ``dest_dir`` under their own names.

    The download goes to a temporary file first; each file is then checked
    against its known sha256 and moved into place atomically, so an interrupted
    or corrupt download never leaves a file that looks complete.
    """
    dest_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=dest_dir, prefix=".download.", suffix=".part")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        with urllib.request.urlopen(source.url, timeout=DOWNLOAD_TIMEOUT_S) as response:
            with tmp.open("wb") as out:
                shutil.copyfileobj(response, out, _CHUNK)
        for local, member in source.own_names.items():
            expected = source.sha256.get(local)
            if member == "":
                with tmp.open("rb") as stream:
                    _write_atomic(stream, dest_dir / local, expected, source.url)
                continue
            try:
                with _open_member(tmp, member) as stream:
                    _write_atomic(stream, dest_dir / local, expected, f"{source.url} ({member})")
            except KeyError:
                raise CorpusNotFoundError(
                    f"the archive from {source.url} has no member {member!r}; cannot make {dest_dir / local}"
                ) from None
    finally:
        tmp.unlink(missing_ok=True)


def resolve_files(
    name: str,
    wanted: dict[str, tuple[list[str], list[str]]],
    source: Source,
    *,
    path: str | Path | None,
    data_dir: str | Path | None,
    download: bool,
) -> dict[str, Path]:
    """Find the local files of a corpus, downloading them if some are missing.

    ``wanted`` maps a key (e.g. a split name) to ``(own_names, root_names)``:
    the file's names inside the corpus's own folder (the first is the name a
    download writes) and its names directly in a base folder. Raises
    ``CorpusNotFoundError`` saying what to download and where to put it when a
    file can be neither found nor downloaded.
    """

    def lookup() -> dict[str, Path | None]:
        return {
            key: find_file(candidate_paths(name, own, roots, path=path, data_dir=data_dir))
            for key, (own, roots) in wanted.items()
        }

    found = lookup()
    problem = ""
    if any(p is None for p in found.values()) and download:
        try:
            fetch(source, download_dir(name, data_dir))
        except CorpusNotFoundError:
            raise
        except (urllib.error.URLError, OSError) as error:
            problem = f"Downloading {source.url} failed ({error}). "
        found = lookup()
    missing = [key for key, p in found.items() if p is None]
    if missing:
        names = [wanted[key][0][0] for key in missing]
        places = [
            p
            for key in missing
            for p in candidate_paths(name, *wanted[key], path=path, data_dir=data_dir)
        ]
        tried = "\n  ".join(str(p) for p in places)
        if not download and not problem:
            problem = "Nothing was downloaded (download=False). "
        members = [f"{n} (archive member {source.own_names[n]})" if source.own_names.get(n) else n for n in names]
        raise CorpusNotFoundError(
            f"corpus {name!r}: {', '.join(names)} not found. {problem}"
            f"Download {source.url} and put {', '.join(members)} in {download_dir(name, data_dir)} "
            f"(or pass data_dir or path). Looked in:\n  {tried}"
        )
    return {key: p for key, p in found.items() if p is not None}

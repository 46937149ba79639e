"""Atomic file writes, the one way xvariants writes checkpoints and cache files: write a
temporary file beside the target, fsync, rename over the target. An interrupted write leaves
the previous file intact, never a truncated one; a process killed outright (``kill -9``)
leaves its temporary file, which :func:`remove_stale_temp_files` removes on the next start.
Plain Python (no torch), so the data package and the checkpoint code share it."""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO

#: names of the temporary files: ``.<target name>.<mkstemp's 8 random characters>.tmp``
#: (e.g. ``.last.ckpt.k3j_x9a2.tmp``)
ATOMIC_TEMP_NAME = re.compile(r"\..+\.[a-z0-9_]{8}\.tmp")


def write_atomic(path: str | os.PathLike, write: Callable[[IO[bytes]], object]) -> None:
    """Call ``write(file)`` on a temporary file beside ``path``, then move it into place.

    An ``OSError`` (disk full, quota, unwritable folder) names ``path``, not the temporary
    file, and keeps its errno and reason even when ``write`` wrapped it in another exception
    (torch.save raises RuntimeErrors around a failed write).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise OSError(exc.errno, exc.strerror, str(path)) from exc
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        if os.path.exists(tmp):
            os.unlink(tmp)
        system = _first_oserror(exc)
        if system is None:
            raise
        raise OSError(system.errno, system.strerror, str(path)) from exc


def _first_oserror(exc: BaseException | None) -> OSError | None:
    """The first ``OSError`` with an errno in ``exc`` or the exceptions it was raised from."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, OSError) and exc.errno is not None:
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def remove_stale_temp_files(folder: str | os.PathLike) -> list[Path]:
    """Delete the temporary files that interrupted :func:`write_atomic` calls left in
    ``folder`` (not its subfolders), and nothing else; returns what was removed.

    Call it before this run writes anything into ``folder``: a write in progress has a
    temporary file of the same form.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    stale = [p for p in folder.iterdir() if ATOMIC_TEMP_NAME.fullmatch(p.name) and p.is_file() and not p.is_symlink()]
    for p in stale:
        p.unlink(missing_ok=True)
    return stale

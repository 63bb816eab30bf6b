"""Files written whole or not at all.

``atomic_write`` fills a temporary file beside the target and renames it over the target only once
everything is written, so a write that fails (a full disk, Ctrl-C, an exception) leaves the
previous file exactly as it was and no temporary behind. A process killed outright (``kill -9``,
a Colab VM taken away) cannot clean up: the next write of the same target removes what it left.
"""
from __future__ import annotations

import os
import re
import tempfile
from contextlib import contextmanager
from pathlib import Path


def is_temporary_of(name: str, path: Path) -> bool:
    """Whether the file name ``name`` is one ``atomic_write`` gives its temporaries for ``path``:
    ``.<path's name>.<random>.tmp``."""
    return re.fullmatch(re.escape(f".{path.name}.") + r"[a-z0-9_]+\.tmp", name) is not None


def temporaries(path: str | Path) -> list[Path]:
    """The temporary files of ``atomic_write`` for ``path`` that exist now."""
    path = Path(path)
    return sorted(p for p in path.parent.iterdir() if is_temporary_of(p.name, path)) if path.parent.is_dir() else []


@contextmanager
def atomic_write(path: str | Path, mode: str = "w", **open_kwargs):
    """An open file (``mode`` and ``open_kwargs`` as for ``open``) that replaces ``path`` when the
    block ends without an exception.

    Creates ``path``'s folder if needed and first removes temporaries a killed write of ``path``
    left. On any exception the temporary is removed and ``path`` is unchanged; an ``OSError`` that
    names no file, or only the temporary, is raised again naming ``path`` (a full disk names no
    file, and the temporary's name means nothing to the user).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in temporaries(path):
        stale.unlink(missing_ok=True)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, mode, **open_kwargs) as f:
            yield f
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError) and e.errno is not None and (
                e.filename is None or is_temporary_of(os.path.basename(e.filename), path)):
            raise OSError(e.errno, e.strerror, str(path)) from e
        raise

"""Files written whole or not at all, and a write the system refuses named in one line.

``atomic_write`` fills a temporary file beside the target and renames it over the target only once
everything is written, so a write that fails (a full disk, Ctrl-C, an exception) leaves the
previous file exactly as it was and no temporary behind. A process killed outright (``kill -9``,
a Colab VM taken away) cannot clean up: the next write of the same target removes what it left.
``append_whole`` adds a line to a file (``metrics.jsonl``) whole or not at all. Files get the mode
``open(path, "w")`` gives them (``new_file_mode``; a replaced file keeps its own), not a temporary's 0600.

``refused_as`` is put around every other write (a model, a checkpoint, TensorBoard's files): when
the system refuses it (a full disk, a read-only folder, no permission, a quota) the error becomes
an ``OSError`` naming the file or folder the user knows, which the command line prints as one line
and exit code 4. Libraries report such a failure in their own ways: Python's and TensorBoard's as an
``OSError`` that names no file or a temporary one; safetensors and tokenizers (Rust) as their own
exception quoting ``(os error 28)``; torch's file writer as a ``RuntimeError`` that says only that
it failed (``unexpected pos 576 vs 534``, ``file write failed``), whose cause is then read off the
file system (``disk_errno``).
"""
from __future__ import annotations

import errno
import os
import re
import stat
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
    left. The file gets the mode of the file it replaces, or ``new_file_mode()``. On any exception
    the temporary is removed and ``path`` is unchanged; the system refusing the write is raised
    again naming ``path`` (``as_refusal``: a full disk names no file, and the temporary's name means
    nothing to the user).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in temporaries(path):
        stale.unlink(missing_ok=True)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.chmod(tmp, stat.S_IMODE(path.stat().st_mode) if path.is_file() else new_file_mode())
        with os.fdopen(fd, mode, **open_kwargs) as f:
            yield f
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        named = getattr(e, "filename", None)        # the temporary mkstemp could not make
        refused = as_refusal(e, path, tmp or (named if named and is_temporary_of(os.path.basename(named), path)
                                              else None))
        if refused is not None:
            raise refused from e
        raise


def new_file_mode() -> int:
    """The mode ``open(path, "w")`` gives a new file: 0o666 less the process's umask."""
    try:        # Linux: read, not set (a umask set for a moment would apply to other threads' files)
        with open("/proc/self/status", encoding="ascii") as f:
            umask = int(next(line for line in f if line.startswith("Umask:")).split()[1], 8)
    except (OSError, StopIteration):
        umask = os.umask(0o077)
        os.umask(umask)
    return 0o666 & ~umask


def with_new_file_modes(folder: Path) -> None:
    """Give the files a save just wrote into ``folder`` ``new_file_mode()``: safetensors writes
    through a temporary file of its own, which keeps mode 0600."""
    mode = new_file_mode()
    for file in folder.iterdir():
        if file.is_file():
            os.chmod(file, mode)


# errors of the system whose words libraries quote in their own exceptions (torch: "open file failed
# with strerror: Read-only file system")
QUOTED_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EFBIG)
# safetensors and tokenizers (Rust): "... No space left on device (os error 28)"
RUST_OS_ERROR = re.compile(r"\(os error (\d+)\)|Os \{ code: (\d+)")
# torch's zip writer, which keeps no errno when a write fails
TORCH_WRITER = ("inline_container.cc", "PytorchStreamWriter")
NEARLY_FULL = 1 << 20      # bytes: what a write that failed on a full disk leaves free, at most


def disk_errno(path: str | Path) -> int:
    """Why a write below ``path`` failed when the library did not say: ``EROFS`` on a read-only file
    system, ``ENOSPC`` when (nearly) no space is left, ``EACCES`` in a folder this user may not
    write to, else ``EIO``. Read before the failed write's partial files are removed."""
    folder = Path(path)
    while not folder.is_dir() and folder != folder.parent:
        folder = folder.parent
    if hasattr(os, "statvfs"):
        disk = os.statvfs(folder)
        if disk.f_flag & os.ST_RDONLY:
            return errno.EROFS
        if min(disk.f_bavail, disk.f_bfree) * disk.f_frsize < NEARLY_FULL:
            return errno.ENOSPC
    return errno.EIO if os.access(folder, os.W_OK) else errno.EACCES


def refused_errno(error: BaseException, path: str | Path) -> int | None:
    """The errno of a write to ``path`` that the system refused, as ``error`` reports it (see the
    module's docstring); None when ``error`` is not such a refusal."""
    if isinstance(error, OSError):
        return error.errno
    text = str(error)
    quoted = RUST_OS_ERROR.search(text)
    if quoted:
        return int(quoted.group(1) or quoted.group(2))
    if isinstance(error, RuntimeError) and any(marker in text for marker in TORCH_WRITER):
        return next((number for number in QUOTED_ERRNOS if os.strerror(number) in text), None) or disk_errno(path)
    return None


def is_within(name: str | Path, folder: str | Path) -> bool:
    return Path(os.path.abspath(name)).is_relative_to(os.path.abspath(folder))


def as_refusal(error: BaseException, path: str | Path, scratch: str | Path | None = None) -> OSError | None:
    """``error`` as an ``OSError`` naming ``path``, where it is the system refusing a write to
    ``path`` (made through ``scratch``, a temporary file or folder, if given); None for any other
    error, and for an ``OSError`` that names another file of its own (a folder that could not be
    made), which already says where."""
    number = refused_errno(error, scratch or path)
    if number is None:
        return None
    if isinstance(error, OSError) and error.filename is not None and not (
            is_within(error.filename, path) or scratch is not None and is_within(error.filename, scratch)):
        return None
    strerror = error.strerror if isinstance(error, OSError) and error.strerror else os.strerror(number)
    return OSError(number, strerror, str(path))


@contextmanager
def refused_as(path: str | Path, scratch: str | Path | None = None):
    """A block that writes ``path`` (through ``scratch``, if given): the system refusing one of its
    writes is raised as an ``OSError`` naming ``path`` (``as_refusal``); other errors pass as they are."""
    try:
        yield
    except Exception as e:
        refused = as_refusal(e, path, scratch)
        if refused is None:
            raise
        raise refused from e


def append_whole(path: str | Path, text: str) -> None:
    """Append ``text`` (UTF-8) to ``path``, creating it, whole or not at all: a write the system cuts
    short (a full disk) is taken back, so a reader never meets half a line, and is raised as an
    ``OSError`` naming ``path``."""
    data = memoryview(text.encode("utf-8"))
    with refused_as(path):
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
        try:
            start = os.lseek(fd, 0, os.SEEK_END)
            try:
                while data:
                    data = data[os.write(fd, data):]
            except BaseException:
                os.ftruncate(fd, start)
                raise
        finally:
            os.close(fd)

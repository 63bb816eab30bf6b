"""Run files read and written safely: each written whole or not at all, a refused write named in one line,
and each checked whole before it is used.

``atomic_write`` replaces a file and ``append_whole`` adds a line, each whole or not at all. ``refused_as``
turns a write the system refuses (full disk, read-only folder, no permission, quota), however a library
reports it, into an ``OSError`` naming the file the user knows: one line and exit code 4 on the command line.
``check_file``/``check_folder`` raise ``DamagedFile`` (one sentence: the file, what is wrong, what to do) for a
file missing, empty, cut short or overwritten, instead of a library's traceback or silent default.
"""
from __future__ import annotations

import errno
import json
import os
import re
import stat
import tempfile
import zipfile
from contextlib import contextmanager
from pathlib import Path


def is_temporary_of(name: str, path: Path) -> bool:
    """Whether ``name`` is that of an ``atomic_write`` temporary for ``path``: ``.<path's name>.<random>.tmp``."""
    return re.fullmatch(re.escape(f".{path.name}.") + r"[a-z0-9_]+\.tmp", name) is not None


@contextmanager
def atomic_write(path: str | Path, mode: str = "w", **open_kwargs):
    """An open file (``mode``, ``open_kwargs`` as for ``open``) that replaces ``path`` when the block ends without an
    exception, with the replaced file's mode or ``new_file_mode()``. On any exception ``path`` is unchanged and no
    temporary is left; a refused write is an ``OSError`` naming ``path`` (``as_refusal``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.iterdir():     # temporaries left by a killed write (kill -9, a Colab VM taken away)
        if is_temporary_of(stale.name, path):
            stale.unlink(missing_ok=True)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.chmod(tmp, stat.S_IMODE(path.stat().st_mode) if path.is_file() else new_file_mode())  # not mkstemp's 0600
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
    """Give the files in ``folder`` ``new_file_mode()`` (safetensors writes through a temporary left at 0600)."""
    mode = new_file_mode()
    for file in folder.iterdir():
        if file.is_file():
            os.chmod(file, mode)


# errors whose words libraries quote (torch: "open file failed with strerror: Read-only file system")
QUOTED_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EFBIG)
# safetensors and tokenizers (Rust) raise no OSError, only this text: "... No space left on device (os error 28)"
RUST_OS_ERROR = re.compile(r"\(os error (\d+)\)")
# torch's zip writer keeps no errno ("unexpected pos 576 vs 534", "file write failed"): see disk_errno
TORCH_WRITER = ("inline_container.cc", "PytorchStreamWriter")
NEARLY_FULL = 1 << 20      # bytes: what a write that failed on a full disk leaves free, at most


def disk_errno(path: str | Path) -> int:
    """Why a write below ``path`` failed when the library did not say: ``EROFS`` (read-only), ``ENOSPC`` (nearly
    full), ``EACCES`` (not writable by this user), else ``EIO``. Call it before partial files are removed."""
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
    """The errno of a write to ``path`` that the system refused, as ``error`` reports it; None for other errors."""
    if isinstance(error, OSError):
        return error.errno
    text = str(error)
    quoted = RUST_OS_ERROR.search(text)
    if quoted:
        return int(quoted.group(1))
    if isinstance(error, RuntimeError) and any(marker in text for marker in TORCH_WRITER):
        return next((number for number in QUOTED_ERRNOS if os.strerror(number) in text), None) or disk_errno(path)
    return None


def is_within(name: str | Path, folder: str | Path) -> bool:
    return Path(os.path.abspath(name)).is_relative_to(os.path.abspath(folder))


def as_refusal(error: BaseException, path: str | Path, scratch: str | Path | None = None) -> OSError | None:
    """``error`` as an ``OSError`` naming ``path`` where the system refused a write to it (through ``scratch``, a
    temporary, if given); None for other errors and for an ``OSError`` already naming another file of its own."""
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
    """Append ``text`` (UTF-8) to ``path``, creating it, whole or not at all: a write cut short (full disk) is
    taken back, so no reader meets half a line, and raised as an ``OSError`` naming ``path``."""
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


# ---------------------------------------------------------------- whether a run file is whole

class DamagedFile(ValueError):
    """A file of a run folder that cannot be used; the message names it, what is wrong and what to do."""

    def __init__(self, path: str | Path, problem: str, fix: str):
        super().__init__(f"{path} {problem}; {fix}")
        self.path = Path(path)


def first_line(error: Exception) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def json_problem(path: Path) -> str | None:
    try:
        json.loads(path.read_bytes().decode("utf-8-sig"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        return f"is damaged: not JSON ({first_line(e)})"
    return None


def json_lines_problem(path: Path) -> str | None:
    for number, line in enumerate(path.read_bytes().splitlines(), start=1):
        try:
            record = json.loads(line.decode("utf-8")) if line.strip() else {}
        except (UnicodeDecodeError, json.JSONDecodeError):
            record = None
        if not isinstance(record, dict):
            return f"is damaged: line {number} is not a JSON record (cut short or overwritten)"
    return None


def safetensors_problem(path: Path) -> str | None:
    import safetensors
    from safetensors import safe_open
    error = getattr(safetensors, "SafetensorError", Exception)  # importable by that name in newer releases only
    try:
        with safe_open(str(path), framework="pt"):     # checks the header matches the bytes, reading none
            pass
    except error as e:
        return f"is damaged: not a whole safetensors file ({first_line(e)})"
    return None


def torch_file_problem(path: Path) -> str | None:
    try:         # torch.save writes a zip archive; its directory is at the end, so a file cut short has none
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except zipfile.BadZipFile:
        return "is damaged: not a whole torch file (no zip directory at its end: cut short or overwritten)"
    if not any(name.endswith("data.pkl") for name in names):
        return "is damaged: a zip archive, but not a torch file"
    return None


def text_problem(path: Path) -> str | None:
    try:
        path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        return f"is damaged: not UTF-8 text ({first_line(e)})"
    return None


# by file name suffix: what makes a file of that kind whole
CHECKS = {".json": json_problem, ".jsonl": json_lines_problem, ".safetensors": safetensors_problem,
          ".bin": torch_file_problem, ".pt": torch_file_problem, ".pth": torch_file_problem,
          ".pkl": torch_file_problem, ".txt": text_problem}


def problem_of(path: str | Path, size: int | None = None) -> str | None:
    """What is wrong with the file ``path`` ("is missing", "is empty", "is damaged: ..."), or None if it looks
    whole; ``size``, if known, is the size it was written with."""
    path = Path(path)
    if not path.exists():
        return "is missing"
    if not path.is_file():
        return "is a folder where a file should be"
    actual = path.stat().st_size
    if actual == 0:
        return "is empty"
    if size is not None and actual != size:
        how = "cut short" if actual < size else "overwritten"
        return f"is damaged: {actual:,} bytes where {size:,} were written ({how})"
    check = CHECKS.get(path.suffix.lower())
    return check(path) if check else None


def check_file(path: str | Path, fix: str, size: int | None = None) -> None:
    """Raise ``DamagedFile`` (with ``fix``, what to do) if the file ``path`` is not whole."""
    problem = problem_of(path, size)
    if problem:
        raise DamagedFile(path, problem, fix)


def check_folder(folder: str | Path, required: list[str], fix: str) -> None:
    """The files ``required`` (names in ``folder``) are there, and every file of ``folder`` is whole."""
    folder = Path(folder)
    present = sorted(p.name for p in folder.iterdir() if p.is_file())
    for name in dict.fromkeys([*required, *present]):
        check_file(folder / name, fix)

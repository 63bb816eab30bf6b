"""Whether a file of a run folder is whole, checked before anything is read from it or written: a file
missing, empty, cut short or overwritten raises ``DamagedFile`` (one sentence: the file, what is wrong, what to
do) instead of a library's traceback or silent default. Only what tells is read (``CHECKS``).
"""
from __future__ import annotations

import json
import zipfile
from pathlib import Path


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

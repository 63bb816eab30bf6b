"""Kaggle both ways, through the kaggle command: the competition's files down, a checked result.csv up.
Its credentials: ``TOKEN_HELP`` (``~/.config/kaggle/kaggle.json`` works as well as ``~/.kaggle/kaggle.json``)."""
from __future__ import annotations

import shutil
import subprocess
import zipfile
from pathlib import Path

from .data import QAData
from .files import atomic_write
from .submission import SubmissionError, check_result_csv

COMPETITION = "ml2022spring-hw7"
TOKEN_HELP = ("put your API token in ~/.kaggle/kaggle.json (kaggle.com → Settings → API → Create New Token) "
              "or set KAGGLE_USERNAME and KAGGLE_KEY, and accept the competition's rules on its page")


class KaggleError(RuntimeError):
    """The kaggle command is missing or refused; the message says what to do."""


def kaggle(*args: str) -> str:
    """Run ``kaggle *args``; its output, or a KaggleError with its last line and what to do."""
    command = shutil.which("kaggle")
    if command is None:
        raise KaggleError(f"the kaggle command is not installed: pip install kaggle, then {TOKEN_HELP}")
    done = subprocess.run([command, *args], capture_output=True, text=True)
    if done.returncode != 0:
        said = (done.stderr.strip() or done.stdout.strip() or f"exit code {done.returncode}").splitlines()[-1]
        raise KaggleError(f"kaggle {' '.join(args[:2])} failed: {said}. If it is about credentials or access: "
                          f"{TOKEN_HELP}")
    return done.stdout


def download(data_dir: str | Path = "data") -> list[Path]:
    """The competition's files into ``data_dir``: its zip downloaded, the JSON files taken out of it."""
    data_dir = Path(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    kaggle("competitions", "download", "-c", COMPETITION, "-p", str(data_dir))
    with zipfile.ZipFile(data_dir / f"{COMPETITION}.zip") as archive:
        members = [name for name in archive.namelist() if name.endswith(".json")]
        for member in members:
            with atomic_write(data_dir / Path(member).name, "wb") as f:
                f.write(archive.read(member))
    return [data_dir / Path(member).name for member in members]


def submit(csv_path: str | Path, test_data: QAData, message: str) -> str:
    """Check ``csv_path`` against ``test_data`` and submit it; kaggle's answer. A SubmissionError sends nothing."""
    problems = check_result_csv(csv_path, test_data)
    if problems:
        raise SubmissionError(csv_path, problems + ["nothing was sent to Kaggle"])
    return kaggle("competitions", "submit", "-c", COMPETITION, "-f", str(csv_path), "-m", message)

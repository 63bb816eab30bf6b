"""Files written as the user writes files: every file and folder that a run, predict, evaluate,
ensemble and ask write gets the mode ``open(path, "w")`` and ``mkdir`` give it under the user's
umask, however it is written (a temporary renamed into place, safetensors' own temporary, torch,
tokenizers, TensorBoard), and a file that replaces one keeps that file's mode. Swept over every
write site of tests/test_writes.py, under umask 022 (a lab server, a shared Drive folder) and 077.
"""
import importlib.util
import os
import re
import stat

import pytest

from hw7qa.__main__ import main
from test_writes import KNOBS, SITES, commands, described
from writes import WriteFaults

KEPT = 0o640        # a mode the user gave a file; neither umask gives it


@pytest.fixture(params=[0o022, 0o077], ids=["umask-022", "umask-077"])
def umask(request):
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def wrong_modes(root, umask: int, kept=()) -> list[str]:
    """Files and folders under ``root`` whose mode is not what ``open`` / ``mkdir`` give under
    ``umask`` (``KEPT`` for the files ``kept``)."""
    wrong = []
    for path in [root, *root.rglob("*")]:
        mode = stat.S_IMODE(path.lstat().st_mode)
        expected = 0o777 & ~umask if path.is_dir() else KEPT if path in kept else 0o666 & ~umask
        if mode != expected:
            wrong.append(f"{path.relative_to(root.parent)}: {oct(mode)}, expected {oct(expected)}")
    return wrong


def test_every_file_and_folder_gets_the_mode_the_user_would_give_it(umask, tmp_path, monkeypatch, capsys):
    run, ens = tmp_path / "run", tmp_path / "ens"
    tensorboard = importlib.util.find_spec("tensorboard") is not None     # its files too, where it is installed
    with monkeypatch.context() as patched:
        faults = WriteFaults(patched)                      # counts the writes: which sites were swept
        assert main(["demo", "--output-dir", str(run), "--set", *KNOBS, *["log_with=tensorboard"] * tensorboard]) == 0
        for command in commands(run, ens).values():
            assert main(command) == 0
        assert main(["ask", str(run), "--question", "甲在哪裡", "--paragraph", "乙說甲在丙"]) == 0
    swept = {name for name, pattern in SITES.items()
             if any(re.fullmatch(pattern, described(w, run, ens)) for w in faults.writes)}
    assert swept == SITES.keys() - (set() if tensorboard else {"tensorboard"})
    assert wrong_modes(run, umask) + wrong_modes(ens, umask) == []

    # the files a command replaces: the user's mode stays
    replaced = [run / "config.json", run / "metrics.jsonl", run / "result.csv", run / "dev_predictions.jsonl",
                ens / "result.csv", *(run / "logits").glob("*.npz")]
    for path in replaced:
        path.chmod(KEPT)
    for path in (run / "logits").glob("*.npz"):
        path.write_bytes(b"damaged")                       # a cache that cannot be read is written again
    before = {path: path.stat().st_mtime_ns for path in replaced}
    assert main(["train", "--resume", str(run)]) == 0      # config.json, metrics.jsonl, result.csv, logits
    for command in commands(run, ens).values():
        assert main(command) == 0
    assert [path for path in replaced if path.stat().st_mtime_ns == before[path]] == []   # each one written again
    assert wrong_modes(run, umask, replaced) + wrong_modes(ens, umask, replaced) == []
    capsys.readouterr()

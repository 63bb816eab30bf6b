"""The command line around files: where predict writes, exit codes, one-line errors."""
import errno
import json
import os
from pathlib import Path

import pytest

from conftest import SAMPLE, fail_writes
from hw7qa.__main__ import main, os_error_message


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A tiny demo run with its result.csv for the sample test file."""
    run = tmp_path_factory.mktemp("cli") / "run"
    assert main(["demo", "--output-dir", str(run), "--set", "epochs=1", "keep_checkpoints=0"]) == 0
    return run


def test_predict_on_another_file_never_replaces_the_runs_submission(run_dir, tmp_path, capsys):
    submission = (run_dir / "result.csv").read_bytes()
    test = json.loads((SAMPLE / "hw7_test.json").read_text(encoding="utf-8"))
    other = tmp_path / "other.json"
    other.write_text(json.dumps({**test, "questions": test["questions"][1:]}, ensure_ascii=False), encoding="utf-8")
    assert main(["predict", str(run_dir), "--file", str(other)]) == 0
    assert f"wrote {run_dir / 'result-other.csv'} ({len(test['questions']) - 1} answers)" in capsys.readouterr().out
    assert (run_dir / "result.csv").read_bytes() == submission
    # the run's own test file, also when given with --file, goes to result.csv
    (run_dir / "result.csv").unlink()
    assert main(["predict", str(run_dir), "--file", str(SAMPLE / "hw7_test.json")]) == 0
    assert (run_dir / "result.csv").read_bytes() == submission


def test_predict_exits_1_when_the_written_csv_fails_its_check(run_dir, tmp_path, capsys):
    # an answer made only of commas is empty once Kaggle's commas are removed
    commas = {"questions": [{"id": 0, "paragraph_id": 0, "question_text": "問?", "answer_text": None,
                             "answer_start": None, "answer_end": None}], "paragraphs": [",,,,,,"]}
    (tmp_path / "commas.json").write_text(json.dumps(commas), encoding="utf-8")
    assert main(["predict", str(run_dir), "--file", str(tmp_path / "commas.json")]) == 1
    err = capsys.readouterr().err
    assert f"error: {run_dir / 'result-commas.csv'} is not a valid submission, 1 problem(s):" in err
    assert "line 2: ID '0' has an empty answer" in err


@pytest.fixture
def read_only(tmp_path, monkeypatch):
    """A folder nothing can be created in. Root ignores permission bits, so creating a file or
    folder directly inside it raises what the system raises for everyone else: EACCES."""
    folder = tmp_path / "read-only"
    folder.mkdir()

    def refusing(real):
        def call(path, *args, **kwargs):
            if Path(path).parent == folder:
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.fspath(path))
            return real(path, *args, **kwargs)
        return call
    monkeypatch.setattr(os, "open", refusing(os.open))
    monkeypatch.setattr(os, "mkdir", refusing(os.mkdir))
    return folder


def last_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err.splitlines()[-1]


def files_in(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


def test_output_dir_and_out_in_a_read_only_folder(run_dir, read_only, capsys):
    assert main(["demo", "--output-dir", str(read_only / "run"), "--set", "epochs=1", "test_file="]) == 4
    assert last_error_line(capsys) == f"error: permission denied ({read_only / 'run'})"
    assert main(["predict", str(run_dir), "--out", str(read_only / "result.csv")]) == 4
    assert last_error_line(capsys) == f"error: permission denied ({read_only / 'result.csv'})"
    assert not any(read_only.iterdir())


def test_a_file_where_a_folder_is_needed(run_dir, tmp_path, capsys):
    (tmp_path / "notes").write_text("mine", encoding="utf-8")
    assert main(["demo", "--output-dir", str(tmp_path / "notes" / "run"), "--set", "epochs=1", "test_file="]) == 2
    assert last_error_line(capsys) == f"error: a file is in the way where a folder is needed ({tmp_path / 'notes' / 'run'})"
    assert main(["predict", str(run_dir), "--out", str(tmp_path / "notes" / "result.csv")]) == 2
    assert last_error_line(capsys) == f"error: a file is in the way where a folder is needed ({tmp_path / 'notes'})"
    assert files_in(tmp_path) == {"notes": b"mine"}


def test_out_that_is_a_folder(run_dir, tmp_path, capsys):
    (tmp_path / "submissions").mkdir()
    assert main(["predict", str(run_dir), "--out", str(tmp_path / "submissions")]) == 2
    assert last_error_line(capsys) == f"error: this is a folder; a file name is needed ({tmp_path / 'submissions'})"
    assert [p.name for p in tmp_path.iterdir()] == ["submissions"] and not any((tmp_path / "submissions").iterdir())


def test_full_disk_keeps_the_previous_result_csv(run_dir, full_disk, capsys):
    before = files_in(run_dir)
    assert main(["predict", str(run_dir)]) == 4
    assert last_error_line(capsys) == f"error: no space left on the disk ({run_dir / 'result.csv'})"
    assert files_in(run_dir) == before                      # result.csv as it was, no temporary left


def test_ctrl_c_prints_one_line_and_exits_130(run_dir, monkeypatch, capsys):
    before = files_in(run_dir)
    fail_writes(monkeypatch, KeyboardInterrupt())            # Ctrl-C while result.csv is written
    assert main(["predict", str(run_dir)]) == 130
    assert last_error_line(capsys) == ("interrupted (Ctrl-C): no file is left half written and the logits computed so "
                                       f"far are kept; run it again: python -m hw7qa predict {run_dir}")
    assert files_in(run_dir) == before


@pytest.mark.parametrize("error, message, code", [
    (OSError(errno.EROFS, "Read-only file system", "/mnt/run"), "read-only file system (/mnt/run)", 4),
    (OSError(errno.EIO, "Input/output error", "/mnt/run/x"), "input/output error (/mnt/run/x)", 4),
    (OSError(errno.ENOTEMPTY, "Directory not empty", "a.partial", None, "a"), "directory not empty (a.partial → a)", 4),
    (FileNotFoundError(errno.ENOENT, "No such file or directory", "c.json"), "no such file or folder (c.json)", 2),
    (FileNotFoundError("run: no config.json; is this a run folder made by 'train'?"),
     "run: no config.json; is this a run folder made by 'train'?", 2),
])
def test_os_error_message(error, message, code):
    assert os_error_message(error) == (message, code)


def test_evaluate_on_another_file_keeps_the_runs_own_dev_predictions(tmp_path):
    from hw7qa.config import demo_config
    from hw7qa.train import train
    run = train(demo_config(str(tmp_path / "run"), {"epochs": 1, "test_file": ""}))
    assert main(["evaluate", str(run)]) == 0
    own = (run / "dev_predictions.jsonl").read_bytes()
    other = tmp_path / "extra.json"
    other.write_bytes((SAMPLE / "hw7_train.json").read_bytes())
    assert main(["evaluate", str(run), "--file", str(other)]) == 0
    assert (run / "dev_predictions.jsonl").read_bytes() == own
    assert len((run / "dev_predictions-extra.jsonl").read_text(encoding="utf-8").splitlines()) == 38

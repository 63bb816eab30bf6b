"""The command line around files: where predict writes, exit codes, one-line errors."""
import json

import pytest

from conftest import SAMPLE
from hw7qa.__main__ import main


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
    # the run's own test file, named or not, still goes to result.csv
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

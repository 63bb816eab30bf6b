"""hw7qa submit / download with the kaggle command replaced by a stub that records its arguments."""
import json
import sys
import zipfile

import pytest

from conftest import SAMPLE
from hw7qa.__main__ import main
from hw7qa.config import Config, save_config
from hw7qa.submission import write_result_csv

STUB = """#!{python}
import json, pathlib, sys, zipfile
log = pathlib.Path({log!r})
log.write_text(log.read_text() + json.dumps(sys.argv[1:]) + "\\n" if log.exists() else json.dumps(sys.argv[1:]) + "\\n")
if {fail!r}:
    print("401 - Unauthorized: check your kaggle.json", file=sys.stderr)
    sys.exit(1)
if sys.argv[2] == "download":
    folder = pathlib.Path(sys.argv[sys.argv.index("-p") + 1])
    with zipfile.ZipFile(folder / "ml2022spring-hw7.zip", "w") as z:
        for name in ("hw7_train.json", "hw7_dev.json", "hw7_test.json"):
            z.write({sample!r} + "/" + name, "data/" + name)
print("Successfully submitted to ML2022Spring-hw7" if sys.argv[2] == "submit" else "downloaded")
"""


def install_stub(tmp_path, monkeypatch, fail=False):
    """A ``kaggle`` on PATH that logs each call's arguments (one JSON list per line) to the returned path."""
    bin_dir, log = tmp_path / "bin", tmp_path / "kaggle-calls.jsonl"
    bin_dir.mkdir()
    stub = bin_dir / "kaggle"
    stub.write_text(STUB.format(python=sys.executable, log=str(log), fail=fail, sample=str(SAMPLE)))
    stub.chmod(0o755)
    monkeypatch.setenv("PATH", str(bin_dir), prepend=":")
    return log


def calls(log):
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


@pytest.fixture
def run(tmp_path, sample_test):
    """A run folder with a valid result.csv for the sample test file."""
    run = tmp_path / "run"
    run.mkdir()
    save_config(Config(test_file=str(SAMPLE / "hw7_test.json")), run / "config.json")
    write_result_csv(sample_test, ["答"] * len(sample_test.questions), run / "result.csv")
    return run


def test_submit_checks_then_calls_kaggle_with_the_csv(run, tmp_path, monkeypatch, capsys):
    log = install_stub(tmp_path, monkeypatch)
    assert main(["submit", str(run), "-m", "seed 0"]) == 0
    assert calls(log) == [["competitions", "submit", "-c", "ml2022spring-hw7", "-f", str(run / "result.csv"),
                           "-m", "seed 0"]]
    assert "Successfully submitted" in capsys.readouterr().out


def test_an_invalid_csv_is_never_sent(run, tmp_path, monkeypatch, capsys):
    log = install_stub(tmp_path, monkeypatch)
    (run / "result.csv").write_text("ID,Answer\n0,甲\n", encoding="utf-8")
    assert main(["submit", str(run)]) == 1
    assert "nothing was sent to Kaggle" in capsys.readouterr().err and calls(log) == []


def test_kaggle_missing_or_refusing_is_said_in_a_sentence(run, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert main(["submit", str(run)]) == 5
    assert "the kaggle command is not installed: pip install kaggle" in capsys.readouterr().err
    install_stub(tmp_path, monkeypatch, fail=True)
    assert main(["submit", str(run)]) == 5
    err = capsys.readouterr().err
    assert "401 - Unauthorized" in err and "kaggle.json" in err and len(err.strip().splitlines()) == 1


def test_download_takes_the_json_files_out_of_the_zip(tmp_path, monkeypatch):
    log = install_stub(tmp_path, monkeypatch)
    assert main(["download", "--dir", str(tmp_path / "data")]) == 0
    assert calls(log) == [["competitions", "download", "-c", "ml2022spring-hw7", "-p", str(tmp_path / "data")]]
    for name in ("hw7_train.json", "hw7_dev.json", "hw7_test.json"):
        assert (tmp_path / "data" / name).read_bytes() == (SAMPLE / name).read_bytes()
    assert zipfile.is_zipfile(tmp_path / "data" / "ml2022spring-hw7.zip")

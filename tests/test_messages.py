"""Every message names the file it is about: each problem ``check`` finds in a result.csv, and each
error of ``check``, ``submit``, ``predict --file``, ``evaluate --file``, ``ensemble --file``,
``ask --file`` and of the notebook's loaders (``load_qa_file``, ``check_result_csv``, ``load_config``,
``read_metrics``, ``read_questions``), for every kind of bad CSV, JSON, JSON lines and config file.
A message may go on over indented lines (the problems of one file); its first line names the file."""
import json

import pytest

from conftest import SAMPLE
from hw7qa.__main__ import main
from hw7qa.ask import read_questions
from hw7qa.config import Config, load_config, save_config
from hw7qa.data import load_qa_file
from hw7qa.report import read_metrics
from hw7qa.submission import check_result_csv

TEST = json.loads((SAMPLE / "hw7_test.json").read_text(encoding="utf-8"))
IDS = [str(q["id"]) for q in TEST["questions"]]
ROWS = [f"{qid},甲乙" for qid in IDS]
Q = TEST["questions"][0]

BAD_CSV = {                     # each a result.csv for the sample's test file with one kind of problem
    "quote never closed": "\n".join(["ID,Answer", ROWS[0].replace(",", ',"'), *ROWS[1:]]),
    "quote closed lines later": "\n".join(["ID,Answer", ROWS[0].replace(",", ',"'), *ROWS[1:3], '9,"', *ROWS[3:]]),
    "header": "\n".join(["Id;Answer", *ROWS]),
    "three fields": "\n".join(["ID,Answer", ROWS[0] + ",丙", *ROWS[1:]]),
    "unknown ID": "\n".join(["ID,Answer", *ROWS, "999999,甲"]),
    "ID twice": "\n".join(["ID,Answer", *ROWS, ROWS[0]]),
    "empty answer": "\n".join(["ID,Answer", f"{IDS[0]},", *ROWS[1:]]),
    "rows missing": "ID,Answer",
    "empty": "",
    "not UTF-8": b"ID,Answer\n\xff\xfe,\x80\n",
    "a folder": None,
    "missing": "missing",
}
BAD_JSON = {                    # each an HW7 or DRCD file with one kind of problem
    "not JSON": '{"questions": [',
    "not UTF-8": b'{"questions": [], "paragraphs": ["\xff"]}',
    "neither format": {"rows": []},
    "not lists": {"questions": {}, "paragraphs": []},
    "a question not an object": {**TEST, "questions": [1, *TEST["questions"]]},
    "a key missing": {**TEST, "questions": [{k: v for k, v in Q.items() if k != "question_text"}]},
    "an id twice": {**TEST, "questions": [Q, Q]},
    "paragraph out of range": {**TEST, "questions": [{**Q, "paragraph_id": 99}]},
    "an empty paragraph": {**TEST, "paragraphs": [" ", *TEST["paragraphs"][1:]]},
    "the answer elsewhere": {**TEST, "questions": [{**Q, "answer_text": "甲", "answer_start": 0, "answer_end": 0}]},
    "no questions": {"questions": [], "paragraphs": ["甲"]},
    "DRCD without context": {"data": [{"paragraphs": [{"qas": []}]}]},
    "a folder": None,
    "missing": "missing",
}
BAD_JSONL = {"not a record": '{"question": "甲"}\n[1]', "no questions": "\n"}
BAD_CONFIG = {"not JSON": "{", "not an object": "[]", "unknown key": '{"lr": 1, "nope": 2}', "a bad value": '{"lr": -1}'}
BAD_METRICS = {"a line cut short": '{"step": 1, "loss": 2.0}\n{"step": 2, "lo', "not a record": "[1]\n", "empty": ""}


def make(path, content):
    """``content`` at ``path``: text, bytes, a JSON value, a folder (None) or nothing ("missing")."""
    if content is None:
        path.mkdir()
    elif isinstance(content, (dict, list)):
        path.write_text(json.dumps(content, ensure_ascii=False), encoding="utf-8")
    elif content != "missing":
        path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    return path


def unnamed(text: str, path) -> list[str]:
    """The lines of ``text`` that start a message without naming ``path``."""
    return [line for line in text.splitlines() if line.strip() and not line[0].isspace() and str(path) not in line]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A run folder as far as these commands read it before the model: its config.json."""
    folder = tmp_path_factory.mktemp("run")
    save_config(Config(test_file=str(SAMPLE / "hw7_test.json"), dev_file=str(SAMPLE / "hw7_dev.json")),
                folder / "config.json")
    return folder


def command_says(argv, capsys) -> tuple[int, str]:
    capsys.readouterr()
    code = main([str(arg) for arg in argv])
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return code, out + err


def notebook_says(load, *args) -> str:
    """What a notebook shows of ``load(*args)``: the problems it returns, or its error."""
    try:
        return "\n".join(load(*args))
    except Exception as e:          # noqa: BLE001 -- any error the notebook would show
        return str(e)


@pytest.mark.parametrize("kind", BAD_CSV)
def test_every_problem_of_a_result_csv_names_it(kind, run, tmp_path, capsys):
    csv = make(tmp_path / "result.csv", BAD_CSV[kind])
    test = SAMPLE / "hw7_test.json"
    said = {"check": command_says(["check", csv, test], capsys),
            "submit": command_says(["submit", csv, "--test-file", test], capsys),
            "notebook": (None, notebook_says(check_result_csv, csv, load_qa_file(test)))}
    assert said["check"][0] in (1, 2) and said["submit"][0] in (1, 2)
    assert {name: unnamed(text, csv) for name, (_, text) in said.items()} == {name: [] for name in said}
    assert unnamed(command_says(["submit", csv], capsys)[1], csv) == []     # which test file it answers


@pytest.mark.parametrize("kind", BAD_JSON)
def test_every_error_of_a_data_file_names_it(kind, run, tmp_path, capsys):
    data = make(tmp_path / "data.json", BAD_JSON[kind])
    good_csv = make(tmp_path / "result.csv", "\n".join(["ID,Answer", *ROWS]))
    commands = [["check", good_csv, data], ["predict", run, "--file", data], ["evaluate", run, "--file", data],
                ["ensemble", run, run, "--file", data, "--output-dir", tmp_path / "ens"], ["ask", run, "--file", data]]
    said = {argv[0]: command_says(argv, capsys) for argv in commands}
    said["notebook"] = (None, notebook_says(load_qa_file, data))
    assert all(code == 2 for name, (code, _) in said.items() if name != "notebook"), said
    assert {name: unnamed(text, data) for name, (_, text) in said.items()} == {name: [] for name in said}


@pytest.mark.parametrize("kind, content", [*(("jsonl " + k, v) for k, v in BAD_JSONL.items()),
                                           *(("config " + k, v) for k, v in BAD_CONFIG.items()),
                                           *(("metrics " + k, v) for k, v in BAD_METRICS.items())])
def test_every_error_of_the_notebooks_loaders_names_the_file(kind, content, run, tmp_path, capsys):
    what = kind.split()[0]
    path = make(tmp_path / {"jsonl": "questions.jsonl", "config": "config.json", "metrics": "metrics.jsonl"}[what],
                content)
    load = {"jsonl": read_questions, "config": load_config, "metrics": lambda p: read_metrics(p.parent)}[what]
    said = notebook_says(load, path)
    assert said and unnamed(said, path) == []
    if what == "jsonl":
        code, text = command_says(["ask", run, "--file", path], capsys)
        assert code == 2 and unnamed(text, path) == []

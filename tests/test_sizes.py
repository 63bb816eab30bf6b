"""Degenerate sizes a user can reach: each works, or is refused before anything is written, in one
line that names the file and what to change, with exit code 2 and no traceback — for train,
predict, evaluate, ensemble and ask."""
import json
from types import SimpleNamespace

import numpy as np
import pytest

from conftest import SAMPLE
from hw7qa.__main__ import main
from hw7qa.batches import EpochBatches
from hw7qa.inference import batch_rows
from hw7qa.report import read_metrics
from hw7qa.runfolder import list_checkpoints

ZERO_WIDTH = "\u200b\u200b"          # characters no tokenizer reads: a text that tokenizes to nothing
DEMO = {"output_dir": "{out}", "epochs": 1, "batch_size": 16, "train_file": f"{SAMPLE}/hw7_train.json",
        "dev_file": f"{SAMPLE}/hw7_dev.json", "test_file": f"{SAMPLE}/hw7_test.json"}


def train(**settings) -> list[str]:
    """``train`` of the demo preset (from any folder) with ``settings`` changed."""
    return ["train", "--config", "demo", "--set", *(f"{k}={v}" for k, v in {**DEMO, **settings}.items())]


def sample(name: str) -> dict:
    return json.loads((SAMPLE / f"hw7_{name}.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """The degenerate data files, and a trained demo run to predict, evaluate, ensemble and ask with."""
    base = tmp_path_factory.mktemp("sizes")
    train, dev, test = sample("train"), sample("dev"), sample("test")
    whole = [{**q, "answer_text": p, "answer_start": 0, "answer_end": len(p) - 1}   # no answer fits a window
             for q in train["questions"] for p in [train["paragraphs"][q["paragraph_id"]]]]
    made = {"empty": {"questions": [], "paragraphs": []},
            "no-qas": {"data": [{"paragraphs": [{"context": "甲乙丙", "qas": []}]}]},     # DRCD, no question
            "long": {**train, "questions": whole},
            "two": {**train, "questions": train["questions"][:2]},
            "one-dev": {**dev, "questions": dev["questions"][:1]},
            "one-test": {**test, "questions": test["questions"][:1]},
            "blank-paragraph": {**test, "paragraphs": [ZERO_WIDTH] + test["paragraphs"][1:]},
            "blank-question": {**test, "questions": [{**test["questions"][0], "question_text": ZERO_WIDTH}]},
            "blank-dev-question": {**dev, "questions": [{**dev["questions"][0], "question_text": ZERO_WIDTH}]}}
    for name, data in made.items():
        (base / f"{name}.json").write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    (base / "empty.jsonl").write_text("\n", encoding="utf-8")
    assert main(["demo", "--output-dir", str(base / "run"), "--set", "epochs=1", "batch_size=16"]) == 0
    return base


# command line ({f}: the files' folder, {out}: a new run or ensemble folder), exit code, and for a
# refusal the words of its one line ({f}/NAME: the file it names)
CASES = {
    "no training window": (train(train_file="{f}/long.json"), 2,
                           "{f}/long.json: no answer of its 38 questions fits in a window of max_length=128 tokens "
                           "(with its question); raise max_length"),
    "no training window, auto_batch": (train(train_file="{f}/long.json", auto_batch="true"), 2, "raise max_length"),
    "no training window, all windows": (train(train_file="{f}/long.json", train_windows="all",
                                              group_by_length="true"), 2, "{f}/long.json: no answer of its 38"),
    "no training question": (train(train_file="{f}/empty.json"), 2,
                             "train_file='{f}/empty.json': the file has no questions; point train_file at one"),
    "no dev question": (train(dev_file="{f}/no-qas.json"), 2,
                        "dev_file='{f}/no-qas.json': the file has no questions; point dev_file at one"),
    "no test question": (train(test_file="{f}/empty.json"), 2,
                         "test_file='{f}/empty.json': the file has no questions; point test_file at one"),
    "final fit, no dev question": (train(final_fit="true", dev_file="{f}/empty.json"), 2,
                                   "dev_file='{f}/empty.json': the file has no questions"),
    "final fit, no dev file": (train(final_fit="true", dev_file=""), 2,
                               "final_fit=true trains on train_file + dev_file, but dev_file is empty"),
    "test paragraph of nothing": (train(test_file="{f}/blank-paragraph.json"), 2,
                                  "{f}/blank-paragraph.json: paragraph 0 ('\\u200b\\u200b') holds nothing the tokenizer "
                                  "reads"),
    "fewer windows than a batch": (train(train_file="{f}/two.json", auto_batch="true", grad_accum=4), 0, None),
    "fewer windows than a batch, by length": (train(train_file="{f}/two.json", group_by_length="true"), 0, None),
    "every policy past the run's end": (train(eval_every=1000, save_every=1000, log_every=1000, eval_batch_size=1000,
                                              dev_file="{f}/one-dev.json", test_file="{f}/one-test.json"), 0, None),
    "predict, no question": (["predict", "{f}/run", "--file", "{f}/empty.json"], 2,
                             "--file='{f}/empty.json': the file has no questions; point --file at one"),
    "predict, paragraph of nothing": (["predict", "{f}/run", "--file", "{f}/blank-paragraph.json"], 2,
                                      "{f}/blank-paragraph.json: paragraph 0"),
    "predict, one question": (["predict", "{f}/run", "--file", "{f}/one-test.json"], 0, None),
    "predict, question of nothing": (["predict", "{f}/run", "--file", "{f}/blank-question.json"], 0, None),
    "evaluate, no question": (["evaluate", "{f}/run", "--file", "{f}/no-qas.json"], 2,
                              "--file='{f}/no-qas.json': the file has no questions"),
    "evaluate, one question": (["evaluate", "{f}/run", "--file", "{f}/one-dev.json", "--set", "eval_batch_size=1000"],
                               0, None),
    "evaluate, question of nothing": (["evaluate", "{f}/run", "--file", "{f}/blank-dev-question.json"], 0, None),
    "ensemble, no question": (["ensemble", "{f}/run", "{f}/run", "--file", "{f}/empty.json", "--output-dir", "{out}"],
                              2, "--file='{f}/empty.json': the file has no questions"),
    "ensemble, paragraph of nothing": (["ensemble", "{f}/run", "{f}/run", "--split", "test", "--file",
                                        "{f}/blank-paragraph.json", "--output-dir", "{out}"], 2,
                                       "{f}/blank-paragraph.json: paragraph 0"),
    "ask, no question": (["ask", "{f}/run", "--file", "{f}/empty.jsonl"], 2, "{f}/empty.jsonl: no questions"),
    "ask, no question (JSON)": (["ask", "{f}/run", "--file", "{f}/empty.json"], 2,
                                "{f}/empty.json: the file has no questions"),
    "ask, paragraph of nothing": (["ask", "{f}/run", "--question", "甲", "--paragraph", ZERO_WIDTH], 2,
                                  "paragraph 0 ('\\u200b\\u200b') holds nothing the tokenizer reads"),
    "ask, question of nothing": (["ask", "{f}/run", "--question", ZERO_WIDTH, "--paragraph", "甲乙"], 0, None),
}


@pytest.mark.parametrize("case", CASES)
def test_a_degenerate_size_works_or_is_refused_in_one_line(case, files, tmp_path, capsys):
    argv, code, words = CASES[case]
    out = tmp_path / "out"
    capsys.readouterr()
    assert main([arg.format(f=files, out=out) for arg in argv]) == code
    err = capsys.readouterr().err
    assert "Traceback" not in err
    if code == 2:
        line = err.strip().splitlines()[-1]               # the message is one line: its first is its last
        assert line.startswith("error: ") and words.format(f=files) in line, err
        assert not out.exists()                        # refused before anything was written
    elif argv[0] == "train":
        records = read_metrics(out)
        assert records[-1]["step"] == max(r["step"] for r in records) and "dev_em" in records[-1]   # evaluated at the end
        assert list_checkpoints(out) and (out / "model").is_dir() and (out / "result.csv").is_file()


def test_fewer_windows_than_processes():
    """Under ``accelerate launch``: a last training batch shorter than the processes is completed, so
    each process gets its share; an inference batch leaves a process without windows (it gathers none)."""
    batches = EpochBatches([0], 8, group_by_length=False, seed=0, num_processes=4)      # one window
    batches.start_epoch(0)
    assert list(batches) == [[0] * 8]
    one = SimpleNamespace(length=np.array([5]))
    assert [len(rows) for rank in range(4) for rows in batch_rows(one, 8, rank, 4)] == [1]

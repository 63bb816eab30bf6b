"""``hw7qa ask``: a run's answer to your own question, as predict would give it, with its n-best
alternatives; and a demo run's output carrying hw7qa's progress bars, not transformers' own."""
import contextlib
import csv
import io
import json

import pytest

from conftest import SAMPLE
from hw7qa.__main__ import main
from hw7qa.ask import ask, ask_many, load_reader
from hw7qa.models import quiet_transformers
from hw7qa.config import demo_config
from hw7qa.train import train_and_predict
from hw7qa.submission import csv_answer


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """A short demo run that also wrote its result.csv, and what training and predict wrote on stderr."""
    run_dir = tmp_path_factory.mktemp("ask") / "run"
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        train_and_predict(demo_config(str(run_dir), {"epochs": 3}))
    return run_dir, stderr.getvalue()


def result_csv(run_dir):
    with open(run_dir / "result.csv", encoding="utf-8") as f:
        return {row["ID"]: row["Answer"] for row in csv.DictReader(f)}


def test_train_and_predict_show_hw7qas_bars_not_transformers_own(demo_run):
    _, stderr = demo_run
    assert "train: 100%" in stderr and "test:" in stderr
    assert "Loading weights" not in stderr and "Writing model shards" not in stderr
    # the dev bar of each evaluation takes the train bar's line (nested, it moved the cursor up: a
    # frontend without widgets printed a new line for each of its updates instead)
    assert "dev:" in stderr and "\x1b[A" not in stderr


def test_a_users_own_transformers_calls_keep_their_bars():
    logging = pytest.importorskip("transformers.utils.logging")
    if not hasattr(logging, "set_tqdm_hook"):
        pytest.skip("transformers before 5: no tqdm hook, nothing silenced")
    with quiet_transformers():
        assert isinstance(logging.tqdm([1], disable=True), logging.EmptyTqdm)
    assert not isinstance(logging.tqdm([1], disable=True), logging.EmptyTqdm)


def test_ask_answers_as_predict_does_with_sorted_alternatives(demo_run, sample_test):
    run_dir, _ = demo_run
    written = result_csv(run_dir)
    for q in sample_test.questions[:3]:
        paragraph = sample_test.paragraph(q)
        answer = ask(run_dir, q.question_text, paragraph, n_best=5)
        assert answer.answer and answer.answer in paragraph
        assert csv_answer(answer.answer) == written[str(q.id)]
        scores = [alt.score for alt in answer.alternatives]
        assert 1 < len(scores) <= 5 and scores == sorted(scores, reverse=True)
        assert answer.alternatives[0].text == answer.answer
        assert all(alt.text in paragraph for alt in answer.alternatives)
        assert len({alt.text for alt in answer.alternatives}) == len(answer.alternatives)


def test_ask_many_answers_the_whole_test_file_as_predict(demo_run, sample_test):
    run_dir, _ = demo_run
    pairs = [(q.question_text, sample_test.paragraph(q)) for q in sample_test.questions]
    answers = ask_many(load_reader(run_dir), pairs, n_best=1)
    assert [csv_answer(a.answer) for a in answers] == [result_csv(run_dir)[str(q.id)] for q in sample_test.questions]
    assert all(len(a.alternatives) == 1 for a in answers)


def test_cli_asks_one_question_or_a_file(demo_run, sample_test, tmp_path, capsys):
    run_dir, _ = demo_run
    q = sample_test.questions[0]
    assert main(["ask", str(run_dir), "--question", q.question_text, "--paragraph", sample_test.paragraph(q),
                 "--n-best", "3"]) == 0
    printed = capsys.readouterr().out
    assert f"question: {q.question_text}" in printed and "answer:" in printed and " 3. " in printed
    lines = tmp_path / "mine.jsonl"
    lines.write_text("".join(json.dumps({"question": q.question_text, "paragraph": sample_test.paragraph(q)},
                                        ensure_ascii=False) + "\n" for q in sample_test.questions[:2]),
                     encoding="utf-8")
    assert main(["ask", str(run_dir), "--file", str(lines)]) == 0
    assert capsys.readouterr().out.count("question: ") == 2
    assert main(["ask", str(run_dir), "--file", str(SAMPLE / "hw7_test.json"), "--n-best", "1"]) == 0
    assert capsys.readouterr().out.count("question: ") == len(sample_test.questions)


@pytest.mark.parametrize("args, message", [
    (["--question", "誰？", "--paragraph", "甲乙"], "no-such-run: no such folder"),
    (["--question", " ", "--paragraph", "甲乙"], "the question is empty"),
    (["--question", "誰？", "--paragraph", ""], "the paragraph is empty"),
    (["--question", "誰？"], "give --question and --paragraph"),
    (["--file", "bad.jsonl"], 'bad.jsonl, line 2: expected {"question": "...", "paragraph": "..."}'),
])
def test_cli_ask_refuses_bad_input_in_one_sentence(demo_run, tmp_path, monkeypatch, capsys, args, message):
    run_dir, _ = demo_run
    monkeypatch.chdir(tmp_path)
    (tmp_path / "bad.jsonl").write_text('{"question": "誰？", "paragraph": "甲乙"}\n{"question": "誰？"}\n',
                                        encoding="utf-8")
    run = "no-such-run" if "no-such-run" in message else str(run_dir)
    assert main(["ask", run, *args]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_several_set_add_up_in_ask(demo_run, capsys):
    run_dir, _ = demo_run
    args = ["ask", str(run_dir), "--question", "誰？", "--paragraph", "甲乙丙丁戊己庚辛"]
    # the first --set is kept: the impossible max_length is refused (dropped, the command would run)
    assert main([*args, "--set", "max_length=4096", "--set", "max_answer_length=1"]) == 2
    assert "max_length=4096" in capsys.readouterr().err
    assert main([*args, "--set", "max_answer_length=1", "--set", "n_best=3"]) == 0
    answer = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("answer:"))
    assert len(answer.split()[1]) == 1            # max_answer_length=1: one token, one character here


@pytest.mark.parametrize("command", [["train"], ["predict", "RUN"], ["evaluate", "RUN"], ["ask", "RUN"], ["demo"]])
def test_every_command_that_takes_set_adds_them_up(command):
    from hw7qa.__main__ import build_parser
    args = build_parser().parse_args([*command, "--set", "a=1", "b=2", "--set", "c=3"])
    assert args.set == ["a=1", "b=2", "c=3"]

import csv
import errno
import os
import tempfile

import pytest

from hw7qa.metrics import char_f1, exact_match, score
from hw7qa.submission import check_result_csv, write_result_csv


def test_exact_match_removes_commas_like_kaggle():
    assert exact_match("1000", "1,000") == 1.0
    assert exact_match("NASA", "nasa") == 0.0
    assert exact_match("", "甲") == 0.0


def test_char_f1():
    assert char_f1("台北市", "台北") == pytest.approx(0.8)
    assert char_f1("甲", "乙") == 0.0
    assert char_f1("New York", "NewYork") == 1.0
    assert score(["台北市", "甲"], ["台北", "甲"]) == {"em": 0.5, "f1": pytest.approx(0.9)}
    with pytest.raises(ValueError):
        score(["a"], ["a", "b"])


def test_result_csv_rows_in_file_order_without_commas(tmp_path, sample_test):
    answers = [f"答案,{i}" for i in range(len(sample_test.questions))]
    answers[0] = '含"引號'
    path = write_result_csv(sample_test, answers, tmp_path / "out" / "result.csv")
    with open(path, encoding="utf-8", newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["ID", "Answer"]
    assert [r[0] for r in rows[1:]] == [str(q.id) for q in sample_test.questions]
    assert rows[1][1] == '含"引號' and rows[2][1] == "答案1"
    assert check_result_csv(path, sample_test) == []
    assert [p.name for p in path.parent.iterdir()] == ["result.csv"]     # no temporary file left


def test_interrupted_write_keeps_the_old_file(tmp_path, sample_test):
    path = tmp_path / "result.csv"
    path.write_text("old", encoding="utf-8")
    with pytest.raises(ValueError):
        write_result_csv(sample_test, ["only one"], path)
    assert path.read_text(encoding="utf-8") == "old"


def test_a_killed_writes_temporary_is_removed_by_the_next_write(tmp_path, sample_test):
    # what kill -9 during write_result_csv leaves: a hidden temporary beside result.csv
    fd, stale = tempfile.mkstemp(dir=tmp_path, prefix=".result.csv.", suffix=".tmp")
    os.write(fd, b"ID,Answer\n0,")
    os.close(fd)
    others = [".result.csv.bak", ".other.csv.abcd1234.tmp", "result-other.csv"]
    for name in others:
        (tmp_path / name).write_text("keep", encoding="utf-8")
    write_result_csv(sample_test, ["甲"] * len(sample_test.questions), tmp_path / "result.csv")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(others + ["result.csv"])
    assert all((tmp_path / name).read_text(encoding="utf-8") == "keep" for name in others)


def test_full_disk_keeps_the_old_file_and_names_it(tmp_path, sample_test, full_disk):
    path = tmp_path / "result.csv"
    path.write_text("old", encoding="utf-8")
    with pytest.raises(OSError) as err:
        write_result_csv(sample_test, ["甲"] * len(sample_test.questions), path)
    assert err.value.errno == errno.ENOSPC and err.value.filename == str(path)
    assert path.read_text(encoding="utf-8") == "old" and [p.name for p in tmp_path.iterdir()] == ["result.csv"]


def test_check_accepts_a_csv_with_a_byte_order_mark(tmp_path, sample_test):
    path = tmp_path / "excel.csv"
    rows = ["ID,Answer"] + [f"{q.id},甲" for q in sample_test.questions]
    path.write_text("\n".join(rows) + "\n", encoding="utf-8-sig")
    assert check_result_csv(path, sample_test) == []


def test_check_names_every_problem(tmp_path, sample_test):
    ids = [str(q.id) for q in sample_test.questions]
    lines = ["Id,Answer", f"{ids[0]},甲", f"{ids[0]},乙", "999,丙", f"{ids[1]},", f"{ids[2]},a,b"]
    path = tmp_path / "bad.csv"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    problems = "\n".join(check_result_csv(path, sample_test))
    assert "header" in problems
    assert f"ID '{ids[0]}' again (first on line 2)" in problems
    assert "ID '999' is not a question" in problems
    assert "empty answer" in problems
    assert "3 fields" in problems
    assert f"{len(ids) - 2} question(s)" in problems


def test_error_kinds():
    from hw7qa.report import error_kind
    assert error_kind("1,000", "1000") == "correct"
    assert error_kind("", "甲") == "empty"
    assert error_kind("台北市", "台北") == "boundary" and error_kind("北", "台北") == "boundary"
    assert error_kind("蔡", "蔡鍔", {"鍔"}) == "boundary"
    assert error_kind("李", "徐世勣", {"勣"}) == "rare-character"
    assert error_kind("高雄", "台北") == "wrong-span"
    assert error_kind("台北市政府", "台北") == "wrong-span"          # off by more than two characters


def test_unknown_characters(bert_tokenizer):
    from hw7qa.report import unknown_characters
    assert unknown_characters(bert_tokenizer, ["火星𠀋"]) >= {"𠀋"}

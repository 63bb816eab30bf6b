import json

import pytest

from conftest import save_hw7, shared_path
from hw7qa.data import DataError, Question, concat_data, load_qa_file, validate


def has_answers(data) -> bool:
    return all(q.answer_text is not None for q in data.questions)


def write(tmp_path, obj, name="f.json"):
    path = tmp_path / name
    path.write_text(json.dumps(obj, ensure_ascii=False), encoding="utf-8")
    return path


def hw7(questions, paragraphs=("甲乙丙丁戊己庚",)):
    return {"questions": questions, "paragraphs": list(paragraphs)}


def question(**changes):
    q = {"id": 0, "paragraph_id": 0, "question_text": "問?", "answer_text": "乙丙", "answer_start": 1, "answer_end": 2}
    q.update(changes)
    return q


def test_sample_files_load_with_their_features(sample_train, sample_dev, sample_test):
    assert has_answers(sample_train) and has_answers(sample_dev) and not has_answers(sample_test)
    assert 30 <= len(sample_train.questions) <= 60
    answers = [q.answer_text for q in sample_train.questions + sample_dev.questions]
    assert any("," in a for a in answers)
    assert any(a.startswith("「") for a in answers)
    assert any(any(c.isupper() for c in a) for a in answers)
    assert max(len(p) for p in sample_dev.paragraphs) > 600
    for data in (sample_train, sample_dev):
        for q in data.questions:
            assert data.paragraph(q)[q.answer_start:q.answer_end + 1] == q.answer_text


def test_valid_hw7_file_loads(tmp_path):
    data = load_qa_file(write(tmp_path, hw7([question()])), need_answers=True)
    assert data.questions[0].answer_text == "乙丙" and data.questions[0].answer_end == 2


def test_test_file_with_null_answers_loads_but_not_for_training(tmp_path):
    path = write(tmp_path, hw7([question(answer_text=None, answer_start=None, answer_end=None)]))
    assert not has_answers(load_qa_file(path))
    with pytest.raises(DataError, match="no answer"):
        load_qa_file(path, need_answers=True)


@pytest.mark.parametrize("bad, message", [
    (question(paragraph_id=5), "paragraph_id 5 out of range"),
    (question(answer_end=3), "not answer_text"),
    (question(answer_start=-1, answer_end=0), "not answer_text"),
    (question(question_text="  "), "empty question_text"),
    (question(question_text=3), "'question_text' is int, expected str"),
    (question(paragraph_id="0"), "'paragraph_id' is str, expected int"),
    (question(answer_start=None), "all set or all null"),
    ({k: v for k, v in question().items() if k != "answer_start"}, "missing key 'answer_start'"),
])
def test_each_validation_error_names_file_question_and_problem(tmp_path, bad, message):
    bad = dict(bad, id=7)
    path = write(tmp_path, hw7([question(id=1), bad]))
    with pytest.raises(DataError) as err:
        load_qa_file(path)
    text = str(err.value)
    assert str(path) in text and message in text and "7" in text


def test_test_file_without_answer_keys_loads_but_not_for_training(tmp_path):
    bare = {k: v for k, v in question().items() if not k.startswith("answer_")}
    path = write(tmp_path, hw7([bare]))
    assert load_qa_file(path).questions[0] == Question(0, "問?", 0)
    with pytest.raises(DataError, match=r"no answer in any of its 1 questions \(a test file\?\); training and"):
        load_qa_file(path, need_answers=True)
    answered = write(tmp_path, hw7([question(), {**bare, "id": 1}]))
    with pytest.raises(DataError, match="question id 1: no answer, but this file is used for training or evaluation"):
        load_qa_file(answered, need_answers=True)


def test_json_with_a_byte_order_mark_loads(tmp_path):
    path = tmp_path / "bom.json"
    path.write_text(json.dumps(hw7([question()]), ensure_ascii=False), encoding="utf-8-sig")
    assert path.read_bytes().startswith(b"\xef\xbb\xbf")
    assert load_qa_file(path, need_answers=True).questions == load_qa_file(write(tmp_path, hw7([question()]))).questions


def test_ids_are_unique_as_result_csv_writes_them(tmp_path):
    path = write(tmp_path, hw7([question(id=4), question(id="4")]))
    with pytest.raises(DataError, match=r"question id '4': duplicate id \(written as 4 in result.csv, like id 4\)"):
        load_qa_file(path)


def test_duplicate_ids_and_empty_paragraph(tmp_path):
    path = write(tmp_path, hw7([question(id=3), question(id=3)], paragraphs=["甲乙丙丁", " "]))
    with pytest.raises(DataError) as err:
        load_qa_file(path)
    assert "question id 3: duplicate id" in str(err.value) and "paragraph 1 is empty" in str(err.value)


def test_all_problems_reported_at_once(tmp_path):
    path = write(tmp_path, hw7([question(id=1, paragraph_id=9), question(id=2, answer_text="丁")]))
    with pytest.raises(DataError) as err:
        load_qa_file(path)
    assert "2 problem(s)" in str(err.value) and "id 1" in str(err.value) and "id 2" in str(err.value)


def test_not_json_and_unknown_format(tmp_path):
    (tmp_path / "broken.json").write_text("{", encoding="utf-8")
    with pytest.raises(DataError, match="not valid UTF-8 JSON"):
        load_qa_file(tmp_path / "broken.json")
    with pytest.raises(DataError, match="neither HW7 JSON"):
        load_qa_file(write(tmp_path, {"rows": []}))
    with pytest.raises(DataError, match="no such file"):
        load_qa_file(tmp_path / "missing.json")


def test_squad_reader_keeps_first_answer(tmp_path):
    squad = {"version": "1", "data": [{"title": "t", "paragraphs": [
        {"context": "ABC台北DEF", "qas": [{"id": "x-1", "question": "哪裡?", "answers": [
            {"text": "台北", "answer_start": 3}, {"text": "北", "answer_start": 4}]}]},
        {"context": "第二段", "qas": [{"id": "x-2", "question": "何?", "answers": []}]}]}]}
    data = load_qa_file(write(tmp_path, squad))
    first, second = data.questions
    assert (first.id, first.paragraph_id, first.answer_text, first.answer_start, first.answer_end) == ("x-1", 0, "台北", 3, 4)
    assert second.paragraph_id == 1 and second.answer_text is None


def test_save_hw7_round_trip(tmp_path, sample_train):
    save_hw7(sample_train, tmp_path / "copy.json")
    again = load_qa_file(tmp_path / "copy.json", need_answers=True)
    assert again.questions == sample_train.questions and again.paragraphs == sample_train.paragraphs


def test_drcd_dev_converts_to_hw7_2021_dev_question_for_question():
    drcd = load_qa_file(shared_path("data/drcd/DRCD_dev.json"), need_answers=True)
    hw7_dev = load_qa_file(shared_path("data/hw7-2021/hw7_dev.json"), need_answers=True)
    assert drcd.paragraphs == hw7_dev.paragraphs
    assert len(drcd.questions) == len(hw7_dev.questions) == 3524
    # HW7 renumbered and shuffled the questions; a question is its paragraph and its text.
    converted = {(q.paragraph_id, q.question_text): q for q in drcd.questions}
    assert len(converted) == 3524
    for q in hw7_dev.questions:
        c = converted[(q.paragraph_id, q.question_text)]
        assert (c.answer_text, c.answer_start, c.answer_end) == (q.answer_text, q.answer_start, q.answer_end)


def test_concat_data_keeps_every_answer_in_place(sample_train, sample_dev):
    both = concat_data(sample_train, sample_dev)
    assert len(both.questions) == len(sample_train.questions) + len(sample_dev.questions)
    validate(both, need_answers=True)                       # unique ids, every answer where it says
    moved = both.questions[len(sample_train.questions):]
    assert [both.paragraph(q) for q in moved] == [sample_dev.paragraph(q) for q in sample_dev.questions]
    assert moved[0].id == f"hw7_dev.json:{sample_dev.questions[0].id}"

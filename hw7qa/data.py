"""Read HW7 and DRCD/SQuAD JSON (UTF-8, byte order mark or not) into one ``QAData``, and validate it.

HW7's ``answer_end`` is *inclusive* (``paragraph[answer_start:answer_end + 1] == answer_text``); a test file's
three answer fields are null or absent. DRCD/SQuAD keeps each question's first answer, paragraphs in file order.
A file with any problem raises one ``DataError`` naming the file, each question id and what is wrong.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path


class DataError(ValueError):
    """A data file that cannot be used; the message lists every problem found."""


@dataclass(frozen=True)
class Question:
    id: int | str
    question_text: str
    paragraph_id: int
    answer_text: str | None = None
    answer_start: int | None = None   # character index in the paragraph
    answer_end: int | None = None     # character index, inclusive (HW7's convention)


@dataclass(frozen=True)
class QAData:
    path: str
    questions: list[Question]
    paragraphs: list[str]

    def paragraph(self, question: Question) -> str:
        return self.paragraphs[question.paragraph_id]


def load_qa_file(path: str | Path, need_answers: bool = False, setting: str = "") -> QAData:
    """Load an HW7 or DRCD/SQuAD JSON file (format detected from its keys) and validate it.
    ``setting``: where the path came from (``train_file``, ``--file``), named if there is no such file."""
    path = str(path)
    if not Path(path).is_file():
        raise DataError(not_a_file(path, setting))
    try:
        with open(path, encoding="utf-8-sig") as f:
            raw = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: not valid UTF-8 JSON ({e})") from None
    if isinstance(raw, dict) and "questions" in raw and "paragraphs" in raw:
        data = _from_hw7(path, raw)
    elif isinstance(raw, dict) and isinstance(raw.get("data"), list):
        data = _from_squad(path, raw)
    else:
        raise DataError(f"{path}: neither HW7 JSON (keys 'questions' and 'paragraphs') "
                        f"nor DRCD/SQuAD JSON (key 'data')")
    if not data.questions:          # an empty file, or one whose questions were all removed
        raise DataError(f"{f'{setting}={path!r}' if setting else path}: the file has no questions"
                        + (f"; point {setting} at one that has some" if setting else ""))
    validate(data, need_answers)
    return data


def not_a_file(path: str, setting: str = "", kind: str = "json") -> str:
    """Why ``path`` (of ``setting``; a ``kind`` file: json, csv) is not a file that can be read, in one sentence."""
    name = f"{setting}={path!r}" if setting else path
    if not path:
        return f"{setting or 'the data file'} is empty; give the path of an HW7 or DRCD JSON file"
    if Path(path).is_dir():
        inside = sorted(p.name for p in Path(path).glob(f"*.{kind}"))[:3]
        return f"{name} is a folder; give a {kind.upper()} file" + (f" in it ({', '.join(inside)})" if inside else "")
    where = "" if Path(path).is_absolute() else f" (a relative path, read from the current folder {Path.cwd()})"
    return f"{name}: no such file{where}"


ANSWER_KEYS = ("answer_text", "answer_start", "answer_end")


def _from_hw7(path: str, raw: dict) -> QAData:
    errors = []
    if not isinstance(raw["questions"], list) or not isinstance(raw["paragraphs"], list):
        raise DataError(f"{path}: 'questions' and 'paragraphs' must be lists")
    fields = {"id": (int, str), "paragraph_id": (int,), "question_text": (str,),
              "answer_text": (str, type(None)), "answer_start": (int, type(None)),
              "answer_end": (int, type(None))}
    questions = []
    for i, q in enumerate(raw["questions"]):
        where = f"question #{i} (id {q.get('id', '?')!r})" if isinstance(q, dict) else f"question #{i}"
        if not isinstance(q, dict):
            errors.append(f"{where}: not an object")
            continue
        if not any(k in q for k in ANSWER_KEYS):    # a test file needs no answers; only some keys: an error
            q = {**q, **dict.fromkeys(ANSWER_KEYS)}
        bad = [f"missing key '{k}'" if k not in q else
               f"'{k}' is {type(q[k]).__name__}, expected {' or '.join(t.__name__ for t in types)}"
               for k, types in fields.items()
               if k not in q or not isinstance(q[k], types) or isinstance(q[k], bool)]
        if bad:
            errors.append(f"{where}: {'; '.join(bad)}")
            continue
        questions.append(Question(**{k: q[k] for k in fields}))     # the fields are named as Question's
    bad_paragraphs = [i for i, p in enumerate(raw["paragraphs"]) if not isinstance(p, str)]
    if bad_paragraphs:
        errors.append(f"paragraphs {bad_paragraphs[:10]} are not strings")
    _raise_if(path, errors)
    return QAData(path, questions, raw["paragraphs"])


def _from_squad(path: str, raw: dict) -> QAData:
    errors, questions, paragraphs = [], [], []
    for article in raw["data"]:
        for para in article.get("paragraphs", []) if isinstance(article, dict) else []:
            if not isinstance(para, dict) or not isinstance(para.get("context"), str):
                errors.append(f"paragraph #{len(paragraphs)}: missing or mistyped 'context'")
                continue
            paragraphs.append(para["context"])
            for qa in para.get("qas", []):
                if not isinstance(qa, dict) or not isinstance(qa.get("question"), str) or "id" not in qa:
                    errors.append(f"paragraph #{len(paragraphs) - 1}: a question without 'id' or 'question'")
                    continue
                answers = qa.get("answers") or []
                first = answers[0] if answers and isinstance(answers[0], dict) else {}
                text, start = first.get("text"), first.get("answer_start")
                if answers and (not isinstance(text, str) or not isinstance(start, int)):
                    errors.append(f"question id {qa['id']!r}: first answer lacks 'text' or 'answer_start'")
                    continue
                end = start + len(text) - 1 if answers else None
                questions.append(Question(qa["id"], qa["question"], len(paragraphs) - 1, text, start, end))
    _raise_if(path, errors)
    return QAData(path, questions, paragraphs)


def validate(data: QAData, need_answers: bool = False) -> None:
    """A ``DataError`` for duplicate ids (as result.csv writes them), bad paragraph ids, empty texts, wrong answers."""
    if need_answers and data.questions and not any(q.answer_text is not None for q in data.questions):
        raise DataError(f"{data.path}: no answer in any of its {len(data.questions)} questions (a test file?); "
                        f"training and evaluation need a file with answers (a train or dev file)")
    errors = [f"paragraph {p_id} is empty" for p_id, paragraph in enumerate(data.paragraphs) if not paragraph.strip()]
    seen = {}
    for q in data.questions:
        where = f"question id {q.id!r}"
        key = str(q.id)     # as result.csv writes it: 4 and "4" would be one ID there
        if key in seen:
            like = "" if seen[key] == q.id else f" (written as {key} in result.csv, like id {seen[key]!r})"
            errors.append(f"{where}: duplicate id{like}")
        seen.setdefault(key, q.id)
        if not q.question_text.strip():
            errors.append(f"{where}: empty question_text")
        if not 0 <= q.paragraph_id < len(data.paragraphs):
            errors.append(f"{where}: paragraph_id {q.paragraph_id} out of range "
                          f"(the file has {len(data.paragraphs)} paragraphs)")
            continue
        answer = (q.answer_text, q.answer_start, q.answer_end)
        if all(a is None for a in answer):
            if need_answers:
                errors.append(f"{where}: no answer, but this file is used for training or evaluation")
            continue
        if any(a is None for a in answer):
            errors.append(f"{where}: answer_text, answer_start and answer_end must be all set or all null")
            continue
        if not q.answer_text:
            errors.append(f"{where}: empty answer_text")
            continue
        found = data.paragraphs[q.paragraph_id][q.answer_start:q.answer_end + 1]
        if q.answer_start < 0 or found != q.answer_text:
            errors.append(f"{where}: paragraph[{q.answer_start}:{q.answer_end}+1] is {found!r}, "
                          f"not answer_text {q.answer_text!r}")
    if not data.questions:
        errors.append("no questions")
    _raise_if(data.path, errors)


def _raise_if(path: str, errors: list[str], shown: int = 20) -> None:
    if len(errors) == 1:
        raise DataError(f"{path}: {errors[0]}")
    if errors:
        more = f"\n  ... and {len(errors) - shown} more" if len(errors) > shown else ""
        raise DataError(f"{path}: {len(errors)} problem(s):\n  " + "\n  ".join(errors[:shown]) + more)


def concat_data(first: QAData, second: QAData) -> QAData:
    """Both files as one ``QAData``; the second's paragraph ids shifted past the first's, its question ids
    made ``"<file name>:<id>"`` so that ids stay unique."""
    shift, name = len(first.paragraphs), Path(second.path).name
    moved = [dataclasses.replace(q, id=f"{name}:{q.id}", paragraph_id=q.paragraph_id + shift)
             for q in second.questions]
    return QAData(f"{first.path}+{second.path}", first.questions + moved, first.paragraphs + second.paragraphs)

"""Write the Kaggle ``result.csv`` and check one against a test file."""
from __future__ import annotations

import csv
from pathlib import Path

from .data import DataError, QAData, not_a_file
from .files import atomic_write

HEADER = ["ID", "Answer"]


class SubmissionError(Exception):
    """A written result.csv that fails ``check_result_csv``; the message lists every problem."""

    def __init__(self, path: str | Path, problems: list[str]):
        super().__init__(f"{path} is not a valid submission, {len(problems)} problem(s):\n  " + "\n  ".join(problems))
        self.path, self.problems = Path(path), problems


def csv_answer(answer: str) -> str:
    """``answer`` as result.csv holds it: commas removed (as the sample code does), line breaks made spaces."""
    return answer.replace(",", "").replace("\n", " ")


def write_result_csv(data: QAData, answers: list[str], path: str | Path) -> Path:
    """Write ``ID,Answer`` rows (``csv_answer``) in the test file's order, UTF-8, whole or not at all."""
    if len(answers) != len(data.questions):
        raise ValueError(f"{len(answers)} answers for {len(data.questions)} questions of {data.path}")
    with atomic_write(path, encoding="utf-8", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(HEADER)
        for q, answer in zip(data.questions, answers):
            writer.writerow([q.id, csv_answer(answer)])
    return Path(path)


def read_rows(path: str | Path) -> tuple[list[tuple[int, list[str]]], list[str]]:
    """The rows of CSV ``path`` with their line numbers, and a problem for each row over several lines: result.csv
    has no line break in a field, so that is a quote (") left open."""
    if not Path(path).is_file():
        raise DataError(not_a_file(str(path), kind="csv"))
    rows, problems = [], []
    with open(path, encoding="utf-8-sig", newline="") as f:     # a Windows editor's byte order mark is no header
        reader = csv.reader(f)
        start = 1
        try:
            for row in reader:
                if reader.line_num > start:
                    problems.append(f"line {start}: a quote (\") opened here runs on to line {reader.line_num}, making "
                                    f"those lines one row; close it on line {start} or remove it")
                else:
                    rows.append((start, row))
                start = reader.line_num + 1
        except csv.Error as e:      # a quote open to the end of the file: csv stops at its field size limit
            problems.append(f"line {start}: a quote (\") opened here is never closed, and takes the rest of the file "
                            f"into one field ({e}); close it on line {start} or remove it")
    return rows, problems


def check_result_csv(path: str | Path, data: QAData) -> list[str]:
    """Every problem of ``path`` as a submission for ``data``, each a line naming ``path`` ([]: valid);
    a DataError if ``path`` is not a file."""
    try:
        rows, problems = read_rows(path)
    except UnicodeDecodeError as e:
        return [f"{path}: cannot be read as UTF-8 text ({e})"]
    if not rows and not problems:
        return [f"{path}: empty file"]
    if rows and rows[0] != (1, HEADER):
        problems.append(f"line 1: header is {','.join(rows[0][1])!r}, expected 'ID,Answer'")
    expected = [str(q.id) for q in data.questions]
    wanted, seen = set(expected), {}
    for line, row in rows[1:]:
        if len(row) != 2:
            problems.append(f"line {line}: {len(row)} fields, expected 2 (ID,Answer)")
            continue
        qid, answer = row
        if qid not in wanted:
            problems.append(f"line {line}: ID {qid!r} is not a question of {data.path}")
        elif qid in seen:
            problems.append(f"line {line}: ID {qid!r} again (first on line {seen[qid]})")
        else:
            seen[qid] = line
        if not answer.strip():
            problems.append(f"line {line}: ID {qid!r} has an empty answer")
    missing = [qid for qid in expected if qid not in seen]
    if missing:
        problems.append(f"{len(missing)} question(s) of {data.path} have no row, e.g. ID(s) {', '.join(missing[:5])}")
    return [f"{path}: {problem}" for problem in problems]

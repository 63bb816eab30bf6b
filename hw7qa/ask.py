"""Ask a trained run your own question (``hw7qa ask RUN``): the answer, its score and the n-best alternatives
(the candidates the decoder chose among, best first), answered as ``predict`` answers a file.

    from hw7qa.ask import ask, format_answer
    print(format_answer(ask("outputs/RUN", "臺灣大學的前身是什麼？", paragraph, n_best=5)))

Many questions, the model loaded once: ``ask_many(load_reader(run), pairs)``, or a file (``read_questions``).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .config import DecodeSpec, run_config
from .data import DataError, QAData, Question, load_qa_file
from .decode import balance_quotes, softmax, span_scores, vote_predictions
from .inference import Reader, open_run, stride_logits
from .models import tf32_matmuls


@dataclass(frozen=True)
class Alternative:
    text: str
    score: float            # start logit + end logit of the span (the highest over windows and strides)
    probability: float      # softmax of the scores over the question's candidates (mean over strides)


@dataclass(frozen=True)
class Answer:
    id: int | str
    question: str
    answer: str             # what predict writes for this question
    score: float            # predict's score of it: start + end logit (with tta_strides: the vote's probability)
    alternatives: list[Alternative]   # best first; the first is the answer, unless no top-k span was valid


def load_reader(run_dir: str | Path, overrides: list[str] | dict | None = None) -> Reader:
    """The run's model and tokenizer, loaded once for many questions, with ``overrides`` of its inference
    settings (as ``predict --set``)."""
    reader = open_run(run_dir, run_config(run_dir, overrides), cache=False)
    reader.loaded_model()           # now: a missing or damaged model/ is named before any question
    return reader


def questions_data(pairs: list[tuple[str, str]], ids: list | None = None, path: str = "<your questions>") -> QAData:
    """``(question, paragraph)`` pairs as a ``QAData`` (``ids``, default 0, 1, …; equal paragraphs stored once);
    a ValueError in one sentence for an empty question or paragraph."""
    paragraphs: dict[str, int] = {}
    questions = []
    for i, (question, paragraph) in enumerate(pairs):
        if not question.strip():
            raise ValueError("the question is empty: ask something about the paragraph")
        if not paragraph.strip():
            raise ValueError("the paragraph is empty: give the text in which the answer is to be found")
        questions.append(Question(ids[i] if ids else i, question, paragraphs.setdefault(paragraph, len(paragraphs))))
    return QAData(path, questions, list(paragraphs))


def read_questions(path: str | Path) -> QAData:
    """Questions to ask from a file: ``*.jsonl``, one ``{"question", "paragraph"}`` object per line
    (an ``"id"`` is optional); anything else, HW7 or DRCD JSON (``data.load_qa_file``)."""
    path = Path(path)
    if path.suffix != ".jsonl":
        return load_qa_file(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    pairs, ids = [], []
    for n, line in enumerate(path.read_text(encoding="utf-8-sig").splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError:
            item = None
        if not (isinstance(item, dict) and isinstance(item.get("question"), str)
                and isinstance(item.get("paragraph"), str)):
            raise DataError(f'{path}, line {n}: expected {{"question": "...", "paragraph": "..."}}')
        pairs.append((item["question"], item["paragraph"]))
        ids.append(item.get("id", len(ids)))
    if not pairs:
        raise DataError(f"{path}: no questions")
    return questions_data(pairs, ids, str(path))


def ask(run: str | Path | Reader, question: str, paragraph: str, n_best: int = 5) -> Answer:
    """The run's answer to ``question`` about ``paragraph``, with its ``n_best`` best alternatives.
    ``run``: a run folder, or a ``Reader`` loaded once for many questions."""
    return ask_many(run, [(question, paragraph)], n_best)[0]


def ask_many(run: str | Path | Reader, pairs: list[tuple[str, str]] | QAData, n_best: int = 5) -> list[Answer]:
    """``ask`` for each ``(question, paragraph)`` of ``pairs`` (or each question of a ``QAData``),
    the model loaded and run once for all."""
    if n_best < 0:
        raise ValueError(f"n_best={n_best}; give 0 or more alternatives to list")
    data = pairs if isinstance(pairs, QAData) else questions_data(pairs)
    reader = run if isinstance(run, Reader) else load_reader(run)
    cfg = reader.cfg
    with tf32_matmuls(cfg.tf32):
        members = stride_logits(reader, data, desc="ask")
    predictions = vote_predictions(members, cfg.decoding)
    candidates = alternatives(members, cfg.decoding, n_best)
    return [Answer(q.id, q.question_text, p.answer, p.score, c)
            for q, p, c in zip(data.questions, predictions, candidates)]


def alternatives(members: list[tuple], spec: DecodeSpec, n_best: int) -> list[list[Alternative]]:
    """Per question, its ``n_best`` most probable candidate answers over all ``members`` (one
    ``(enc, windows, logits)`` per stride), as ``vote_predictions`` weighs them: probability the
    mean over members, then the score; quotes balanced as the decoder does; each text once."""
    per_member = [span_scores(*member, spec) for member in members]
    enc = members[0][0]
    out = []
    for qi, question in enumerate(enc.data.questions):
        score: dict[tuple[int, int], float] = {}
        probability: dict[tuple[int, int], float] = {}
        for found in (scores[qi] for scores in per_member):
            for span, p in softmax(found).items():
                score[span] = max(score.get(span, -float("inf")), found[span])
                probability[span] = probability.get(span, 0.0) + p / len(members)
        paragraph, listed = enc.data.paragraph(question), {}
        for span in sorted(score, key=lambda s: (-probability[s], -score[s])):
            start, end = balance_quotes(paragraph, *span) if spec.balance_quotes else span
            listed.setdefault(paragraph[start:end], Alternative(paragraph[start:end], score[span], probability[span]))
        out.append(list(listed.values())[:n_best])
    return out


def format_answer(answer: Answer) -> str:
    """The question, the answer with its score, and the alternatives as a numbered list."""
    lines = [f"question: {answer.question}", f"answer:   {answer.answer or '(none)'}   (score {answer.score:.2f})"]
    for k, alt in enumerate(answer.alternatives, 1):
        lines.append(f"{'n-best:' if k == 1 else '':9} {k}. {alt.text}   score {alt.score:.2f}, "
                     f"probability {alt.probability:.1%}")
    return "\n".join(lines)

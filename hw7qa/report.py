"""Small views for people: an example with its answer marked, training curves, wrong answers."""
from __future__ import annotations

import json
import math
from pathlib import Path

from .data import QAData, Question
from .decode import Prediction
from .files import atomic_write
from .metrics import char_f1, exact_match


def format_example(data: QAData, question: Question, width: int = 60) -> str:
    """The question and the part of its paragraph around the answer, the answer marked 【like this】."""
    paragraph = data.paragraph(question)
    if question.answer_start is None:
        return f"Q{question.id}: {question.question_text}\n{paragraph[:2 * width]}…"
    s, e = question.answer_start, question.answer_end + 1
    before = paragraph[max(0, s - width):s]
    after = paragraph[e:e + width]
    return (f"Q{question.id}: {question.question_text}\nanswer: {question.answer_text} (characters {s}-{e - 1})\n"
            f"…{before}【{paragraph[s:e]}】{after}…")


def read_metrics(run_dir: str | Path) -> list[dict]:
    """The records of ``<run>/metrics.jsonl``: training ({step, loss, lr}) and dev ({step, dev_em, dev_f1})."""
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def plot_metrics(run_dir: str | Path):
    """Loss, learning rate and dev EM against optimizer steps; None if matplotlib is not installed."""
    try:
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)")
        return None
    records = read_metrics(run_dir)
    train = [r for r in records if "loss" in r]
    dev = [r for r in records if "dev_em" in r]
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.5))
    axes[0].plot([r["step"] for r in train], [r["loss"] for r in train])
    axes[0].set_title("training loss")
    axes[1].plot([r["step"] for r in train], [r["lr"] for r in train])
    axes[1].set_title("learning rate")
    axes[2].plot([r["step"] for r in dev], [r["dev_em"] for r in dev], marker="o")
    axes[2].set_title("dev exact match")
    for ax in axes:
        ax.set_xlabel("optimizer step")
    fig.tight_layout()
    return fig


def wrong_answers(data: QAData, predictions: list[Prediction], limit: int = 10) -> list[dict]:
    """Up to ``limit`` questions answered wrongly: question, gold, predicted, character F1."""
    rows = []
    for q, p in zip(data.questions, predictions):
        if not exact_match(p.answer, q.answer_text):
            rows.append({"id": q.id, "question": q.question_text, "gold": q.answer_text,
                         "predicted": p.answer, "f1": round(char_f1(p.answer, q.answer_text), 3)})
    return rows[:limit]


def error_kind(predicted: str, gold: str, unknown_chars: set[str] = frozenset()) -> str:
    """Why a prediction is wrong: ``correct``, ``empty``, ``boundary`` (off by one or two characters:
    a prefix or suffix of the gold answer, or the gold answer a prefix or suffix of it),
    ``rare-character`` (the gold answer holds a character the tokenizer maps to [UNK]) or ``wrong-span``."""
    if exact_match(predicted, gold):
        return "correct"
    if not predicted:
        return "empty"
    short, long_ = sorted((predicted, gold), key=len)
    if len(long_) - len(short) <= 2 and (long_.startswith(short) or long_.endswith(short)):
        return "boundary"
    if any(c in unknown_chars for c in gold):
        return "rare-character"
    return "wrong-span"


def unknown_characters(tokenizer, texts: list[str]) -> set[str]:
    """The characters of ``texts`` that ``tokenizer`` turns into its unknown token."""
    chars = sorted({c for text in texts for c in text if not c.isspace()})
    if tokenizer.unk_token_id is None or not chars:
        return set()
    ids = tokenizer(chars, add_special_tokens=False)["input_ids"]
    return {c for c, i in zip(chars, ids) if tokenizer.unk_token_id in i}


def write_dev_predictions(path: str | Path, data: QAData, predictions: list[Prediction],
                          unknown_chars: set[str] = frozenset()) -> dict[str, int]:
    """One JSON line per question (id, question, gold, predicted, score, window, em, f1, kind);
    returns how many questions fall in each ``error_kind``. Written whole or not at all (``atomic_write``).
    ``score`` is null where no span was found (strict JSON has no -Infinity)."""
    counts: dict[str, int] = {}
    with atomic_write(path, encoding="utf-8") as f:
        for q, p in zip(data.questions, predictions):
            kind = error_kind(p.answer, q.answer_text, unknown_chars)
            counts[kind] = counts.get(kind, 0) + 1
            f.write(json.dumps({"id": q.id, "question": q.question_text, "gold": q.answer_text,
                                "predicted": p.answer, "score": p.score if math.isfinite(p.score) else None,
                                "window": p.window,
                                "em": exact_match(p.answer, q.answer_text), "f1": char_f1(p.answer, q.answer_text),
                                "kind": kind}, ensure_ascii=False) + "\n")
    return counts

"""Views for people: an example with its answer marked, a paragraph's windows, training curves, wrong answers.

Drawings return a Figure, or None with a note without matplotlib (the ``notebook`` extra); their text is ASCII
only (the default fonts have no CJK).
"""
from __future__ import annotations

import json
import math
import unicodedata
from pathlib import Path

from .data import QAData, Question
from .decode import Prediction
from .files import atomic_write, check_file
from .metrics import char_f1, exact_match
from .windows import Encoded, question_budgets, question_windows


def format_example(data: QAData, question: Question, width: int = 60) -> str:
    """The question and the part of its paragraph around the answer, the answer marked 【like this】."""
    paragraph = data.paragraph(question)
    if question.answer_start is None:
        return f"Q{question.id}: {question.question_text}\n{paragraph[:2 * width]}…"
    s, e = question.answer_start, question.answer_end + 1
    return (f"Q{question.id}: {question.question_text}\nanswer: {question.answer_text} (characters {s}-{e - 1})\n"
            f"…{paragraph[max(0, s - width):s]}【{paragraph[s:e]}】{paragraph[e:e + width]}…")


def read_metrics(run_dir: str | Path) -> list[dict]:
    """The records of ``<run>/metrics.jsonl``: training ({step, loss, lr}) and dev ({step, dev_em, dev_f1});
    a ``DamagedFile`` naming it if it is missing or a line is not a whole record."""
    path = Path(run_dir) / "metrics.jsonl"
    check_file(path, "restore it from a copy of the run, or delete the damaged line")    # one line, not a traceback
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def pyplot():
    """``matplotlib.pyplot``, or None with a note to install it."""
    try:
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)")
        return None
    return plt


def plot_windows(enc: Encoded, qi: int):
    """The inference windows of question ``qi`` as bars over its paragraph, to see what ``doc_stride`` does; gids
    ``paragraph``, ``answer`` and ``window-<k>``, x in paragraph tokens. None without matplotlib."""
    if (plt := pyplot()) is None:
        return None
    spans, answer = question_windows(enc, qi), enc.answer_tokens[qi]
    n_tokens = len(enc.paragraph_ids[enc.data.questions[qi].paragraph_id])
    budget = int(question_budgets(enc)[qi])
    stride = min(enc.spec.doc_stride, budget)       # as the windows are cut: no token between two windows
    fig, ax = plt.subplots(figsize=(12, 1.2 + 0.36 * len(spans)))
    ax.barh(0, n_tokens, height=0.6, color="lightgray", gid="paragraph")
    for k, (start, end) in enumerate(spans, 1):
        holds = answer is not None and start <= answer[0] and answer[1] < end
        ax.barh(k, end - start, left=start, height=0.6, color="tab:green" if holds else "tab:blue", alpha=0.7,
                gid=f"window-{k - 1}")
    if answer is not None:
        ax.barh(0, answer[1] + 1 - answer[0], left=answer[0], height=0.6, color="tab:red", gid="answer")
        ax.axvspan(answer[0], answer[1] + 1, color="tab:red", alpha=0.15)
    if len(spans) > 1:       # the stride: from the first window's start to the second's, between their rows
        ax.annotate("", xy=(spans[1][0], 1.5), xytext=(spans[0][0], 1.5), arrowprops={"arrowstyle": "<->"})
        ax.text(spans[1][0] + n_tokens / 200, 1.5, f"doc_stride {stride}", va="center", fontsize=8)
    ax.set_yticks(range(len(spans) + 1), ["paragraph"] + [f"window {k}" for k in range(len(spans))])
    ax.invert_yaxis()
    ax.set_xlim(0, n_tokens)
    ax.set_xlabel("paragraph token (red: the answer; green: a window that holds all of it)")
    shared = f", neighbours share {budget - stride}" if len(spans) > 1 else ""
    ax.set_title(f"{n_tokens} paragraph tokens; {len(spans)} windows of up to {budget} tokens, a new one every "
                 f"{stride}{shared}")
    fig.tight_layout()
    return fig


def plot_metrics(run_dir: str | Path):
    """Loss, learning rate, and dev EM and F1 against optimizer steps; None without matplotlib."""
    if (plt := pyplot()) is None:
        return None
    records = read_metrics(run_dir)
    train = [r for r in records if "loss" in r]
    dev = [r for r in records if "dev_em" in r]
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.5))
    for ax, key, title in ((axes[0], "loss", "training loss"), (axes[1], "lr", "learning rate")):
        ax.plot([r["step"] for r in train], [r[key] for r in train])
        ax.set_title(title)
    for key, name in (("dev_em", "exact match"), ("dev_f1", "F1")):     # a young run's EM may stay 0, F1 moves
        axes[2].plot([r["step"] for r in dev], [r[key] for r in dev], marker="o", label=name)
    axes[2].set_ylim(bottom=0)
    axes[2].legend()
    axes[2].set_title("dev exact match and F1")
    plt.setp(axes, xlabel="optimizer step")
    fig.tight_layout()
    return fig


def wrong_answers(data: QAData, predictions: list[Prediction], limit: int = 10) -> list[dict]:
    """Up to ``limit`` questions answered wrongly: question, gold, predicted, character F1."""
    return [{"id": q.id, "question": q.question_text, "gold": q.answer_text, "predicted": p.answer,
             "f1": round(char_f1(p.answer, q.answer_text), 3)}
            for q, p in zip(data.questions, predictions) if not exact_match(p.answer, q.answer_text)][:limit]


def display_width(text: str) -> int:
    """Columns ``text`` takes in a monospaced font: two for a wide character (Chinese), one otherwise."""
    return sum(2 if unicodedata.east_asian_width(c) in "WF" else 1 for c in text)


def clip(text: str, width: int) -> str:
    """``text`` cut to at most ``width`` columns, with "…" where it was cut."""
    if display_width(text) <= width:
        return text
    while display_width(text) > width - 1:
        text = text[:-1]
    return text + "…"


def format_table(rows: list[dict], max_width: int = 32) -> str:
    """``rows`` (dicts, same keys) as a text table aligned for Chinese; numbers right, text cut at ``max_width``."""
    if not rows:
        return "(no rows)"
    keys = list(rows[0])
    cells = [[str(k) for k in keys]] + [[clip(str(r[k]).replace("\n", " "), max_width) for k in keys] for r in rows]
    widths = [max(display_width(row[i]) for row in cells) for i in range(len(keys))]
    numeric = [all(isinstance(r[k], (int, float)) for r in rows) for k in keys]
    lines = []
    for row in cells:
        pads = [" " * (w - display_width(c)) for c, w in zip(row, widths)]
        lines.append("  ".join(p + c if right else c + p for c, p, right in zip(row, pads, numeric)).rstrip())
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


class TextTable(list):
    """Rows (a list of dicts) shown as ``format_table`` by a notebook (and by ``print``)."""

    def __repr__(self) -> str:
        return format_table(self)


def as_table(rows: list[dict]):
    """``rows`` for a notebook's ``display``: a pandas DataFrame, or a ``TextTable`` without pandas."""
    try:
        import pandas as pd
    except ImportError:
        return TextTable(rows)
    return pd.DataFrame(rows)


def error_kind(predicted: str, gold: str, unknown_chars: set[str] = frozenset()) -> str:
    """``correct``, ``empty``, ``boundary`` (one a prefix or suffix of the other, 1-2 characters off),
    ``rare-character`` (gold holds one of ``unknown_chars``) or ``wrong-span``."""
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
    """One JSON line per question (id, question, gold, predicted, score: null if no span, window, em, f1, kind),
    written whole or not at all; returns how many questions fall in each ``error_kind``."""
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

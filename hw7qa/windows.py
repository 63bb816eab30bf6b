"""Question + paragraph → overlapping token windows with character offsets, and training labels.

A window is ``<specials> question <specials> paragraph[token_start:token_end] <specials>``, the specials learned
from the tokenizer (``PairTemplate``), so BERT and sentencepiece vocabularies both work. Windows start every
``doc_stride`` paragraph tokens, capped at the budget, so every token is in one; a file's form a ``Windows`` table.
"""
from __future__ import annotations

import dataclasses
import functools
import itertools
import random
import re
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from .config import WindowSpec
from .data import DataError, QAData


@dataclass(frozen=True)
class PairTemplate:
    """Special tokens and token types around a (question, paragraph) pair, as the tokenizer builds it."""
    prefix: list[int]
    middle: list[int]
    suffix: list[int]
    type_ids: tuple[list[int], int, list[int], int, list[int]] | None  # prefix, q, middle, p, suffix
    cls_index: int                                                       # "no answer" label position

    @property
    def n_special(self) -> int:
        return len(self.prefix) + len(self.middle) + len(self.suffix)


def learn_template(tokenizer) -> PairTemplate:
    """Encode one pair and read where the special tokens are from its ``sequence_ids()``."""
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError("hw7qa needs a fast tokenizer (offsets); load it with AutoTokenizer(use_fast=True)")
    enc = tokenizer("問", "段", return_token_type_ids=True)
    seq, ids = enc.sequence_ids(), enc["input_ids"]
    q_pos = [i for i, s in enumerate(seq) if s == 0]
    p_pos = [i for i, s in enumerate(seq) if s == 1]
    prefix, middle, suffix = ids[:q_pos[0]], ids[q_pos[-1] + 1:p_pos[0]], ids[p_pos[-1] + 1:]
    types = enc.get("token_type_ids")
    type_ids = None if types is None or "token_type_ids" not in tokenizer.model_input_names else (
        types[:q_pos[0]], types[q_pos[0]], types[q_pos[-1] + 1:p_pos[0]], types[p_pos[0]], types[p_pos[-1] + 1:])
    cls_id = tokenizer.cls_token_id
    cls_index = ids.index(cls_id) if cls_id in ids else 0
    return PairTemplate(prefix, middle, suffix, type_ids, cls_index)


@dataclass(frozen=True)
class Encoded:
    """A data file tokenized once: ids of every question and paragraph, paragraph offsets, answers."""
    data: QAData
    question_ids: list[list[int]]
    paragraph_ids: list[list[int]]
    paragraph_offsets: list[list[tuple[int, int]]]      # (start, end) characters, end exclusive
    answer_tokens: list[tuple[int, int] | None]         # paragraph token span, inclusive; None if unknown
    template: PairTemplate
    spec: WindowSpec                                     # the window settings it is cut with


# only ids (and offsets where asked): every list asked for is converted from Rust for every text
LEAN = dict(add_special_tokens=False, return_attention_mask=False, return_token_type_ids=False, verbose=False)


def encode(data: QAData, tokenizer, spec: WindowSpec) -> Encoded:
    """``data`` tokenized once (paragraph offsets by ``trimmed_offsets``), answers as token spans, for ``spec``."""
    template = learn_template(tokenizer)
    if spec.max_length - spec.max_question_tokens - template.n_special < 8:
        raise ValueError(f"max_length {spec.max_length} leaves fewer than 8 paragraph tokens")
    para = tokenizer(data.paragraphs, return_offsets_mapping=True, **LEAN)
    paragraph_ids = para["input_ids"]
    offsets = [trimmed_offsets(text, offs) for text, offs in zip(data.paragraphs, para["offset_mapping"])]
    empty = next((i for i, ids in enumerate(paragraph_ids) if not ids), None)
    if empty is not None:           # no window could hold an answer: its questions would get an empty one
        raise DataError(f"{data.path}: paragraph {empty} ({data.paragraphs[empty][:20]!r}) holds nothing the "
                        f"tokenizer reads (only control or zero-width characters); fix or remove it")
    quest = tokenizer([q.question_text.strip() for q in data.questions], **LEAN)
    question_ids = [ids[:spec.max_question_tokens] for ids in quest["input_ids"]]
    return Encoded(data, question_ids, paragraph_ids, offsets, answer_tokens(data, offsets), template, spec)


def with_stride(enc: Encoded, doc_stride: int) -> Encoded:
    """``enc`` to be cut ``doc_stride`` tokens apart; nothing is tokenized again."""
    return dataclasses.replace(enc, spec=dataclasses.replace(enc.spec, doc_stride=doc_stride))


def trim_offsets(text: str, start: int, end: int) -> tuple[int, int]:
    """``(start, end)`` without whitespace at its edges (a whitespace-only token becomes empty)."""
    # sentencepiece tokens such as "▁Jobs" cover the space before the word in some tokenizers versions
    while start < end and text[start].isspace():
        start += 1
    while end > start and text[end - 1].isspace():
        end -= 1
    return start, end


def trimmed_offsets(text: str, offsets: list[tuple[int, int]]) -> list[tuple[int, int]]:
    # only a token that starts or ends on whitespace can change; \s matches what str.isspace() does
    spaces = {match.start() for match in re.finditer(r"\s", text)}
    if not spaces:
        return list(offsets)
    return [trim_offsets(text, s, e) if s in spaces or e - 1 in spaces else (s, e) for s, e in offsets]


def answer_tokens(data: QAData, offsets: list[list[tuple[int, int]]]) -> list[tuple[int, int] | None]:
    """``char_span_to_tokens`` of every question's answer; None where no answer is given."""
    @functools.cache
    def as_array(paragraph_id: int) -> np.ndarray:      # each paragraph's offsets converted once
        pairs = offsets[paragraph_id]
        return np.fromiter(itertools.chain.from_iterable(pairs), dtype=np.int64, count=2 * len(pairs)).reshape(-1, 2)
    return [None if q.answer_start is None else char_span_to_tokens(as_array(q.paragraph_id), q.answer_start,
                                                                    q.answer_end) for q in data.questions]


def char_span_to_tokens(offsets, start_char: int, end_char: int) -> tuple[int, int] | None:
    """Inclusive token span covering inclusive characters ``start_char..end_char`` of ``offsets`` (``(start, end)``
    pairs, list or ``(n, 2)`` array), uncovered characters skipped inwards; None if no token lies inside."""
    offsets = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
    starts, ends = offsets[:, 0], offsets[:, 1]
    overlap = np.flatnonzero((starts < ends) & (starts <= end_char) & (ends > start_char))
    if overlap.size == 0:
        return None
    # first: the last token starting by start_char (after a lone "▁": the real one); last: the first past end_char
    holding_start = overlap[starts[overlap] <= start_char]
    first = holding_start[-1] if holding_start.size else overlap[0]
    holding_end = overlap[(overlap >= first) & (ends[overlap] > end_char)]
    last = holding_end[0] if holding_end.size else overlap[-1]
    return (int(first), int(last)) if last >= first else None


def question_budgets(enc: Encoded) -> np.ndarray:
    """How many paragraph tokens fit in a window of each question (at most ``max_paragraph_tokens`` if set)."""
    question_length = np.array([len(ids) for ids in enc.question_ids], dtype=np.int64)
    room = enc.spec.max_length - question_length - enc.template.n_special
    cap = enc.spec.max_paragraph_tokens
    return np.minimum(room, cap) if cap else room


def window_grid(n_tokens, budget, doc_stride: int) -> tuple[np.ndarray, np.ndarray]:
    """``(row, start)`` of every window of paragraphs of ``n_tokens[i]`` tokens, ``budget[i]`` per window."""
    n_tokens, budget = np.asarray(n_tokens, dtype=np.int64), np.asarray(budget, dtype=np.int64)
    stride = np.minimum(doc_stride, budget)
    count = 1 + np.maximum(0, -(-(n_tokens - budget) // stride))   # windows until one reaches the end
    row = np.repeat(np.arange(len(count)), count)
    nth = np.arange(len(row)) - np.repeat(np.cumsum(count) - count, count)   # 0, 1, 2, ... within each row
    return row, nth * stride[row]


def train_window_start(policy: str, n_tokens: int, budget: int, answer: tuple[int, int],
                       rng: random.Random) -> int | None:
    """Start of a question's training window holding the whole answer: ``random`` uniformly, ``center`` with it
    in the middle (the sample code); None if the answer is longer than a window."""
    a, b = answer       # windows holding a..b start in [max(0, b - budget + 1), min(a, n - budget)]
    lo, hi = max(0, b - budget + 1), min(a, max(0, n_tokens - budget))
    if lo > hi:
        return None
    if policy == "random":
        return rng.randint(lo, hi)
    middle = (a + b) // 2
    return min(max(middle - budget // 2, lo), hi)


@dataclass(frozen=True, eq=False)
class Windows:
    """Windows as parallel numpy arrays, one row per window."""
    question_index: np.ndarray          # index into enc.data.questions
    token_start: np.ndarray             # first paragraph token in the window
    token_end: np.ndarray               # one past the last paragraph token
    context_start: np.ndarray           # position of paragraph token ``token_start`` in the window
    length: np.ndarray                  # how many tokens each window has
    ids: np.ndarray                     # the input ids of every window, one window after the other
    type_ids: np.ndarray | None         # the token type ids, laid out as ``ids``; None if the model takes none
    start_position: np.ndarray | None = None   # training labels (positions in the window)
    end_position: np.ndarray | None = None

    @cached_property
    def first(self) -> np.ndarray:
        """Where each window's tokens start in ``ids``."""
        return np.cumsum(self.length) - self.length

    def __len__(self) -> int:
        return len(self.length)

    def char_span(self, enc: Encoded, i: int, position_start: int, position_end: int) -> tuple[int, int]:
        """Characters ``[start, end)`` of the paragraph covered by positions start..end (inclusive) of window ``i``."""
        offsets = enc.paragraph_offsets[enc.data.questions[self.question_index[i]].paragraph_id]
        first_token = self.token_start[i] - self.context_start[i]
        return offsets[first_token + position_start][0], offsets[first_token + position_end][1]

    def model_inputs(self, rows: np.ndarray, pad_token_id: int, pad_type_id: int = 0, pad_left: bool = False,
                     pad_to_multiple_of: int = 8) -> dict[str, np.ndarray]:
        """Windows ``rows`` as padded int64 model inputs, as ``DataCollatorWithPadding`` pads their ``features``."""
        length = self.length[rows]
        width = -(-int(length.max(initial=0)) // pad_to_multiple_of) * pad_to_multiple_of
        position = np.arange(width)[None, :] - ((width - length)[:, None] if pad_left else 0)
        real = (position >= 0) & (position < length[:, None])
        where = np.where(real, self.first[rows][:, None] + position, 0)
        inputs = {"input_ids": np.where(real, self.ids[where], pad_token_id).astype(np.int64),
                  "attention_mask": real.astype(np.int64)}
        if self.type_ids is not None:
            inputs["token_type_ids"] = np.where(real, self.type_ids[where], pad_type_id).astype(np.int64)
        return inputs


def run_index(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """``pool[run_index(starts, lengths)]`` is ``np.concatenate([pool[s:s + n] for s, n in zip(starts, lengths)])``."""
    ends = np.cumsum(lengths)
    return np.arange(ends[-1] if len(ends) else 0) + np.repeat(starts - (ends - lengths), lengths)


def flatten(lists: list[list[int]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``lists`` as one int32 array, with where each list starts in it and how long it is."""
    lengths = np.array([len(x) for x in lists], dtype=np.int64)
    flat = np.fromiter(itertools.chain.from_iterable(lists), dtype=np.int32, count=int(lengths.sum()))
    return flat, np.cumsum(lengths) - lengths, lengths


def cut_windows(enc: Encoded, question_index, token_start) -> Windows:
    """Window ``i``: question ``question_index[i]`` with its paragraph from token ``token_start[i]``."""
    t = enc.template
    question_index = np.asarray(question_index, dtype=np.int64)
    token_start = np.asarray(token_start, dtype=np.int64)
    question_flat, question_first, question_length = flatten(enc.question_ids)
    paragraph_flat, paragraph_first, paragraph_length = flatten(enc.paragraph_ids)
    paragraph = np.array([q.paragraph_id for q in enc.data.questions], dtype=np.int64)[question_index]
    token_end = np.minimum(token_start + question_budgets(enc)[question_index], paragraph_length[paragraph])
    n_question = question_length[question_index]
    n_prefix, n_middle, n_suffix = len(t.prefix), len(t.middle), len(t.suffix)
    # each window: five runs (prefix, question, middle, paragraph, suffix) of one pool holding them all
    pool = np.concatenate([np.asarray(part, dtype=np.int32) for part in (t.prefix, t.middle, t.suffix)]
                          + [question_flat, paragraph_flat])
    questions_at = n_prefix + n_middle + n_suffix
    paragraphs_at = questions_at + len(question_flat)
    every = np.ones_like(question_index)      # times a constant: that constant for every window
    run_start = np.stack([0 * every, questions_at + question_first[question_index], n_prefix * every,
                          paragraphs_at + paragraph_first[paragraph] + token_start, (n_prefix + n_middle) * every],
                         axis=1)
    run_length = np.stack([n_prefix * every, n_question, n_middle * every, token_end - token_start,
                           n_suffix * every], axis=1)
    index = run_index(run_start.ravel(), run_length.ravel())
    type_ids = None
    if t.type_ids is not None:
        pre, question_type, mid, paragraph_type, suf = t.type_ids
        type_pool = np.concatenate([np.asarray(part, dtype=np.int32) for part in (pre, mid, suf)]
                                   + [np.full(len(question_flat), question_type, dtype=np.int32),
                                      np.full(len(paragraph_flat), paragraph_type, dtype=np.int32)])
        type_ids = type_pool[index]
    return Windows(question_index, token_start, token_end, n_prefix + n_question + n_middle, run_length.sum(axis=1),
                   pool[index], type_ids)


def answer_positions(enc: Encoded, windows: Windows) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per window: whether it holds its question's whole answer, and the answer's first and last position in it."""
    answers = np.array([(-1, -1) if a is None else a for a in enc.answer_tokens], dtype=np.int64).reshape(-1, 2)
    first, last = answers[windows.question_index].T
    holds = (first >= 0) & (windows.token_start <= first) & (last < windows.token_end)
    shift = windows.context_start - windows.token_start
    return holds, first + shift, last + shift


def labelled(enc: Encoded, windows: Windows) -> Windows:
    """``windows`` labelled with the answer's first and last position where it is whole inside, else ``cls_index``."""
    holds, start, end = answer_positions(enc, windows)
    no_answer = enc.template.cls_index
    return dataclasses.replace(windows, start_position=np.where(holds, start, no_answer),
                               end_position=np.where(holds, end, no_answer))


def paragraph_lengths(enc: Encoded) -> list[int]:
    return [len(enc.paragraph_ids[q.paragraph_id]) for q in enc.data.questions]


def eval_windows(enc: Encoded) -> Windows:
    """Every window of every question, in question order, one every ``enc.spec.doc_stride`` tokens."""
    question_index, token_start = window_grid(paragraph_lengths(enc), question_budgets(enc), enc.spec.doc_stride)
    return cut_windows(enc, question_index, token_start)


def train_windows(enc: Encoded, policy: str, rng: random.Random) -> Windows:
    """Labelled training windows: ``random``/``center`` one per question holding its whole answer (none where
    none can); ``all`` every ``eval_windows`` window."""
    if policy == "all":
        return labelled(enc, eval_windows(enc))
    drawn = [(qi, train_window_start(policy, n_tokens, budget, answer, rng)) for qi, (n_tokens, budget, answer)
             in enumerate(zip(paragraph_lengths(enc), question_budgets(enc).tolist(), enc.answer_tokens))
             if answer is not None]
    kept = [(qi, start) for qi, start in drawn if start is not None]
    return labelled(enc, cut_windows(enc, [qi for qi, _ in kept], [start for _, start in kept]))


def padding_of(tokenizer) -> dict:
    """How ``tokenizer`` pads, as ``Windows.model_inputs`` takes it."""
    return dict(pad_token_id=tokenizer.pad_token_id, pad_type_id=tokenizer.pad_token_type_id,
                pad_left=tokenizer.padding_side == "left")


def question_windows(enc: Encoded, qi: int) -> list[tuple[int, int]]:
    """Paragraph tokens ``(start, end)``, end exclusive, of each window ``eval_windows`` cuts for question ``qi``."""
    n_tokens = len(enc.paragraph_ids[enc.data.questions[qi].paragraph_id])
    budget = int(question_budgets(enc)[qi])
    starts = window_grid([n_tokens], [budget], enc.spec.doc_stride)[1].tolist()
    return [(start, min(start + budget, n_tokens)) for start in starts]

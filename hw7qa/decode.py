"""Window logits → answer strings: span decoding, and the vote over several sets of windows.

One set of windows (``decode_predictions``), as Hugging Face's ``utils_qa.py``: per window the top ``n_best``
starts × top ``n_best`` ends *inside the paragraph part*, kept when ``start <= end`` and the span has at most
``max_answer_length`` tokens, scored ``start_logit + end_logit``; the best span over all windows of a question
wins. Ties: the earlier window, then within a window the later start and end; among equal logits the top-k takes
the leftmost. The answer is the paragraph sliced by the tokens' character offsets, never ``tokenizer.decode``, so
[UNK] characters, case and spaces come back as written. A span with no content in result.csv (``has_content``)
is passed over.

Several sets (``tta_strides``, ensembles; ``ensemble_predictions``): sets with the same windows are averaged
position by position and decoded as one; sets whose windows differ (other strides, other tokenizers) are decoded
into candidate *character* spans, whose softmax probabilities are averaged per span, each group weighted by its
number of members; the most probable span wins.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .config import DecodeSpec
from .submission import csv_answer
from .windows import Encoded, Windows, answer_positions

QUOTE_PAIRS = ("「」", "『』", "《》", "“”", "()", "（）")
CHUNK_WINDOWS = 4096   # windows decoded at once: the n_best × n_best pair arrays of a chunk stay a few MB


def has_content(answer: str) -> bool:
    """Whether ``answer`` still says something in result.csv: not empty once commas and whitespace are gone."""
    return bool(csv_answer(answer).strip())


@dataclass(frozen=True)
class Prediction:
    answer: str
    score: float            # start logit + end logit of the chosen span
    window: int             # index of the window it came from (-1: no window had a valid span)
    char_start: int         # [char_start, char_end) in the paragraph
    char_end: int


def top_positions(logits: np.ndarray, n_valid: np.ndarray, k: int) -> np.ndarray:
    """Per row of ``logits``, the positions of its ``k`` highest values among the first ``n_valid[row]``, in
    ascending order; -1 fills a row with fewer than ``k``. Values tied with the k-th highest are taken from
    the left, so the choice never depends on the sorting algorithm; NaN counts as -inf. ``k`` <= row length."""
    logits = np.where(np.isnan(logits), -np.inf, logits)
    width = logits.shape[1]
    kth = np.partition(logits, width - k, axis=1)[:, width - k:width - k + 1]   # each row's k-th highest value
    position = np.arange(width)
    valid = position < n_valid[:, None]
    above, tied = valid & (logits > kth), valid & (logits == kth)
    room = k - np.count_nonzero(above, axis=1)[:, None]        # how many of the tied values still fit
    chosen = above | (tied & (np.cumsum(tied, axis=1) <= room))
    chosen |= ~valid & (position < k)     # a row with fewer than k valid positions: fill it up to k ...
    columns = np.nonzero(chosen)[1].reshape(len(logits), k)    # ... so every row has k, in ascending order
    return np.where(columns < n_valid[:, None], columns, -1)   # ... and mark the filling invalid


def top_pairs(start_logits: np.ndarray, end_logits: np.ndarray, n_context: np.ndarray, n_best: int,
              max_answer_length: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per row of paragraph-part logits (the first ``n_context[row]`` columns valid), each pair of its ``n_best``
    highest starts × ends (``top_positions``), by start then end: ``(score, start, end, valid)``, rows × k·k;
    ``valid``: both exist, ``start <= end`` and the span has at most ``max_answer_length`` tokens."""
    k = min(n_best, start_logits.shape[1])
    starts = np.repeat(top_positions(start_logits, n_context, k), k, axis=1)
    ends = np.tile(top_positions(end_logits, n_context, k), k)
    score = (np.take_along_axis(start_logits, np.maximum(starts, 0), 1)
             + np.take_along_axis(end_logits, np.maximum(ends, 0), 1))
    length = ends - starts + 1
    return score, starts, ends, (starts >= 0) & (ends >= 0) & (length >= 1) & (length <= max_answer_length)


def best_spans(start_logits: np.ndarray, end_logits: np.ndarray, context_start: int, n_context: int,
               n_best: int, max_answer_length: int) -> list[tuple[float, int, int]]:
    """Valid spans (``top_pairs``) of the paragraph part of one window, positions ``context_start ..
    context_start + n_context - 1``, best first, as ``(score, start, end)`` window positions (inclusive)."""
    part = slice(context_start, context_start + n_context)
    score, start, end, valid = top_pairs(start_logits[None, part], end_logits[None, part], np.array([n_context]),
                                         n_best, max_answer_length)
    score, start, end = score[valid], context_start + start[valid], context_start + end[valid]
    order = np.lexsort((-end, -start, -score))   # best score first; ties: later start, then later end
    return list(zip(score[order].tolist(), start[order].tolist(), end[order].tolist()))


def context_logits(windows: Windows, logits: list[tuple[np.ndarray, np.ndarray]], rows: range
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Start and end logits of the paragraph part of windows ``rows``, one row each, padded with
    -inf to the longest paragraph part: column j is window position ``context_start + j``."""
    n_context = windows.token_end[rows] - windows.token_start[rows]
    column = np.arange(n_context.max(initial=0))
    inside = column < n_context[:, None]
    packed = []
    for side in (0, 1):
        arrays = [logits[i][side] for i in rows]
        lengths = np.array([len(a) for a in arrays])
        first = np.cumsum(lengths) - lengths                # where each window's logits start once concatenated
        where = np.where(inside, (first + windows.context_start[rows])[:, None] + column, 0)
        packed.append(np.where(inside, np.concatenate(arrays)[where], -np.inf))
    return packed[0], packed[1]


def window_best_spans(windows: Windows, logits: list[tuple[np.ndarray, np.ndarray]], spec: DecodeSpec
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The first span ``best_spans`` gives for each window, for all windows at once: ``(score, start, end, found)``,
    positions in the window; ``found`` is False where no top-k pair is valid (the rest is then meaningless)."""
    n = len(windows)
    score, start, end, found = np.zeros(n, np.float64), np.zeros(n, np.int64), np.zeros(n, np.int64), np.zeros(n, bool)
    for lo in range(0, n, CHUNK_WINDOWS):
        rows = range(lo, min(lo + CHUNK_WINDOWS, n))
        start_logits, end_logits = context_logits(windows, logits, rows)
        if start_logits.shape[1] == 0:       # no window of the chunk has a paragraph token
            continue
        n_context = windows.token_end[rows] - windows.token_start[rows]
        pair_score, starts, ends, valid = top_pairs(start_logits, end_logits, n_context, spec.n_best,
                                                    spec.max_answer_length)
        top = np.where(valid, pair_score, -np.inf).max(axis=1, keepdims=True)
        hits = valid & (pair_score == top)
        # pairs run through starts, then ends, in ascending positions: the last hit is the best
        # pair with the later start, then the later end, as ``best_spans`` breaks ties
        pick = hits.shape[1] - 1 - np.argmax(hits[:, ::-1], axis=1)
        context_start, row = windows.context_start[rows], np.arange(len(rows))
        score[rows] = top[:, 0]
        start[rows] = context_start + starts[row, pick]
        end[rows] = context_start + ends[row, pick]
        found[rows] = hits.any(axis=1)
    return score, start, end, found


def best_window_per_question(question_index: np.ndarray, score: np.ndarray, found: np.ndarray,
                             n_questions: int) -> np.ndarray:
    """For each question, the window whose best span scores highest (the first such window on
    ties), among the windows with ``found``; -1 for a question with none."""
    rows = np.flatnonzero(found)
    rows = rows[np.lexsort((rows, -score[rows], question_index[rows]))]   # by question, best score first
    questions, first = np.unique(question_index[rows], return_index=True)   # each question's first row
    best = np.full(n_questions, -1, dtype=np.int64)
    best[questions] = rows[first]
    return best


def exhaustive_best_span(start_logits: np.ndarray, end_logits: np.ndarray, context_start: int,
                         n_context: int, max_answer_length: int) -> tuple[float, int, int]:
    """The best valid span over *all* starts and ends of the paragraph part (the top-k fallback)."""
    part = slice(context_start, context_start + n_context)
    scores = start_logits[part].astype(np.float64)[:, None] + end_logits[part].astype(np.float64)[None, :]
    length = np.arange(n_context)[None, :] - np.arange(n_context)[:, None] + 1
    scores[(length < 1) | (length > max_answer_length)] = -np.inf
    r, c = np.unravel_index(np.argmax(scores), scores.shape)
    return float(scores[r, c]), context_start + int(r), context_start + int(c)


def balance_quotes(paragraph: str, start: int, end: int) -> tuple[int, int]:
    """Repair an unpaired quote or bracket at the edges of ``paragraph[start:end]``: for each of ``QUOTE_PAIRS``,
    an opening mark without its closing one extends the span by one character if the paragraph continues
    with the closing mark, else a leading opening mark is dropped; a closing mark without its opening one
    works the same way to the left. The span never becomes empty."""
    for opening, closing in QUOTE_PAIRS:
        text = paragraph[start:end]
        surplus = text.count(opening) - text.count(closing)
        if surplus > 0:
            if paragraph[end:end + 1] == closing:
                end += 1
            elif text.startswith(opening) and end - start > 1:
                start += 1
        elif surplus < 0:
            if start > 0 and paragraph[start - 1] == opening:
                start -= 1
            elif text.endswith(closing) and end - start > 1:
                end -= 1
    return start, end


def window_spans(windows: Windows, logits: list[tuple[np.ndarray, np.ndarray]], wi: int, spec: DecodeSpec,
                 search: str) -> list[tuple[float, int, int]]:
    """The spans of window ``wi``, best first: its ``best_spans`` (``search="top-k"``) or its one
    ``exhaustive_best_span`` (``"exhaustive"``); none for a window without paragraph tokens."""
    (start_logits, end_logits), context_start = logits[wi], int(windows.context_start[wi])
    n_context = int(windows.token_end[wi] - windows.token_start[wi])
    if n_context == 0:
        return []
    if search == "top-k":
        return best_spans(start_logits, end_logits, context_start, n_context, spec.n_best, spec.max_answer_length)
    return [exhaustive_best_span(start_logits, end_logits, context_start, n_context, spec.max_answer_length)]


def walk_spans(enc: Encoded, windows: Windows, logits: list[tuple[np.ndarray, np.ndarray]], qi: int,
               spec: DecodeSpec, search: str) -> tuple[float, int, int, int] | None:
    """The best span of question ``qi`` found one span at a time: ``(score, window, char_start, char_end)``,
    or None if no span has content. Each window's spans (``window_spans``) are walked best first, those
    without content (``has_content``) skipped; a window's first span with content replaces the best so far
    only if it scores higher, so ties go to the earlier window."""
    paragraph = enc.data.paragraph(enc.data.questions[qi])
    best = None
    for wi in np.flatnonzero(windows.question_index == qi).tolist():
        for score, s, e in window_spans(windows, logits, wi, spec, search):
            if best is not None and score <= best[0]:
                break
            char_start, char_end = windows.char_span(enc, wi, s, e)
            if has_content(paragraph[char_start:char_end]):
                best = (score, wi, char_start, char_end)
                break
    return best


def decode_predictions(enc: Encoded, windows: Windows, logits: list[tuple[np.ndarray, np.ndarray]],
                       spec: DecodeSpec = DecodeSpec()) -> list[Prediction]:
    """One ``Prediction`` per question of ``enc.data``: the best span over all its windows (``best_spans``,
    ties as the module says), quotes repaired if ``spec.balance_quotes``. A span without content
    (``has_content``) is skipped; where no window has a valid top-k pair every start and end is searched,
    so an answer is empty only if its paragraph has no tokens. Every window's best span is found at once
    (``window_best_spans``); a question is walked span by span (``walk_spans``) only if its best is empty."""
    score, start, end, found = window_best_spans(windows, logits, spec)
    best_window = best_window_per_question(windows.question_index, score, found, len(enc.data.questions))
    predictions = []
    for qi, wi in enumerate(best_window.tolist()):
        paragraph = enc.data.paragraph(enc.data.questions[qi])
        best = None
        if wi >= 0:        # some window has a valid top-k pair
            best = (float(score[wi]), wi, *windows.char_span(enc, wi, int(start[wi]), int(end[wi])))
            if not has_content(paragraph[best[2]:best[3]]):
                best = walk_spans(enc, windows, logits, qi, spec, "top-k")
        best = best or walk_spans(enc, windows, logits, qi, spec, "exhaustive")
        if best is None:
            predictions.append(Prediction("", float("-inf"), -1, 0, 0))
            continue
        best_score, wi, char_start, char_end = best
        if spec.balance_quotes:
            char_start, char_end = balance_quotes(paragraph, char_start, char_end)
        predictions.append(Prediction(paragraph[char_start:char_end], best_score, wi, char_start, char_end))
    return predictions


def oracle_logits(enc: Encoded, windows: Windows) -> list[tuple[np.ndarray, np.ndarray]]:
    """Logits of a perfect model: 10 on the gold start and end token of every window holding the whole answer,
    0 elsewhere. Decoding these measures what the windows and decoding alone lose."""
    logits = [(np.zeros(n, np.float32), np.zeros(n, np.float32)) for n in windows.length.tolist()]
    holds, start, end = answer_positions(enc, windows)
    for i in np.flatnonzero(holds).tolist():
        logits[i][0][start[i]] = logits[i][1][end[i]] = 10
    return logits


# ---------------------------------------------------------------- several sets of logits: strides, models

def same_windows(a: Windows, b: Windows) -> bool:
    """True if both tables hold the same tokens for the same questions, window by window."""
    return all(np.array_equal(x, y) for x, y in zip((a.question_index, a.length, a.ids),
                                                   (b.question_index, b.length, b.ids)))


def average_logits(members: list[list[tuple[np.ndarray, np.ndarray]]]) -> list[tuple[np.ndarray, np.ndarray]]:
    """Mean start and end logits over members that share their windows."""
    return [(np.mean([m[w][0] for m in members], axis=0), np.mean([m[w][1] for m in members], axis=0))
            for w in range(len(members[0]))]


def span_scores(enc: Encoded, windows: Windows, logits: list[tuple[np.ndarray, np.ndarray]],
                spec: DecodeSpec = DecodeSpec()) -> list[dict[tuple[int, int], float]]:
    """Per question, ``{(char_start, char_end): score}`` over its candidate spans: the ``best_spans`` with
    content (``has_content``) of each of its windows, in window order; a span seen in several windows keeps
    its highest score (start logit + end logit)."""
    scores: list[dict[tuple[int, int], float]] = [{} for _ in enc.data.questions]
    for wi, qi in enumerate(windows.question_index.tolist()):
        paragraph, found = enc.data.paragraph(enc.data.questions[qi]), scores[qi]
        for score, s, e in window_spans(windows, logits, wi, spec, "top-k"):
            span = windows.char_span(enc, wi, s, e)
            if has_content(paragraph[span[0]:span[1]]) and score > found.get(span, -np.inf):
                found[span] = float(score)
    return scores


def softmax(scores: dict) -> dict:
    """``scores``' values turned into probabilities (the same keys; {} stays {})."""
    if not scores:
        return {}
    values = np.array(list(scores.values()), dtype=np.float64)
    weights = np.exp(values - values.max())
    return dict(zip(scores, (weights / weights.sum()).tolist()))


def combine_at_characters(enc: Encoded, groups: list[list[dict[tuple[int, int], float]]], weights: list[float],
                          fallback: list[Prediction], quotes: bool = True) -> list[Prediction]:
    """Per question the character span with the highest weighted mean probability over ``groups`` (each,
    per question, ``{(char_start, char_end): probability}``); ``fallback[q]`` where no group proposed any
    span. ``Prediction.score`` is that probability and ``window`` is -1 (no single window)."""
    total = sum(weights)
    predictions = []
    for qi, question in enumerate(enc.data.questions):
        combined: dict[tuple[int, int], float] = {}
        for group, weight in zip(groups, weights):
            for span, p in group[qi].items():
                combined[span] = combined.get(span, 0.0) + weight * p / total
        if not combined:
            predictions.append(fallback[qi])
            continue
        (char_start, char_end), probability = max(combined.items(), key=lambda kv: kv[1])
        paragraph = enc.data.paragraph(question)
        if quotes:
            char_start, char_end = balance_quotes(paragraph, char_start, char_end)
        predictions.append(Prediction(paragraph[char_start:char_end], probability, -1, char_start, char_end))
    return predictions


def ensemble_predictions(members: list[tuple[Encoded, Windows, list]], spec: DecodeSpec = DecodeSpec(),
                         method: str = "auto") -> tuple[list[Prediction], str]:
    """Answers of the ensemble of ``members`` (each ``(enc, windows, logits)`` for the same questions) and a
    line saying how they were combined: ``method="auto"`` averages logits within groups of same-window
    members and combines groups at the character level; ``"chars"`` makes every member its own group."""
    if method not in ("auto", "chars"):
        raise ValueError(f"method={method!r}; choose auto or chars")
    n_questions = {len(enc.data.questions) for enc, _, _ in members}
    if len(n_questions) != 1:
        raise ValueError(f"the members answered different numbers of questions: {sorted(n_questions)}")
    groups: list[list[int]] = []
    for i, (_, windows, _) in enumerate(members):
        home = next((g for g in groups if method == "auto" and same_windows(members[g[0]][1], windows)), None)
        if home is None:
            groups.append([i])
        else:
            home.append(i)
    averaged = [(members[g[0]][0], members[g[0]][1], average_logits([members[i][2] for i in g])) for g in groups]
    how = " + ".join(f"({'+'.join(f'#{i + 1}' for i in g)})" for g in groups)
    first = decode_predictions(*averaged[0], spec)
    if len(groups) == 1:
        return first, f"logits averaged window by window: {how}"
    # per group and question, the softmax of its candidate spans' scores
    probabilities = [[softmax(found) for found in span_scores(*member, spec)] for member in averaged]
    combined = combine_at_characters(averaged[0][0], probabilities, [len(g) for g in groups], first,
                                     spec.balance_quotes)
    return combined, f"character-level vote of {len(groups)} groups, logits averaged within each: {how}"


def vote_predictions(members: list[tuple[Encoded, Windows, list]], spec: DecodeSpec = DecodeSpec()
                     ) -> list[Prediction]:
    """Answers from the logits of one model over several sets of windows (``tta_strides``: one set
    per ``doc_stride``), combined at the character level; with one set, that set decoded alone."""
    if len(members) == 1:
        return decode_predictions(*members[0], spec)
    return ensemble_predictions(members, spec, method="chars")[0]

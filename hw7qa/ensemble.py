"""Combine the window logits of several trained models into one answer per question.

Two ways, chosen per pair of members:

- **Same windows** (same tokenizer and window settings, so every window holds the same tokens):
  the members' start and end logits are averaged position by position, window by window, and
  the average is decoded like one model's logits (``decode.decode_predictions``).
- **Different windows** (e.g. a BERT-vocabulary model with a sentencepiece one): tokens do not
  line up, characters do. Each group of same-window members is decoded into *candidate character
  spans* — the n-best valid spans of every window, mapped to ``[char_start, char_end)`` of the
  paragraph, a span found in several windows keeping its best score — and the scores of one
  question's candidates are turned into probabilities with a softmax. The groups' probabilities
  are averaged per character span, each group weighted by its number of members (a span a group
  did not propose counts 0 for it); the most probable span wins, then quotes are balanced as in
  ``decode``.

Both reduce to the member itself when there is one member, or several identical ones: averaging
identical logits changes nothing, and the softmax keeps the order of the scores.
"""
from __future__ import annotations

import numpy as np

from .config import DecodeSpec
from .decode import Prediction, balance_quotes, best_spans, decode_predictions
from .submission import has_content
from .windows import Encoded, Window


def same_windows(a: list[Window], b: list[Window]) -> bool:
    """True if both window lists hold the same tokens for the same questions, window by window."""
    return len(a) == len(b) and all(x.question_index == y.question_index and x.input_ids == y.input_ids
                                    for x, y in zip(a, b))


def average_logits(members: list[list[tuple[np.ndarray, np.ndarray]]]) -> list[tuple[np.ndarray, np.ndarray]]:
    """Mean start and end logits over members that share their windows."""
    return [(np.mean([m[w][0] for m in members], axis=0), np.mean([m[w][1] for m in members], axis=0))
            for w in range(len(members[0]))]


def span_scores(enc: Encoded, windows: list[Window], logits: list[tuple[np.ndarray, np.ndarray]],
                spec: DecodeSpec = DecodeSpec()) -> list[dict[tuple[int, int], float]]:
    """Per question, ``{(char_start, char_end): score}`` over its candidate spans.

    Candidates are ``best_spans`` of every window of the question (spans of only whitespace and
    commas left out: ``submission.has_content``), as paragraph character spans, in window order;
    a span seen in several windows keeps its highest score (start logit + end logit).
    """
    scores: list[dict[tuple[int, int], float]] = [{} for _ in enc.data.questions]
    for w, (start_logits, end_logits) in zip(windows, logits):
        n_context = w.token_end - w.token_start
        if n_context == 0:
            continue
        paragraph = enc.data.paragraph(enc.data.questions[w.question_index])
        found = scores[w.question_index]
        for score, s, e in best_spans(start_logits, end_logits, w.context_start, n_context, spec.n_best,
                                      spec.max_answer_length):
            span = w.char_span(enc, s, e)
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


def span_probabilities(enc: Encoded, windows: list[Window], logits: list[tuple[np.ndarray, np.ndarray]],
                       spec: DecodeSpec = DecodeSpec()) -> list[dict[tuple[int, int], float]]:
    """Per question, ``{(char_start, char_end): probability}`` over its candidate spans: the
    softmax of their ``span_scores`` over the question's candidates."""
    return [softmax(found) for found in span_scores(enc, windows, logits, spec)]


def combine_at_characters(enc: Encoded, groups: list[list[dict[tuple[int, int], float]]], weights: list[float],
                          fallback: list[Prediction], quotes: bool = True) -> list[Prediction]:
    """Per question the character span with the highest weighted mean probability over ``groups``
    (each a ``span_probabilities`` result); ``fallback[q]`` where no group proposed any span.
    ``Prediction.score`` is that probability and ``window`` is -1 (no single window)."""
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


def ensemble_predictions(members: list[tuple[Encoded, list[Window], list]], spec: DecodeSpec = DecodeSpec(),
                         method: str = "auto") -> tuple[list[Prediction], str]:
    """Answers of the ensemble of ``members`` (each ``(enc, windows, logits)`` for the same questions)
    and a one-line description of how they were combined.

    ``method="auto"`` averages logits within groups of same-window members and combines groups at
    the character level; ``method="chars"`` treats every member as its own group.
    """
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
    probabilities = [span_probabilities(enc, windows, logits, spec) for enc, windows, logits in averaged]
    combined = combine_at_characters(averaged[0][0], probabilities, [len(g) for g in groups], first,
                                     spec.balance_quotes)
    return combined, f"character-level vote of {len(groups)} groups, logits averaged within each: {how}"


def vote_predictions(members: list[tuple[Encoded, list[Window], list]], spec: DecodeSpec = DecodeSpec()
                     ) -> list[Prediction]:
    """Answers from the logits of one model over several sets of windows (``tta_strides``: one set
    per ``doc_stride``), combined at the character level; with one set, that set decoded alone."""
    if len(members) == 1:
        return decode_predictions(*members[0], spec)
    return ensemble_predictions(members, spec, method="chars")[0]

"""Vectorised decoding against the decoding it replaced, kept here as the reference: one window and
one span at a time, the n-best of a window taken with ``np.argpartition``.

Random float logits have no ties, so both must give the same predictions, score and window
included. With ties the reference's choice among equal logits is up to ``argpartition``; there the
vectorised decoding is checked against its own one-span-at-a-time rule (``walk_spans``), which
breaks ties from the left.
"""
import dataclasses

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from conftest import shared_path, window_rows
from hw7qa.config import Config, DecodeSpec, WindowSpec
from hw7qa.data import QAData, Question, load_qa_file
from hw7qa.decode import (Prediction, balance_quotes, decode_predictions, exhaustive_best_span, top_positions,
                          walk_spans)
from hw7qa.decode import has_content
from hw7qa.submission import check_result_csv, write_result_csv
from hw7qa.models import load_tokenizer
from hw7qa.windows import encode, eval_windows


def highest(logits, k):
    """``top_positions`` of one row with no invalid positions, the simple way: a stable sort keeps
    tied values in position order, so the leftmost of them come first."""
    ranked = np.argsort(-np.where(np.isnan(logits), -np.inf, logits), kind="stable")
    return np.sort(ranked[:k])


def reference_best_spans(start_logits, end_logits, context_start, n_context, n_best, max_answer_length):
    lo, hi = context_start, context_start + n_context
    k = min(n_best, n_context)
    starts = lo + np.argpartition(-start_logits[lo:hi], k - 1)[:k]
    ends = lo + np.argpartition(-end_logits[lo:hi], k - 1)[:k]
    scores = start_logits[starts][:, None] + end_logits[ends][None, :]
    length = ends[None, :] - starts[:, None] + 1
    rows, cols = np.nonzero((length >= 1) & (length <= max_answer_length))
    score, start, end = scores[rows, cols], starts[rows], ends[cols]
    order = np.lexsort((-end, -start, -score))
    return list(zip(score[order].tolist(), start[order].tolist(), end[order].tolist()))


def reference_decode(enc, windows, logits, spec):
    """``decode_predictions`` before it was vectorised, with ``Window`` objects."""
    windows = window_rows(windows)
    by_question = [[] for _ in enc.data.questions]
    for wi, w in enumerate(windows):
        by_question[w.question_index].append(wi)
    predictions = []
    for qi, window_ids in enumerate(by_question):
        paragraph = enc.data.paragraph(enc.data.questions[qi])
        best = None
        for search in ("top-k", "exhaustive"):
            for wi in window_ids:
                w, (s_logits, e_logits) = windows[wi], logits[wi]
                n_context = w.token_end - w.token_start
                if n_context == 0:
                    continue
                spans = (reference_best_spans(s_logits, e_logits, w.context_start, n_context, spec.n_best,
                                              spec.max_answer_length) if search == "top-k" else
                         [exhaustive_best_span(s_logits, e_logits, w.context_start, n_context, spec.max_answer_length)])
                for score, s, e in spans:
                    if best is not None and score <= best[0]:
                        break
                    char_start, char_end = w.char_span(enc, s, e)
                    if has_content(paragraph[char_start:char_end]):
                        best = (score, wi, char_start, char_end)
                        break
            if best is not None:
                break
        if best is None:
            predictions.append(Prediction("", float("-inf"), -1, 0, 0))
            continue
        score, wi, char_start, char_end = best
        if spec.balance_quotes:
            char_start, char_end = balance_quotes(paragraph, char_start, char_end)
        predictions.append(Prediction(paragraph[char_start:char_end], score, wi, char_start, char_end))
    return predictions


def random_logits(windows, seed):
    rng = np.random.default_rng(seed)
    return [(rng.standard_normal(len(w.input_ids)).astype(np.float32),
             rng.standard_normal(len(w.input_ids)).astype(np.float32)) for w in window_rows(windows)]


SPECS = [DecodeSpec(), DecodeSpec(n_best=3, max_answer_length=5), DecodeSpec(n_best=1, max_answer_length=2),
         DecodeSpec(n_best=20, max_answer_length=30, balance_quotes=False)]


@pytest.mark.parametrize("spec", SPECS)
def test_same_predictions_as_the_reference_on_the_sample(any_tokenizer, sample_train, sample_dev, spec):
    for data in (sample_train, sample_dev):
        enc = encode(data, any_tokenizer, WindowSpec(64, 16, doc_stride=12))
        windows = eval_windows(enc)
        for seed in range(3):
            logits = random_logits(windows, seed)
            assert decode_predictions(enc, windows, logits, spec) == reference_decode(enc, windows, logits, spec)


def test_same_predictions_as_the_reference_on_the_real_dev_file():
    """All 3,524 questions of the 2021 HW7 dev file in the sample's windows at doc_stride 32 (38,368
    windows), the real bert-base-chinese vocabulary, random logits."""
    dev = load_qa_file(shared_path("data/hw7-2021/hw7_dev.json"), need_answers=True)
    tokenizer = load_tokenizer(shared_path("models/bert-base-chinese-tokenizer"))
    cfg = Config(max_length=193, max_question_tokens=40, max_paragraph_tokens=150, doc_stride=32)
    enc = encode(dev, tokenizer, cfg.windows)
    windows = eval_windows(enc)
    logits = random_logits(windows, 0)
    assert len(windows) > 38_000
    expected = reference_decode(enc, windows, logits, cfg.decoding)
    assert decode_predictions(enc, windows, logits, cfg.decoding) == expected


def test_a_whitespace_best_span_gives_way_to_the_next(bert_tokenizer):
    paragraph = "甲乙丙丁戊己庚辛"
    data = QAData("mem", [Question(0, "問?", 0), Question(1, "問?", 1)], [paragraph, "甲"])
    enc = encode(data, bert_tokenizer, WindowSpec(64, 16, doc_stride=32))
    # pretend token 2 (丙) covers no character, as a lone sentencepiece "▁" does once trimmed; and the
    # second paragraph has no tokens (encode refuses such a file; the decoder still answers it empty)
    offsets = [list(enc.paragraph_offsets[0]), []]
    offsets[0][2] = (2, 2)
    enc = dataclasses.replace(enc, paragraph_offsets=offsets, paragraph_ids=[enc.paragraph_ids[0], []])
    windows = eval_windows(enc)
    logits = [(np.zeros(len(w.input_ids), np.float32), np.zeros(len(w.input_ids), np.float32))
              for w in window_rows(windows)]
    first = window_rows(windows)[0].context_start
    logits[0][0][first + 2] = logits[0][1][first + 2] = 9      # the best span: 丙 alone, now empty (18)
    logits[0][0][first + 4] = logits[0][1][first + 5] = 5      # the next best: 丙 to 己 (14), then 戊己 (10)
    predictions = decode_predictions(enc, windows, logits, DecodeSpec())
    assert predictions == reference_decode(enc, windows, logits, DecodeSpec())
    assert (predictions[0].answer, predictions[0].score) == ("丙丁戊己", 14)
    assert predictions[1] == Prediction("", float("-inf"), -1, 0, 0)      # a paragraph without tokens


def test_a_comma_best_span_gives_way_to_the_next_and_the_csv_stays_valid(bert_tokenizer, tmp_path):
    """result.csv drops commas, so an answer of only "," would be an empty, invalid answer there."""
    paragraph = "甲乙,丙丁"
    data = QAData("mem", [Question(0, "問?", 0)], [paragraph])
    enc = encode(data, bert_tokenizer, WindowSpec(64, 16, doc_stride=32))
    windows = eval_windows(enc)
    logits = [(np.zeros(len(w.input_ids), np.float32), np.zeros(len(w.input_ids), np.float32))
              for w in window_rows(windows)]
    first = window_rows(windows)[0].context_start
    assert paragraph[slice(*windows.char_span(enc, 0, first + 2, first + 2))] == ","
    logits[0][0][first + 2] = logits[0][1][first + 2] = 9      # the best span: "," alone (18)
    logits[0][1][first + 3] = 5                                # the next best: ",丙" (14)
    predictions = decode_predictions(enc, windows, logits, DecodeSpec())
    assert predictions == reference_decode(enc, windows, logits, DecodeSpec())
    assert (predictions[0].answer, predictions[0].score) == (",丙", 14)
    path = write_result_csv(data, [p.answer for p in predictions], tmp_path / "result.csv")
    assert check_result_csv(path, data) == [] and path.read_text(encoding="utf-8").splitlines()[1] == "0,丙"


@settings(max_examples=200, deadline=None)
@given(seed=st.integers(0, 10**6), rows=st.integers(1, 12), width=st.integers(1, 30), k=st.integers(1, 30))
def test_top_positions_of_many_rows_equal_a_stable_sort_of_each(seed, rows, width, k):
    rng = np.random.default_rng(seed)
    k = min(k, width)
    logits = rng.integers(-2, 3, (rows, width)).astype(np.float32)     # few values: many ties
    logits[rng.random((rows, width)) < 0.1] = np.nan
    n_valid = rng.integers(0, width + 1, rows)
    for row, n in enumerate(n_valid):
        logits[row, n:] = -np.inf
    top = top_positions(logits, n_valid, k)
    for row, n in enumerate(n_valid):
        expected = highest(logits[row, :n], min(k, n)) if n else np.array([], dtype=np.int64)
        assert top[row].tolist() == expected.tolist() + [-1] * (k - len(expected))


@pytest.mark.parametrize("spec", SPECS)
def test_vectorised_decoding_is_walking_the_spans_also_with_ties(bert_tokenizer, sample_dev, spec):
    enc = encode(sample_dev, bert_tokenizer, WindowSpec(64, 16, doc_stride=12))
    windows = eval_windows(enc)
    rng = np.random.default_rng(0)
    logits = [(rng.integers(0, 3, len(w.input_ids)).astype(np.float32),
               rng.integers(0, 3, len(w.input_ids)).astype(np.float32)) for w in window_rows(windows)]
    spec = dataclasses.replace(spec, balance_quotes=False)
    for qi, prediction in enumerate(decode_predictions(enc, windows, logits, spec)):
        walked = walk_spans(enc, windows, logits, qi, spec, "top-k") or walk_spans(enc, windows, logits, qi, spec,
                                                                                  "exhaustive")
        assert (prediction.score, prediction.window, prediction.char_start, prediction.char_end) == walked

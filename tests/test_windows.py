import dataclasses
import random
import re

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from conftest import features, window_rows
from hw7qa.data import QAData, Question
from hw7qa.config import WindowSpec
from hw7qa.windows import (char_span_to_tokens, encode, eval_windows, learn_template, run_index, train_window_start,
                           train_windows, trim_offsets, trimmed_offsets, window_grid)


def window_starts(n_tokens: int, budget: int, doc_stride: int) -> list[int]:
    """First paragraph token of every window: 0, stride, 2*stride, ... until the end is reached."""
    return window_grid([n_tokens], [budget], doc_stride)[1].tolist()


def covered_characters(enc, windows, qi):
    offsets = enc.paragraph_offsets[enc.data.questions[qi].paragraph_id]
    chars = set()
    for w in window_rows(windows):
        if w.question_index == qi:
            for s, e in offsets[w.token_start:w.token_end]:
                chars.update(range(s, e))
    return chars


def test_template_read_from_the_tokenizer(bert_tokenizer, sentencepiece_tokenizer):
    bert = learn_template(bert_tokenizer)
    assert bert.prefix == [bert_tokenizer.cls_token_id] and bert.middle == bert.suffix == [bert_tokenizer.sep_token_id]
    assert bert.type_ids is not None and bert.type_ids[1] == 0 and bert.type_ids[3] == 1
    sp = learn_template(sentencepiece_tokenizer)
    eos = sentencepiece_tokenizer.eos_token_id
    assert sp.middle == [eos, eos] and sp.suffix == [eos] and sp.type_ids is None


@pytest.mark.parametrize("doc_stride", [1, 7, 32, 1000])
def test_every_paragraph_character_is_in_a_window(any_tokenizer, sample_dev, doc_stride):
    enc = encode(sample_dev, any_tokenizer, WindowSpec(max_length=64, max_question_tokens=16, doc_stride=doc_stride))
    windows = eval_windows(enc)
    for qi, q in enumerate(sample_dev.questions):
        paragraph = sample_dev.paragraph(q)
        tokens_cover = {c for s, e in enc.paragraph_offsets[q.paragraph_id] for c in range(s, e)}
        assert covered_characters(enc, windows, qi) == tokens_cover
        assert {c for c, ch in enumerate(paragraph) if not ch.isspace()} <= tokens_cover
        mine = [w for w in window_rows(windows) if w.question_index == qi]
        assert all(len(w.input_ids) <= 64 for w in mine)
        if len(paragraph) > 300:
            assert len(mine) > 1


def test_window_input_is_question_then_paragraph_slice(bert_tokenizer, sample_dev):
    enc = encode(sample_dev, bert_tokenizer, WindowSpec(max_length=64, max_question_tokens=8, doc_stride=20))
    for w in window_rows(eval_windows(enc)):
        q = sample_dev.questions[w.question_index]
        assert w.input_ids[1:1 + len(enc.question_ids[w.question_index])] == enc.question_ids[w.question_index]
        assert len(enc.question_ids[w.question_index]) <= 8
        p_ids = enc.paragraph_ids[q.paragraph_id][w.token_start:w.token_end]
        assert w.input_ids[w.context_start:w.context_start + len(p_ids)] == p_ids
        assert w.token_type_ids[w.context_start] == 1 and w.token_type_ids[1] == 0


def test_window_starts_advance_by_doc_stride_and_reach_the_end():
    assert window_starts(10, 4, 3) == [0, 3, 6]
    assert window_starts(10, 4, 9) == [0, 4, 8]          # stride capped at the window size
    assert window_starts(3, 4, 2) == [0]


@settings(max_examples=300, deadline=None)
@given(n=st.integers(1, 400), budget=st.integers(1, 120), stride=st.integers(1, 200))
def test_window_grid_covers_every_token(n, budget, stride):
    starts = window_starts(n, budget, stride)
    covered = set()
    for s in starts:
        covered.update(range(s, min(s + budget, n)))
    assert covered == set(range(n))
    assert starts == sorted(set(starts))


@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_training_window_contains_whole_answer(data):
    n = data.draw(st.integers(1, 300))
    budget = data.draw(st.integers(1, 100))
    a = data.draw(st.integers(0, n - 1))
    b = data.draw(st.integers(a, min(n - 1, a + 40)))
    policy = data.draw(st.sampled_from(["random", "center"]))
    start = train_window_start(policy, n, budget, (a, b), random.Random(data.draw(st.integers(0, 9))))
    if b - a + 1 > budget:
        assert start is None
    else:
        assert 0 <= start <= a and b < start + budget and (start + budget <= n or start == max(0, n - budget) or start == 0)


def test_random_policy_draws_all_positions_uniformly():
    counts = {}
    rng = random.Random(0)
    for _ in range(6000):
        s = train_window_start("random", 100, 20, (50, 52), rng)
        counts[s] = counts.get(s, 0) + 1
    assert sorted(counts) == list(range(33, 51))          # every start whose window holds tokens 50..52
    assert min(counts.values()) > 6000 / 18 * 0.7


def test_center_policy_centres_the_answer():
    assert train_window_start("center", 300, 100, (150, 152), random.Random(0)) == 101
    assert train_window_start("center", 300, 100, (2, 3), random.Random(0)) == 0


@pytest.mark.parametrize("policy", ["random", "center", "all"])
def test_labels_point_at_the_answer(any_tokenizer, sample_train, policy):
    enc = encode(sample_train, any_tokenizer, WindowSpec(max_length=64, max_question_tokens=16, doc_stride=24))
    windows = train_windows(enc, policy, random.Random(0))
    with_answer = 0
    for w in window_rows(windows):
        q = sample_train.questions[w.question_index]
        if w.start_position == enc.template.cls_index == w.end_position:
            assert policy == "all"
            continue
        with_answer += 1
        s, e = w.char_span(enc, w.start_position, w.end_position)
        assert s <= q.answer_start < w.char_span(enc, w.start_position, w.start_position)[1]
        assert w.char_span(enc, w.end_position, w.end_position)[0] <= q.answer_end < e
    assert with_answer >= len(sample_train.questions) - 2
    if policy != "all":
        assert len(windows) == with_answer


def test_random_policy_draws_new_windows_each_epoch(bert_tokenizer, sample_train):
    enc = encode(sample_train, bert_tokenizer, WindowSpec(max_length=48, max_question_tokens=16, doc_stride=16))
    rng = random.Random(0)
    first = [w.token_start for w in window_rows(train_windows(enc, "random", rng))]
    second = [w.token_start for w in window_rows(train_windows(enc, "random", rng))]
    assert first != second


def test_char_span_to_tokens_shared_offsets_and_uncovered_spaces():
    # sentencepiece's lone "▁" shares its offsets with the next token; a space has no token
    offsets = [(0, 1), (0, 1), (1, 3), (4, 6), (6, 7)]
    assert char_span_to_tokens(offsets, 0, 2) == (1, 2)
    assert char_span_to_tokens(offsets, 3, 5) == (3, 3)       # answer starting on a space
    assert char_span_to_tokens(offsets, 4, 6) == (3, 4)
    assert char_span_to_tokens(offsets, 3, 3) is None


def test_answers_map_to_tokens_on_the_real_tokenizer(real_bert_tokenizer):
    paragraph = "蔡鍔 NASA 於1,000年「台灣」New York成立。"
    data = QAData("mem", [Question(0, "誰?", 0, "NASA", 3, 6), Question(1, "何?", 0, "New York", 19, 26)], [paragraph])
    enc = encode(data, real_bert_tokenizer, WindowSpec(64, 16))
    for q, (s, e) in zip(data.questions, enc.answer_tokens):
        offsets = enc.paragraph_offsets[0]
        assert paragraph[offsets[s][0]:offsets[e][1]] == q.answer_text


def test_offsets_never_put_spaces_at_the_edges_of_an_answer(any_tokenizer):
    paragraph = "蘋果公司的創辦人是 Steve Jobs ，他在 1976 年創立了 Apple Computer 公司。"
    answers = ["Steve Jobs", "1976", "Apple Computer", "Jobs"]
    data = QAData("mem", [Question(i, "誰?", 0, a, paragraph.index(a), paragraph.index(a) + len(a) - 1)
                          for i, a in enumerate(answers)], [paragraph])
    enc = encode(data, any_tokenizer, WindowSpec(64, 16))
    assert all(span is not None for span in enc.answer_tokens)
    for q, (s, e) in zip(data.questions, enc.answer_tokens):
        text = paragraph[enc.paragraph_offsets[0][s][0]:enc.paragraph_offsets[0][e][1]]
        assert text == text.strip() and q.answer_text in text, (q.answer_text, text)


def reference_budget(enc, qi):
    budget = enc.spec.max_length - len(enc.question_ids[qi]) - enc.template.n_special
    return min(budget, enc.spec.max_paragraph_tokens) if enc.spec.max_paragraph_tokens else budget


def reference_window(enc, qi, token_start):
    """One window built from lists, as windows were built before ``cut_windows``: (fields, label)."""
    t = enc.template
    q_ids = enc.question_ids[qi]
    p_all = enc.paragraph_ids[enc.data.questions[qi].paragraph_id]
    token_end = min(token_start + reference_budget(enc, qi), len(p_all))
    p_ids = p_all[token_start:token_end]
    context_start = len(t.prefix) + len(q_ids) + len(t.middle)
    types = None
    if t.type_ids is not None:
        pre, q_type, mid, p_type, suf = t.type_ids
        types = pre + [q_type] * len(q_ids) + mid + [p_type] * len(p_ids) + suf
    start = end = t.cls_index
    answer = enc.answer_tokens[qi]
    if answer is not None and token_start <= answer[0] and answer[1] < token_end:
        start, end = context_start + answer[0] - token_start, context_start + answer[1] - token_start
    input_ids = t.prefix + q_ids + t.middle + p_ids + t.suffix
    return (qi, token_start, token_end, context_start, input_ids, types), (start, end)


@pytest.mark.parametrize("spec", [WindowSpec(64, 16, doc_stride=12),
                                  WindowSpec(48, 8, doc_stride=100, max_paragraph_tokens=20)])
def test_the_window_table_holds_the_windows_built_one_by_one(any_tokenizer, sample_train, spec):
    enc = encode(sample_train, any_tokenizer, spec)
    windows = eval_windows(enc)
    n_tokens = [len(enc.paragraph_ids[q.paragraph_id]) for q in enc.data.questions]
    expected = [reference_window(enc, qi, s)[0] for qi, n in enumerate(n_tokens)
                for s in window_starts(n, reference_budget(enc, qi), spec.doc_stride)]
    assert [dataclasses.astuple(w) for w in window_rows(windows)] == [fields + (None, None) for fields in expected]
    assert windows.length.tolist() == [len(e[4]) for e in expected]
    for policy in ("random", "center", "all"):
        for w in window_rows(train_windows(enc, policy, random.Random(0))):
            fields, label = reference_window(enc, w.question_index, w.token_start)
            assert dataclasses.astuple(w) == fields + label


@settings(max_examples=200, deadline=None)
@given(n_tokens=st.lists(st.integers(0, 300), min_size=1, max_size=8), budget=st.integers(1, 80),
       stride=st.integers(1, 100))
def test_window_grid_is_the_grid_of_each_paragraph(n_tokens, budget, stride):
    def loop(n):        # the rule as first written
        starts = [0]
        while starts[-1] + budget < n:
            starts.append(starts[-1] + min(stride, budget))
        return starts
    row, start = window_grid(n_tokens, [budget] * len(n_tokens), stride)
    assert list(zip(row.tolist(), start.tolist())) == [(i, s) for i, n in enumerate(n_tokens) for s in loop(n)]


@settings(max_examples=200, deadline=None)
@given(pool_size=st.integers(1, 50), runs=st.lists(st.tuples(st.integers(0, 49), st.integers(0, 10)), max_size=10))
def test_run_index_concatenates_the_runs(pool_size, runs):
    runs = [(s % pool_size, min(n, pool_size - s % pool_size)) for s, n in runs]
    pool = np.arange(100, 100 + pool_size)
    index = run_index(np.array([s for s, _ in runs], dtype=np.int64), np.array([n for _, n in runs], dtype=np.int64))
    assert pool[index].tolist() == [v for s, n in runs for v in pool[s:s + n].tolist()]


def test_the_whitespace_pattern_is_str_isspace():
    every_character = "".join(map(chr, range(0x110000)))
    assert [m.start() for m in re.finditer(r"\s", every_character)] == [
        i for i, c in enumerate(every_character) if c.isspace()]


@settings(max_examples=200, deadline=None)
@given(text=st.text(alphabet="甲乙 \u3000\n\xa0a", max_size=20), data=st.data())
def test_trimmed_offsets_trim_every_token(text, data):
    bound = st.integers(0, len(text))
    offsets = [tuple(sorted(pair)) for pair in data.draw(st.lists(st.tuples(bound, bound), max_size=10))]
    assert trimmed_offsets(text, offsets) == [trim_offsets(text, s, e) for s, e in offsets]


@pytest.mark.parametrize("policy", ["random", "all"])
def test_training_batches_are_what_the_transformers_collator_makes(any_tokenizer, sample_train, policy):
    """``EpochWindows.collate`` gathers a batch from the arrays; ``DataCollatorWithPadding`` pads the
    per-window lists: the same tensors, labels included."""
    from transformers import DataCollatorWithPadding

    from hw7qa.batches import EpochWindows
    from hw7qa.windows import padding_of
    dataset = EpochWindows(encode(sample_train, any_tokenizer, WindowSpec(384, 24, doc_stride=32)), policy, 0,
                           padding_of(any_tokenizer))
    dataset.start_epoch(1)
    rows = [len(dataset) - 1, 3, 0, 7, 3]                          # any rows, in any order
    ours = dataset.collate([dataset[i] for i in rows])
    every = window_rows(dataset.windows)
    theirs = DataCollatorWithPadding(any_tokenizer, pad_to_multiple_of=8)(
        features([every[i] for i in rows], with_labels=True))
    assert ours.keys() == theirs.keys() and len({len(every[i].input_ids) for i in rows}) > 1
    for key in ours:
        assert ours[key].dtype == torch.int64 and torch.equal(ours[key], theirs[key]), key

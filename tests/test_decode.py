from types import SimpleNamespace

import numpy as np
import pytest
import torch

from conftest import features, shared_path, window_rows
from hw7qa.data import QAData, Question, load_qa_file
from hw7qa.decode import balance_quotes, best_spans, decode_predictions, oracle_logits
from hw7qa.inference import window_logits
from hw7qa.config import DecodeSpec, WindowSpec
from hw7qa.models import load_tokenizer
from hw7qa.windows import encode, eval_windows


def oracle_em(data, tokenizer, max_length=384, doc_stride=128, max_answer_length=30):
    """Oracle EM over the answers that fit ``max_answer_length`` tokens, and how many fit."""
    enc = encode(data, tokenizer, WindowSpec(max_length, min(64, max_length // 2), doc_stride))
    windows = eval_windows(enc)
    predictions = decode_predictions(enc, windows, oracle_logits(enc, windows), DecodeSpec(20, max_answer_length))
    fits = [i for i, a in enumerate(enc.answer_tokens) if a and a[1] - a[0] + 1 <= max_answer_length]
    wrong = [(data.questions[i].answer_text, predictions[i].answer) for i in fits
             if predictions[i].answer != data.questions[i].answer_text]
    return 1 - len(wrong) / len(fits), len(fits), wrong


@pytest.mark.parametrize("doc_stride", [4, 16])   # overlaps longer than any sample answer
def test_oracle_decoding_is_exact_on_the_sample(bert_tokenizer, sample_train, sample_dev, doc_stride):
    for data in (sample_train, sample_dev):
        em, n_fit, wrong = oracle_em(data, bert_tokenizer, max_length=64, doc_stride=doc_stride)
        assert em == 1.0 and n_fit == len(data.questions), wrong


def test_oracle_decoding_is_exact_on_real_dev_with_bert_base_chinese():
    """The real bert-base-chinese vocabulary on the 3,524 questions of the 2021 HW7 dev file."""
    dev = load_qa_file(shared_path("data/hw7-2021/hw7_dev.json"), need_answers=True)
    vocab_dir = shared_path("models/bert-base-chinese-tokenizer")
    em, n_fit, wrong = oracle_em(dev, load_tokenizer(vocab_dir, isolate_digits=True))
    assert em == 1.0, wrong[:10]
    assert n_fit >= 3500
    # Without isolated digits, only answers that end inside a number's token are out of reach
    # (DRCD marks "8" inside "81" twice): everything else is still exact.
    em, _, wrong = oracle_em(dev, load_tokenizer(vocab_dir))
    assert len(wrong) <= 2 and all(gold.isdigit() and predicted.startswith(gold) for gold, predicted in wrong)


def window_with(paragraph, question="問?", tokenizer=None):
    data = QAData("mem", [Question(0, question, 0)], [paragraph])
    enc = encode(data, tokenizer, WindowSpec(64, 16, doc_stride=32))
    return enc, eval_windows(enc)


def test_decoding_stays_in_the_paragraph_and_start_before_end(bert_tokenizer):
    enc, windows = window_with("蔡鍔在雲南宣布獨立", tokenizer=bert_tokenizer)
    w = window_rows(windows)[0]
    start, end = np.full(len(w.input_ids), -100, np.float32), np.full(len(w.input_ids), -100, np.float32)
    start[0] = end[0] = 100            # [CLS]: outside the paragraph
    start[1] = end[1] = 90             # the question
    start[w.context_start + 3] = 5     # paragraph: start at 雲 ...
    end[w.context_start + 2] = 50      # ... the end's maximum (在) lies *before* it
    end[w.context_start + 4] = 4       # ... and 南 is the best end at or after it
    [prediction] = decode_predictions(enc, windows, [(start, end)], DecodeSpec(n_best=20, max_answer_length=30))
    assert prediction.answer == "雲南"


def test_max_answer_length_is_respected():
    start = np.array([0, 9, 0, 0, 0, 0], np.float32)
    end = np.array([0, 0, 0, 0, 0, 9], np.float32)
    spans = best_spans(start, end, context_start=1, n_context=5, n_best=5, max_answer_length=3)
    assert spans and all(e - s + 1 <= 3 and s <= e for _, s, e in spans)
    assert (spans[0][1], spans[0][2]) != (1, 5)


def test_answer_never_empty_even_when_top_k_has_no_valid_pair(bert_tokenizer):
    enc, windows = window_with("甲乙丙丁戊己庚辛壬癸", tokenizer=bert_tokenizer)
    w = window_rows(windows)[0]
    n = len(w.input_ids)
    start = np.full(n, -5, np.float32)
    end = np.full(n, -5, np.float32)
    start[w.context_start + 9] = 10    # the only top start is the last character ...
    end[w.context_start + 0] = 10      # ... and the only top end the first
    [prediction] = decode_predictions(enc, windows, [(start, end)], DecodeSpec(n_best=1, max_answer_length=30))
    assert prediction.answer and prediction.answer in "甲乙丙丁戊己庚辛壬癸"


def test_rare_characters_case_and_spaces_survive(real_bert_tokenizer):
    paragraph = "護國軍由蔡鍔率領，後來 Steve Jobs 在 NASA 演講。"
    data = QAData("mem", [Question(0, "誰?", 0, "蔡鍔", 4, 5), Question(1, "誰?", 0, "Steve Jobs", 12, 21),
                          Question(2, "哪?", 0, "NASA", 25, 28)], [paragraph])
    em, _, wrong = oracle_em(data, real_bert_tokenizer, max_length=64, doc_stride=16)
    assert em == 1.0, wrong


@pytest.mark.parametrize("paragraph, span, expected", [
    ("他稱為「台灣民主國」。", ("「台灣民主國",), "「台灣民主國」"),     # extend to the closing mark
    ("他稱為「台灣民主國」。", ("台灣民主國」",), "「台灣民主國」"),     # extend to the opening mark
    ("書名《史記》與「漢書", ("漢書",), "漢書"),                       # balanced: unchanged
    ("甲「乙丙丁", ("「乙丙",), "乙丙"),                               # no closing mark to reach: drop it
    ("作者(司馬遷)寫", ("司馬遷)",), "(司馬遷)"),
])
def test_balance_quotes(paragraph, span, expected):
    start = paragraph.index(span[0])
    s, e = balance_quotes(paragraph, start, start + len(span[0]))
    assert paragraph[s:e] == expected


def test_balance_quotes_never_empties_a_span():
    assert balance_quotes("「", 0, 1) == (0, 1)




@pytest.mark.parametrize("side", ["right", "left"])
def test_model_inputs_match_the_transformers_collator(any_tokenizer, side, monkeypatch):
    from transformers import DataCollatorWithPadding

    monkeypatch.setattr(any_tokenizer, "padding_side", side)
    data = QAData("x", [Question(0, "甚麼是甲?", 0), Question(1, "乙", 1)], ["甲乙丙丁" * 30, "短的 paragraph 1990年"])
    windows = eval_windows(encode(data, any_tokenizer, WindowSpec(64, 16, doc_stride=20)))
    rows = np.array([len(windows) - 1, 0, 1])               # any rows, in any order
    ours = windows.model_inputs(rows, any_tokenizer.pad_token_id, any_tokenizer.pad_token_type_id, side == "left")
    every = window_rows(windows)
    theirs = DataCollatorWithPadding(any_tokenizer, pad_to_multiple_of=8)(features([every[i] for i in rows]))
    assert ours.keys() == theirs.keys() and len(windows) >= 3
    assert len({len(every[i].input_ids) for i in rows}) > 1  # some padding to do
    for key in ours:
        assert ours[key].dtype == np.int64 and np.array_equal(ours[key], theirs[key].numpy()), key


class EchoQA(torch.nn.Module):
    """A "model" whose start logits are the input ids and end logits the position of each token in
    its window, so every logit says which window and position it came from."""

    def __init__(self):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, attention_mask, **_):
        position = (attention_mask.cumsum(dim=1) - 1) * attention_mask
        return SimpleNamespace(start_logits=input_ids.float(), end_logits=position.float())


@pytest.mark.parametrize("batch_size", [1, 3, 64])
@pytest.mark.parametrize("side", ["right", "left"])
def test_window_logits_are_each_windows_own_in_window_order(bert_tokenizer, sample_dev, batch_size, side, monkeypatch):
    monkeypatch.setattr(bert_tokenizer, "padding_side", side)
    windows = eval_windows(encode(sample_dev, bert_tokenizer, WindowSpec(64, 16, doc_stride=12)))
    logits = window_logits(EchoQA(), bert_tokenizer, windows, batch_size)
    assert len(logits) == len(windows) > 64 and len(set(windows.length.tolist())) > 1
    for w, (start, end) in zip(window_rows(windows), logits):
        assert start.dtype == np.float32 and start.tolist() == w.input_ids
        assert end.tolist() == list(range(len(w.input_ids)))

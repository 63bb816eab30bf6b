"""fp16 inference on the CPU: the QA head's logits in float32 under float16 autocast, and the rule
that decides equal span scores.
"""
import numpy as np
import torch

from hw7qa.config import DecodeSpec, WindowSpec
from hw7qa.data import QAData, Question
from hw7qa.decode import decode_predictions, window_logits
from hw7qa.models import Float32Head, load_model
from hw7qa.tiny import build_tiny_model
from hw7qa.windows import encode, eval_windows


def test_float16_inference_computes_the_heads_logits_in_float32(tmp_path, bert_tokenizer, sample_dev):
    build_tiny_model(len(bert_tokenizer)).save_pretrained(tmp_path)
    model = load_model(str(tmp_path))                              # as every run's model is loaded
    assert isinstance(model.qa_outputs, Float32Head) and "qa_outputs.weight" in model.state_dict()
    windows = eval_windows(encode(sample_dev, bert_tokenizer, WindowSpec(128, 32, doc_stride=48)))
    encoder = set()
    model.bert.encoder.layer[-1].output.dense.register_forward_hook(lambda m, i, out: encoder.add(out.dtype))
    low = np.concatenate([s for s, _ in window_logits(model, bert_tokenizer, windows, 32, "fp16")])
    assert encoder == {torch.float16}                             # the encoder runs in float16 ...
    full = np.concatenate([s for s, _ in window_logits(model, bert_tokenizer, windows, 32, "no")])
    assert (low != low.astype(np.float16)).mean() > 0.9           # ... the logits are not on float16's grid
    assert 0 < np.abs(low - full).max() < 0.05                    # the encoder's float16 rounding only


def test_equal_span_scores_follow_the_stated_tie_rule(bert_tokenizer):
    """Coarse logits (float16's) make equal span scores: decode.py's one rule decides, the later
    start, then the later end, in a window, and the earlier of two windows."""
    paragraph = "甲乙丙丁戊己庚辛壬癸" * 6
    data = QAData("mem", [Question(0, "問?", 0)], [paragraph])
    enc = encode(data, bert_tokenizer, WindowSpec(32, 8, doc_stride=16))
    windows = eval_windows(enc)
    assert len(windows) >= 2
    logits = [(np.zeros(len(w.input_ids), np.float32), np.zeros(len(w.input_ids), np.float32)) for w in windows]
    spec = DecodeSpec(n_best=5, max_answer_length=30)
    for wi, w in enumerate([windows[0], windows[1]]):
        start, end = logits[wi]
        start[w.context_start + 1] = start[w.context_start + 3] = 5      # two starts tie ...
        end[w.context_start + 4] = end[w.context_start + 6] = 3          # ... and two ends
    [prediction] = decode_predictions(enc, windows, logits, spec)
    w = windows[0]
    assert (prediction.window, prediction.score) == (0, 8.0)
    assert (prediction.char_start, prediction.char_end) == windows.char_span(enc, 0, w.context_start + 3,
                                                                             w.context_start + 6)

"""Inference pipelined by chunks of questions (``inference_chunk``, hw7qa/pipeline.py): the answers of
the whole-file path, the same logits cache, tta_strides, several processes, errors and Ctrl-C."""
import dataclasses
import json
import shutil
import threading

import numpy as np
import pytest

import hw7qa.pipeline as pipeline
import hw7qa.run as run_module
from conftest import shared_path
from hw7qa.config import Config
from hw7qa.data import QAData, load_qa_file
from hw7qa.decode import predict, window_logits
from hw7qa.ensemble import vote_predictions
from hw7qa.__main__ import main
from hw7qa.run import evaluate_run, run_config, run_logits
from hw7qa.tiny import build_tiny_model
from hw7qa.windows import encode, eval_windows, with_stride

SAMPLE_CFG = Config(max_length=128, max_question_tokens=32, doc_stride=48, eval_batch_size=8)


def assert_same_answers(expected, got, score_tolerance=1e-4):
    """The same answer, characters and window for every question; scores equal up to float rounding
    (a window may share its batch with other windows, which moves its logits by ~1e-7)."""
    assert len(got) == len(expected)
    for e, g in zip(expected, got):
        assert (g.answer, g.window, g.char_start, g.char_end) == (e.answer, e.window, e.char_start, e.char_end)
        assert g.score == pytest.approx(e.score, abs=score_tolerance)


def test_chunks_hold_their_questions_with_their_own_paragraphs(sample_dev):
    assert pipeline.chunk_ranges(7, 3) == [range(0, 3), range(3, 6), range(6, 7)]
    assert pipeline.chunk_ranges(7, 0) == [range(0, 7)] and pipeline.chunk_ranges(0, 5) == []
    data = sample_dev
    part, paragraph_ids = pipeline.chunk_data(data, range(4, 9))
    assert [q.id for q in part.questions] == [q.id for q in data.questions[4:9]]
    assert sorted(paragraph_ids) == sorted({q.paragraph_id for q in data.questions[4:9]})
    assert all(part.paragraph(q) == data.paragraph(p) for q, p in zip(part.questions, data.questions[4:9]))


@pytest.fixture(scope="module")
def tiny_model(bert_tokenizer):
    return build_tiny_model(len(bert_tokenizer))


@pytest.mark.parametrize("chunk", [1, 5, 100])
def test_pipelined_answers_are_the_whole_file_answers(tiny_model, bert_tokenizer, sample_dev, chunk):
    whole = predict(tiny_model, bert_tokenizer, sample_dev, SAMPLE_CFG)
    cfg = dataclasses.replace(SAMPLE_CFG, inference_chunk=chunk)
    answers, [logits] = pipeline.pipelined_predictions(tiny_model, bert_tokenizer, sample_dev, cfg)
    assert_same_answers(whole, answers)
    assert pipeline.predict(tiny_model, bert_tokenizer, sample_dev, cfg) == answers
    # the logits of every window of the file, in the file's window order: what the cache holds
    windows = eval_windows(encode(sample_dev, bert_tokenizer, cfg.windows))
    assert [len(s) for s, _ in logits] == windows.length.tolist()


def test_pipelined_tta_strides_vote_as_the_whole_file_does(tiny_model, bert_tokenizer, sample_dev):
    cfg = dataclasses.replace(SAMPLE_CFG, tta_strides="24,36", inference_chunk=4)
    enc = encode(sample_dev, bert_tokenizer, cfg.windows)
    members = []
    for stride in cfg.inference_strides:
        windows = eval_windows(with_stride(enc, stride))
        members.append((with_stride(enc, stride), windows,
                        window_logits(tiny_model, bert_tokenizer, windows, cfg.eval_batch_size)))
    answers, logits = pipeline.pipelined_predictions(tiny_model, bert_tokenizer, sample_dev, cfg, cfg.inference_strides)
    assert [len(member) for member in logits] == [len(windows) for _, windows, _ in members]
    assert_same_answers(vote_predictions(members, cfg.decoding), answers)


def test_real_dev_file_with_the_real_tokenizer_gives_the_same_answers(real_bert_tokenizer):
    """The first 600 questions of the 2021 HW7 dev file, bert-base-chinese's vocabulary, a tiny
    random model: the pipelined answers are the whole-file path's."""
    dev = load_qa_file(shared_path("data/hw7-2021/hw7_dev.json"), need_answers=True)
    dev = QAData(dev.path, dev.questions[:600], dev.paragraphs)
    model = build_tiny_model(len(real_bert_tokenizer))
    cfg = Config(max_length=256, doc_stride=96, eval_batch_size=64)
    whole = predict(model, real_bert_tokenizer, dev, cfg)
    assert_same_answers(whole, pipeline.predict(model, real_bert_tokenizer, dev,
                                                dataclasses.replace(cfg, inference_chunk=128)))


def test_an_error_while_preparing_a_chunk_stops_the_pipeline_with_its_message(tiny_model, bert_tokenizer, sample_dev):
    cfg = dataclasses.replace(SAMPLE_CFG, max_length=44, max_question_tokens=34, inference_chunk=4)
    with pytest.raises(ValueError, match="leaves fewer than 8 paragraph tokens"):
        pipeline.predict(tiny_model, bert_tokenizer, sample_dev, cfg)
    assert not [t for t in threading.enumerate() if t.name.startswith("hw7qa-")]


def test_ctrl_c_during_the_forward_passes_ends_the_workers(tiny_model, bert_tokenizer, sample_dev, monkeypatch):
    real, calls = pipeline.window_logits, []

    def interrupted_at_the_second_chunk(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)
    monkeypatch.setattr(pipeline, "window_logits", interrupted_at_the_second_chunk)
    with pytest.raises(KeyboardInterrupt):
        pipeline.predict(tiny_model, bert_tokenizer, sample_dev, dataclasses.replace(SAMPLE_CFG, inference_chunk=3))
    assert len(calls) == 2 and not [t for t in threading.enumerate() if t.name.startswith("hw7qa-")]


# ---------------------------------------------------------------- through a run folder: cache, tta, processes

@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    run = tmp_path_factory.mktemp("pipelined") / "run"
    assert main(["demo", "--output-dir", str(run), "--set", "epochs=2", "test_file=", "keep_checkpoints=0"]) == 0
    return run


def dev_lines(run):
    return [json.loads(line) for line in (run / "dev_predictions.jsonl").read_text(encoding="utf-8").splitlines()]


def assert_same_lines(expected, got):
    assert [{**line, "score": None} for line in got] == [{**line, "score": None} for line in expected]
    assert [line["score"] for line in got] == pytest.approx([line["score"] for line in expected], abs=1e-4)


@pytest.mark.parametrize("extra", [[], ["tta_strides=24"]])
def test_evaluate_pipelined_writes_the_whole_file_results_and_the_same_cache(run_dir, monkeypatch, extra):
    shutil.rmtree(run_dir / "logits", ignore_errors=True)
    scores, whole = evaluate_run(run_dir, overrides=extra)
    expected_lines = dev_lines(run_dir)
    cfg = run_config(run_dir, extra)
    dev = load_qa_file(cfg.dev_file, need_answers=True)
    whole_logits = [run_logits(run_dir, dataclasses.replace(cfg, doc_stride=s), dev)[2] for s in cfg.inference_strides]
    cached = sorted((run_dir / "logits").glob("*.npz"))
    shutil.rmtree(run_dir / "logits")

    pipelined_scores, pipelined = evaluate_run(run_dir, overrides=[*extra, "inference_chunk=4"])
    assert_same_answers(whole, pipelined)
    assert pipelined_scores == scores
    assert_same_lines(expected_lines, dev_lines(run_dir))
    assert sorted((run_dir / "logits").glob("*.npz")) == cached           # the same cache files, one per stride
    for stride, expected in zip(cfg.inference_strides, whole_logits):
        saved = run_logits(run_dir, dataclasses.replace(cfg, doc_stride=stride), dev)[2]
        for (s1, e1), (s2, e2) in zip(expected, saved):
            np.testing.assert_allclose(s2, s1, atol=1e-5)
            np.testing.assert_allclose(e2, e1, atol=1e-5)

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded although its logits are cached")
    monkeypatch.setattr(run_module, "load_run_model", no_model)
    assert evaluate_run(run_dir, overrides=[*extra, "inference_chunk=4"])[1] == pipelined    # read from the cache


def test_two_processes_evaluate_pipelined_as_one(run_dir):
    from test_multiprocess import launch
    shutil.rmtree(run_dir / "logits", ignore_errors=True)
    assert main(["evaluate", str(run_dir), "--set", "inference_chunk=3"]) == 0
    one = dev_lines(run_dir)
    shutil.rmtree(run_dir / "logits")
    launch("evaluate", str(run_dir), "--set", "inference_chunk=3")
    assert_same_lines(one, dev_lines(run_dir))

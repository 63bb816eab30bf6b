"""hw7qa estimate: the whole run's minutes added up from speeds timed through the trainer's own steps,
on the demo's tiny model (the CPU's numbers), with every knob of the config reaching what is timed."""
from __future__ import annotations

import dataclasses
import random

import pytest
import torch

import hw7qa.batches as batches
import hw7qa.models as compiling
import hw7qa.inference as inference
from conftest import ROOT
from hw7qa import estimate as est
from hw7qa.__main__ import main
from hw7qa.config import demo_config
from hw7qa.tiny import build_tiny_tokenizer
from hw7qa.windows import encode, eval_windows, train_windows, with_stride

STEPS, WINDOWS = (1, 2), (2, 8)          # micro-batches and inference windows let pass, then timed


@pytest.fixture(scope="module")
def demo():
    cfg = demo_config("", ["eval_every=3", "epochs=2", "tta_strides=32"])
    return cfg, est.estimate(cfg, steps=STEPS, windows=WINDOWS)


def test_the_whole_run_adds_up_as_by_hand(demo, sample_train, sample_dev, sample_test):
    cfg, result = demo
    tokenizer = est.model_and_tokenizer(cfg, sample_train)[1]     # the demo's: the training file's characters
    epoch = len(train_windows(encode(sample_train, tokenizer, cfg.windows), "random", random.Random(0)))
    dev = len(eval_windows(encode(sample_dev, tokenizer, cfg.windows)))
    test = sum(len(eval_windows(with_stride(encode(sample_test, tokenizer, cfg.windows), s))) for s in (48, 32))
    steps = -(-epoch // 8)                               # batch 8, no accumulation: 5 steps an epoch, 10 in all
    evaluations = len([s for s in range(1, 2 * steps + 1) if s % 3 == 0 or s == 2 * steps])
    assert result.windows == {"training": (2 * epoch, f"2 epochs × {epoch}"),
                              "dev evaluations": (evaluations * dev, f"{evaluations} × {dev}"),
                              "test prediction": (test, "at 48, 32")}
    m = result.measured
    (train_wps, _), (infer_wps, _) = m["speeds"]["train"], m["speeds"]["infer"]
    by_hand = {"training": 2 * epoch / train_wps / 60, "dev evaluations": evaluations * dev / infer_wps / 60,
               "test prediction": test / infer_wps / 60}
    by_hand["whole run"] = sum(by_hand.values())
    assert result.minutes() == pytest.approx(by_hand, rel=1e-9)
    assert m["timed_windows"]["train"] == 2 * 8 and m["timed_windows"]["infer"] >= 8 and m["steps"] == STEPS
    table = str(result)
    assert f"| whole run | | | | {by_hand['whole run']:,.1f} |" in table and "the CPU" in table
    assert f"| training: 2 epochs × {epoch:,} | {train_wps:.3g} | — | {2 * epoch:,} |" in table


def test_memory_is_reported_on_the_cpu_as_the_process_peak(demo):
    m = demo[1].measured
    assert m["gpu"] is None and 0 < m["peak_gib"] < m["total_gib"]
    assert "the process's peak RSS" in str(demo[1]) and "—" in str(demo[1])       # no MFU without a GPU's peak
    assert demo[1].verdict().startswith("On the CPU; the whole run takes about")


def test_every_knob_reaches_what_is_timed(monkeypatch):
    seen = []
    real = inference.window_logits
    monkeypatch.setattr(inference, "window_logits", lambda *a, **k: seen.append(a[3]) or real(*a, **k))
    monkeypatch.setattr(compiling, "COMPILE_OPTIONS", {"dynamic": True, "backend": "eager"})
    torch._dynamo.reset()
    cfg = demo_config("", ["mixed_precision=bf16", "batch_size=4", "grad_accum=3", "auto_batch=false",
                           "gradient_checkpointing=true", "compile=true", "eval_batch_size=5", "max_length=96"])
    m = est.estimate(cfg, steps=(1, 3), windows=(2, 200)).measured      # 200: more than the dev file has
    torch._dynamo.reset()
    assert (m["precision"], m["micro_batch"], m["grad_accum"], m["checkpointing"]) == ("bf16", 4, 3, True)
    assert m["compiled"] == (torch.__version__ >= compiling.MIN_TORCH)
    assert m["timed_windows"]["train"] == 3 * 4 and m["timed_windows"]["infer"] >= 200 and set(seen) == {5}


def test_auto_batch_shrinking_the_batch_is_shown_and_a_run_that_cannot_fit_says_what_to_change(monkeypatch):
    monkeypatch.setattr(batches, "step_fits", lambda model, batch, *_: len(batch["input_ids"]) <= 2)
    result = est.estimate(demo_config("", ["epochs=1"]), steps=STEPS, windows=WINDOWS)
    assert (result.measured["micro_batch"], result.measured["grad_accum"]) == (2, 4)
    assert "micro-batch 2 × grad_accum 4 (auto_batch shrank 8)" in str(result)
    monkeypatch.setattr(batches, "step_fits", lambda *_: False)
    result = est.estimate(demo_config("", ["epochs=1"]), steps=STEPS, windows=WINDOWS)
    assert result.measured is None and "not even 1 windows" in result.error
    assert result.verdict().startswith("Does not fit") and "grad_accum" in result.verdict()


def test_missing_files_stand_in_with_hw7_typical_lengths_at_hw7_s_size():
    cfg = dataclasses.replace(demo_config(), train_file="nowhere/hw7_train.json", max_length=384, doc_stride=128,
                              max_question_tokens=64, final_fit=False)
    splits, notes = est.run_data(cfg)
    assert {split: n for split, (_, n) in splits.items()} == {"train": 31_690, "dev": 13, "test": 13}
    assert "nowhere/hw7_train.json" in notes[0] and "HW7-typical" in notes[0]
    typical = splits["train"][0]
    tokenizer = build_tiny_tokenizer(typical.paragraphs + [q.question_text for q in typical.questions])
    enc = encode(typical, tokenizer, cfg.windows)
    assert [len(ids) for ids in enc.paragraph_ids] == list(est.TYPICAL_PARAGRAPH)
    assert {len(ids) for ids in enc.question_ids} == {est.TYPICAL_QUESTION}
    windows = eval_windows(enc)
    assert len(windows) / len(typical.questions) == pytest.approx(2.23, abs=0.15)   # the 2021 HW7 dev file: 2.23


def test_the_presets_models_have_their_shapes_offline_and_a_folder_its_own(tmp_path):
    from transformers import BertConfig
    large = est.model_config("luhua/chinese_pretrain_mrc_macbert_large")
    assert (large.num_hidden_layers, large.hidden_size, large.num_attention_heads) == (24, 1024, 16)
    assert est.matmul_parameters(large) == pytest.approx(302.3e6, rel=1e-3)
    assert est.matmul_parameters(est.model_config("bert-base-chinese")) == pytest.approx(85.1e6, rel=1e-3)
    BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
               intermediate_size=40).save_pretrained(tmp_path)
    assert est.model_config(str(tmp_path)).num_hidden_layers == 3


@pytest.mark.parametrize("layers, hidden, intermediate", [(2, 64, 128), (3, 96, 200)])
def test_n_is_the_non_embedding_parameters_of_the_qa_model(layers, hidden, intermediate):
    from transformers import BertConfig, BertForQuestionAnswering
    config = BertConfig(vocab_size=50, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2,
                        intermediate_size=intermediate)
    counted = sum(p.numel() for name, p in BertForQuestionAnswering(config).named_parameters()
                  if ".embeddings." not in f".{name}")
    assert est.matmul_parameters(config) == counted


def test_training_flops_are_six_n_t_plus_attention_and_three_times_the_forward():
    shape = est.model_config("bert-base-chinese")
    n = est.matmul_parameters(shape)
    assert est.model_flops(shape, [384]) == 6 * n * 384 + 12 * 12 * 768 * 384 ** 2
    assert est.model_flops(shape, [100, 384]) == 3 * est.model_flops(shape, [100, 384], training=False)


@pytest.mark.parametrize("name, peak", [("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H100 PCIe", 756.0),
                                        ("NVIDIA H100 NVL", 835.0), ("NVIDIA H200", 989.0), ("NVIDIA A10", 125.0),
                                        ("NVIDIA A100-SXM4-80GB", 312.0), ("Tesla T4", 65.0), ("NVIDIA L4", 121.0),
                                        ("Tesla V100-SXM2-16GB", 125.0), ("NVIDIA L40S", None), (None, None)])
def test_peaks_by_gpu_name(name, peak):
    assert est.peak_tflops(name) == peak


def test_the_command_prints_the_table_with_the_course_s_estimate_for_a_preset(capsys, monkeypatch):
    monkeypatch.setattr(est, "measure", lambda *args: dict(
        gpu="Tesla T4", precision="fp16", batch_size=16, micro_batch=16, grad_accum=2, steps=(4, 16), compiled=False,
        checkpointing=False, speeds={"train": (50.0, 0.2), "infer": (128.0, None)}, timed_windows={"infer": 128},
        peak_gib=9.5, total_gib=14.6))
    assert main(["estimate", "--config", "bert-base", "--data", str(ROOT / "data/sample/hw7_dev.json"),
                 "--set", "epochs=1"]) == 0
    out = capsys.readouterr().out
    assert "on Tesla T4: precision fp16, micro-batch 16 × grad_accum 2" in out
    assert "| whole run (the course: medium, 8 min on a T4 with fp16) |" in out and "scaled to HW7's size" in out
    assert "| training: 1 epochs × " in out and "| 50 | 20.0% |" in out and "| 128 | — |" in out
    assert "peak memory: 9.5 GiB of 14.6 GiB (GPU, reserved)" in out

import json
import random
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, SAMPLE, save_hw7
from hw7qa.__main__ import main
from hw7qa.config import load_config
from hw7qa.data import QAData
from hw7qa.report import read_metrics
from hw7qa.batches import length_grouped_batches
from hw7qa.runfolder import list_checkpoints
from hw7qa.train import train



def test_tiny_model_overfits_a_handful_of_examples(tmp_path, sample_train):
    # paragraphs that fit one window, so training and evaluation see the same window
    short = [q for q in sample_train.questions if len(sample_train.paragraph(q)) < 230][:6]
    save_hw7(QAData("handful", short, sample_train.paragraphs), tmp_path / "handful.json")
    cfg = load_config(None, {
        "train_file": str(tmp_path / "handful.json"), "dev_file": str(tmp_path / "handful.json"), "test_file": "",
        "model_name": "tiny-random-bert", "max_length": 320, "max_question_tokens": 40, "doc_stride": 64,
        "epochs": 80, "lr": 3e-3, "warmup_ratio": 0.05, "batch_size": 6, "log_every": 1, "eval_every": 2,
        "output_dir": str(tmp_path / "run")})
    run_dir = train(cfg)
    metrics = read_metrics(run_dir)
    losses = [m["loss"] for m in metrics if "loss" in m]
    dev = [m for m in metrics if "dev_em" in m]
    assert len(short) == 6 and losses[-1] < losses[0] / 10
    assert [m["step"] for m in dev] == list(range(2, 81, 2))
    assert dev[0]["dev_em"] < 1.0 and dev[-1]["dev_em"] == 1.0
    assert (run_dir / "model" / "model.safetensors").exists() and (run_dir / "config.json").exists()
    assert load_config(run_dir / "model" / "hw7qa_config.json") == cfg
    lrs = [m["lr"] for m in metrics if "lr" in m]
    assert max(lrs) <= 3e-3 and lrs[-1] == 0.0             # warmup, then linear decay to zero


def test_gradient_accumulation_takes_fewer_optimizer_steps(tmp_path):
    cfg = {"output_dir": str(tmp_path / "acc"), "epochs": 1, "grad_accum": 2, "batch_size": 4, "dev_file": "",
           "test_file": "", "log_every": 1}
    assert main(["demo", "--set"] + [f"{k}={v}" for k, v in cfg.items()]) == 0
    steps = [m["step"] for m in read_metrics(tmp_path / "acc") if "loss" in m]
    n_train = len(json.loads((SAMPLE / "hw7_train.json").read_text(encoding="utf-8"))["questions"])
    assert steps[-1] == -(-(-(-n_train // 4)) // 2)       # ceil(ceil(windows / batch) / accumulation)


def test_cli_train_predict_evaluate_check(tmp_path, capsys, sample_test):
    run_dir = tmp_path / "run"
    overrides = [f"train_file={SAMPLE / 'hw7_train.json'}", f"dev_file={SAMPLE / 'hw7_dev.json'}",
                 f"test_file={SAMPLE / 'hw7_test.json'}", f"output_dir={run_dir}", "epochs=2"]
    assert main(["train", "--config", str(ROOT / "configs" / "demo.json"), "--set", *overrides]) == 0
    assert (run_dir / "result.csv").exists()
    assert main(["predict", str(run_dir), "--out", str(tmp_path / "again.csv"), "--set", "doc_stride=16"]) == 0
    assert main(["evaluate", str(run_dir)]) == 0
    printed = capsys.readouterr().out
    assert "EM" in printed and "answers: " in printed
    lines = (run_dir / "dev_predictions.jsonl").read_text(encoding="utf-8").splitlines()
    assert len(lines) == 13 and {"gold", "predicted", "em", "f1", "kind", "window"} <= set(json.loads(lines[0]))
    check = subprocess.run([sys.executable, "-m", "hw7qa", "check", str(tmp_path / "again.csv"),
                            str(SAMPLE / "hw7_test.json")], cwd=ROOT, capture_output=True, text=True)
    assert check.returncode == 0 and "valid" in check.stdout
    rows = (tmp_path / "again.csv").read_text(encoding="utf-8").splitlines()
    assert len(rows) == len(sample_test.questions) + 1 and all(r.split(",")[1] for r in rows[1:])
    # a broken submission: exit code 1 and the problem named
    (tmp_path / "bad.csv").write_text("ID,Answer\n0,甲\n", encoding="utf-8")
    bad = subprocess.run([sys.executable, "-m", "hw7qa", "check", str(tmp_path / "bad.csv"),
                          str(SAMPLE / "hw7_test.json")], cwd=ROOT, capture_output=True, text=True)
    assert bad.returncode == 1 and "have no row" in bad.stdout


def test_cli_reports_bad_input_clearly(tmp_path, capsys):
    assert main(["train", "--config", str(ROOT / "configs" / "demo.json"), "--set", "lr_schedule=step"]) == 2
    assert "lr_schedule='step'; choose one of linear, cosine" in capsys.readouterr().err
    assert main(["train", "--config", str(ROOT / "configs" / "demo.json"), "--set", "learning_rate=1"]) == 2
    assert "unknown config key 'learning_rate'" in capsys.readouterr().err
    assert main(["train", "--set", f"train_file={tmp_path / 'nope.json'}", f"output_dir={tmp_path / 'run'}"]) == 2
    assert "no such file" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()                 # nothing written for a run that could not start


def test_length_grouped_batches_cover_every_window_once_with_similar_lengths():
    rng = random.Random(0)
    lengths = [rng.randint(20, 384) for _ in range(1000)]
    batches = length_grouped_batches(lengths, 16, random.Random(1), chunk_batches=10)
    assert sorted(i for b in batches for i in b) == list(range(1000))
    assert all(len(b) == 16 for b in batches[:-1]) and len(batches[-1]) == 1000 % 16
    spread = sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in batches) / len(batches)
    assert spread < 40                  # random batches of 16 would spread over ~300 tokens
    assert batches != length_grouped_batches(lengths, 16, random.Random(2), chunk_batches=10)


def test_training_with_length_grouped_batches_runs(tmp_path):
    assert main(["demo", "--set", f"output_dir={tmp_path / 'g'}", "epochs=2", "group_by_length=true",
                 "test_file="]) == 0
    assert (tmp_path / "g" / "model" / "model.safetensors").exists()


@pytest.mark.parametrize("lr, saved", [
    ("1e6", ["step-0000001"]),  # step 1's weights are huge but finite; its loss is NaN from step 2 on
    ("1e39", []),               # step 1 already overflows the weights: that state is not saved
])
def test_diverging_training_stops_with_a_clear_message(tmp_path, capsys, lr, saved):
    overrides = [f"output_dir={tmp_path / 'nan'}", f"lr={lr}", "max_grad_norm=0", "max_skipped_steps=3",
                 "epochs=30", "warmup_ratio=0", "test_file=", "save_every=1", "keep_checkpoints=1000"]
    assert main(["demo", "--set", *overrides]) == 3
    printed = capsys.readouterr()
    assert "3 optimizer steps in a row had a non-finite loss" in printed.err and f"lr={float(lr)}" in printed.err
    # only finite states are checkpointed: resuming never starts from a broken one
    checkpoints = list_checkpoints(tmp_path / "nan")
    assert [c.name for c in checkpoints] == saved
    for checkpoint in checkpoints:
        assert all(torch.isfinite(t).all() for t in load_file(checkpoint / "model.safetensors").values())
    assert ("weights are no longer finite" in printed.out) == (not saved)
    # the message names the checkpoint to go back to, and only one that exists
    assert ("The last good checkpoint is" in printed.err) == bool(saved)
    assert all(str(c) in printed.err for c in checkpoints)


def test_gradient_checkpointing_knob_trains(tmp_path):
    assert main(["demo", "--set", f"output_dir={tmp_path / 'gc'}", "epochs=1", "gradient_checkpointing=true",
                 "test_file="]) == 0


def test_final_fit_trains_on_train_and_dev_without_evaluating(tmp_path, capsys, sample_train, sample_dev):
    assert main(["demo", "--output-dir", str(tmp_path / "final"), "--set", "final_fit=true", "epochs=1",
                 "test_file=", "log_every=1"]) == 0
    printed = capsys.readouterr().out
    n = len(sample_train.questions) + len(sample_dev.questions)
    assert f"train: {n} questions" in printed and "NO dev evaluation" in printed
    records = read_metrics(tmp_path / "final")
    assert "final_fit" in records[0]["note"] and not any("dev_em" in r for r in records)
    assert records[-1]["step"] == -(-n // 8)                # windows of both files, batch 8
    assert (tmp_path / "final" / "model" / "model.safetensors").exists()


def test_max_length_beyond_the_models_positions_is_refused(tmp_path, capsys):
    # the tiny model has 512 positions
    assert main(["demo", "--output-dir", str(tmp_path / "long"), "--set", "max_length=600"]) == 2
    assert "only 512 positions" in capsys.readouterr().err
    assert not (tmp_path / "long").exists()

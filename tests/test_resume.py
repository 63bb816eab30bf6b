"""Checkpoints and resume: an interrupted run, resumed, ends exactly where an uninterrupted one does."""

import shutil

import pytest
import torch
from safetensors.torch import load_file

import hw7qa.train as train_module
from hw7qa.__main__ import main
from hw7qa.config import demo_config
from hw7qa.report import read_metrics
from hw7qa.runfolder import list_checkpoints
from hw7qa.train import train



def assert_same_weights(dir_a, dir_b):
    a, b = load_file(dir_a / "model.safetensors"), load_file(dir_b / "model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def crash_during_step(monkeypatch, step):
    """Make training raise KeyboardInterrupt (as a Colab disconnect or a stop button would end it)
    right after optimizer step ``step`` has been taken and logged."""
    real = train_module.log_metrics

    def log_then_crash(run_dir, record):
        real(run_dir, record)
        if record.get("step") == step and "loss" in record:
            raise KeyboardInterrupt
    monkeypatch.setattr(train_module, "log_metrics", log_then_crash)


@pytest.mark.parametrize("knobs, crash_step, checkpoint_steps", [
    # 38 windows, batch 8: 5 batches = 5 steps per epoch; checkpoints at steps 2, 4, 5 (epoch end), 6; the crash is in step 7
    ({}, 7, [5, 6]),
    # 2 batches per step: 3 steps per epoch; step 4 is one step (2 batches) into epoch 2
    ({"grad_accum": 2, "group_by_length": True}, 5, [3, 4]),
    # the opt-in techniques: the moving average is checkpointed and saved in place of the weights
    ({"ema_decay": 0.9, "fgm_epsilon": 1.0, "layer_lr_decay": 0.8}, 7, [5, 6]),
])
def test_interrupted_run_resumes_to_identical_weights_and_metrics(tmp_path, monkeypatch, knobs, crash_step,
                                                                  checkpoint_steps):
    knobs = {"epochs": 3, "batch_size": 8, "log_every": 1, "save_every": 2, "keep_checkpoints": 2,
             "test_file": "", **knobs}
    whole = train(demo_config(str(tmp_path / "whole"), knobs))

    crash_during_step(monkeypatch, crash_step)
    with pytest.raises(KeyboardInterrupt):
        train(demo_config(str(tmp_path / "cut"), knobs))
    monkeypatch.undo()
    cut = tmp_path / "cut"
    assert [int(c.name.split("-")[1]) for c in list_checkpoints(cut)] == checkpoint_steps  # only the last 2 kept
    assert max(m["step"] for m in read_metrics(cut)) == crash_step

    assert main(["train", "--resume", str(cut)]) == 0
    assert read_metrics(cut) == read_metrics(whole)          # every loss, lr and dev score, no duplicates
    assert_same_weights(cut / "model", whole / "model")
    last = list_checkpoints(whole)[-1].name
    assert [c.name for c in list_checkpoints(cut)][-1] == last
    assert_same_weights(cut / "checkpoints" / last, whole / "checkpoints" / last)
    assert (torch.load(cut / "checkpoints" / last / "optimizer.bin", weights_only=True)["state"][0]["exp_avg"]
            .equal(torch.load(whole / "checkpoints" / last / "optimizer.bin", weights_only=True)["state"][0]["exp_avg"]))


def test_a_kill_between_the_renames_of_a_save_loses_nothing(tmp_path, monkeypatch, capsys):
    """``replace_folder`` sets the old folder aside (``.old``) before it renames the new one in: a
    kill between the two renames leaves no ``model/``. Evaluate names the cause; a resume puts the
    old model back and ends where an uninterrupted run does."""
    knobs = {"epochs": 2, "batch_size": 8, "log_every": 1, "save_every": 2, "test_file": ""}
    whole = train(demo_config(str(tmp_path / "whole"), knobs))
    crash_during_step(monkeypatch, 7)
    with pytest.raises(KeyboardInterrupt):
        train(demo_config(str(tmp_path / "cut"), knobs))
    monkeypatch.undo()
    cut = tmp_path / "cut"
    (cut / "model").rename(cut / "model.old")                     # the state such a kill leaves
    shutil.copytree(cut / "model.old", cut / "model.partial")

    assert main(["evaluate", str(cut)]) == 2
    assert "model is missing: a save of a better model was cut off" in capsys.readouterr().err
    assert main(["train", "--resume", str(cut)]) == 0
    assert read_metrics(cut) == read_metrics(whole)
    assert_same_weights(cut / "model", whole / "model")
    assert not (cut / "model.old").exists() and not (cut / "model.partial").exists()


def test_resume_ignores_an_unfinished_checkpoint_and_a_finished_run_stays_finished(tmp_path, capsys):
    knobs = {"epochs": 2, "batch_size": 8, "save_every": 3, "keep_checkpoints": 3, "test_file": ""}
    run = train(demo_config(str(tmp_path / "run"), knobs))
    steps = [c.name for c in list_checkpoints(run)]
    # every 3 steps and at the ends of the 5-step epochs: 3, 5, 6, 9, 10; the newest 3 are kept
    assert steps == ["step-0000006", "step-0000009", "step-0000010"]
    # a save cut off half way: a .partial folder
    (run / "checkpoints" / "step-0000011.partial").mkdir()
    assert list_checkpoints(run)[-1].name == "step-0000010"
    before = read_metrics(run)
    assert main(["train", "--resume", str(run)]) == 0
    assert "already finished" in capsys.readouterr().out
    assert read_metrics(run) == before
    assert not (run / "checkpoints" / "step-0000011.partial").exists()      # no stray half-saves left
    # a step folder is renamed only once complete: one without trainer_state.json is damaged, named, not passed over
    damaged = run / "checkpoints" / "step-0000012"
    damaged.mkdir()
    assert main(["train", "--resume", str(run)]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == (f"error: {damaged / 'trainer_state.json'} is missing; delete "
                                                         f"{damaged} to resume from step-0000010 instead")
    assert read_metrics(run) == before and damaged.is_dir()


def test_resume_needs_a_run_folder(tmp_path, capsys):
    assert main(["train", "--resume", str(tmp_path / "nothing")]) == 2
    assert "nothing: no such folder; give a run folder made by 'train'" in capsys.readouterr().err


def snapshot(folder) -> dict:
    """Every file and folder under ``folder``, with each file's bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() if p.is_file() else None for p in sorted(folder.rglob("*"))}


def test_a_resume_that_cannot_continue_refuses_and_touches_nothing(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["demo", "--output-dir", str(run), "--set", "epochs=1", "keep_checkpoints=0"]) == 0
    assert not (run / "checkpoints").exists() and (run / "model" / "model.safetensors").exists()
    before = snapshot(tmp_path)
    # a finished run that kept no checkpoint is never started over
    assert main(["train", "--resume", str(run)]) == 2
    said = capsys.readouterr().err.strip().splitlines()[-1]
    assert said.startswith(f"error: cannot resume {run}: it has no checkpoint to continue from (keep_checkpoints=0 "
                           f"saves none), and starting it again would delete its logits/, records up to step ")
    assert "(metrics.jsonl), model/, result.csv (nothing was changed)" in said
    assert snapshot(tmp_path) == before
    # nor moved to another folder
    assert main(["train", "--resume", str(run), "--set", f"output_dir={tmp_path / 'other'}"]) == 2
    assert (f"error: a resume continues {run} in its own folder, not in output_dir={tmp_path / 'other'}"
            in capsys.readouterr().err)
    assert snapshot(tmp_path) == before
    # the notebook's way: a folder that holds no run is not resumed (nor made)
    with pytest.raises(ValueError, match="it holds no run"):
        train(demo_config(str(tmp_path / "new"), {"epochs": 1}), resume=True)
    assert snapshot(tmp_path) == before
    # the run's model still answers
    assert main(["predict", str(run), "--out", str(tmp_path / "again.csv")]) == 0
    assert (tmp_path / "again.csv").read_bytes() == (run / "result.csv").read_bytes()

"""More than one process: ``accelerate launch`` with 2 CPU processes (gloo) trains and evaluates the
demo, shares the work, and gathers the predictions of a single process (scores up to their last bits).

``accelerate launch --cpu --num_processes 2`` starts more than one process only through ``mpirun``;
``--multi_gpu`` (torchrun) with ``ACCELERATE_USE_CPU=1`` starts two CPU processes without it.
"""
import json
import os
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, assert_same_predictions
from hw7qa.__main__ import main
from hw7qa.config import run_config
from conftest import run_logits
from hw7qa.data import load_qa_file
from hw7qa.report import read_metrics
from hw7qa.runfolder import list_checkpoints


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(*args, processes=2, fault="", expect=0, timeout=600):
    """``accelerate launch`` of ``python -m hw7qa *args`` with 2 CPU processes; with ``fault``, through
    tests/faults.py (HW7QA_FAULT). Returns stdout + stderr, after checking the exit code."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1",
           "HW7QA_FAULT": fault}
    program = [str(ROOT / "tests" / "faults.py")] if fault else ["-m", "hw7qa"]
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
               "--num_machines", "1", "--main_process_port", str(free_port()), "--mixed_precision", "no",
               "--dynamo_backend", "no", *program, *args]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert (done.returncode == 0) == (expect == 0), done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout + done.stderr



def steps_of(checkpoints):
    return [int(c.name.split("-")[1]) for c in checkpoints]


# 38 windows, batch 8: 5 steps per epoch with one process or two; checkpoints every 2 steps and at epoch ends
KNOBS = ["epochs=3", "batch_size=8", "log_every=1", "eval_every=5", "save_every=2", "keep_checkpoints=2"]


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("mp") / "run"
    return run, launch("demo", "--output-dir", str(run), "--set", *KNOBS)


def test_two_processes_train_and_evaluate_like_one(two_process_run):
    run, printed = two_process_run
    assert "processes: 2" in printed and printed.count("best model:") == 1       # printed once, by the main process
    assert steps_of(list_checkpoints(run)) == [14, 15]                          # checkpoints are written
    records = read_metrics(run)
    losses, evals = [r for r in records if "loss" in r], [r for r in records if "dev_em" in r]
    # batch_size is the global batch: 38 windows / 8 = 5 steps per epoch, as with one process; one record each
    assert [r["step"] for r in losses] == list(range(1, 16)) and [r["step"] for r in evals] == [5, 10, 15]
    assert (run / "result.csv").read_text(encoding="utf-8").count("\n") == 14   # header + 13, written once

    # evaluation with 2 processes (each runs half of every batch, gather_object) against 1 process
    launch("evaluate", str(run))
    two = (run / "dev_predictions.jsonl").read_text(encoding="utf-8")
    cfg = run_config(run)
    dev = load_qa_file(cfg.dev_file, need_answers=True)
    logits_two = run_logits(run, cfg, dev)[2]                           # read back from the cache
    shutil.rmtree(run / "logits")
    assert main(["evaluate", str(run)]) == 0
    one = (run / "dev_predictions.jsonl").read_text(encoding="utf-8")
    assert_same_predictions(two, one)                                   # half batches: scores differ in the last bits
    logits_one = run_logits(run, cfg, dev)[2]
    assert len(logits_one) == len(logits_two) > 13                      # every window once, none duplicated
    for (s1, e1), (s2, e2) in zip(logits_one, logits_two):
        np.testing.assert_allclose(s1, s2, atol=1e-5)
        np.testing.assert_allclose(e1, e2, atol=1e-5)
    # the dev scores gathered during 2-process training are those of the saved model
    best = max(evals, key=lambda r: (r["dev_em"], r["dev_f1"]))
    lines = [json.loads(line) for line in one.splitlines()]
    assert best["dev_f1"] == pytest.approx(sum(r["f1"] for r in lines) / len(lines), abs=1e-9)


def test_two_processes_killed_mid_epoch_resume_to_the_same_run(two_process_run, tmp_path):
    whole, _ = two_process_run
    cut = tmp_path / "cut"
    printed = launch("demo", "--output-dir", str(cut), "--set", *KNOBS, fault="crash:7", expect=1)
    assert f"interrupted (Ctrl-C): at step 7 of 15; the best model so far is in {cut / 'model'} and the last " \
           f"checkpoint is {cut / 'checkpoints' / 'step-0000006'}. Continue: python -m hw7qa train --resume {cut}" in printed
    assert steps_of(list_checkpoints(cut)) == [5, 6]
    launch("train", "--resume", str(cut))
    assert read_metrics(cut) == read_metrics(whole)          # every loss, lr and dev score, nothing twice
    for name in ("model", "checkpoints/step-0000015"):
        a, b = load_file(cut / name / "model.safetensors"), load_file(whole / name / "model.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    optimizer = [torch.load(run / "checkpoints" / "step-0000015" / "optimizer.bin", weights_only=True)
                 for run in (cut, whole)]
    assert all(torch.equal(x["exp_avg"], y["exp_avg"])
               for x, y in zip(optimizer[0]["state"].values(), optimizer[1]["state"].values()))


def test_a_nan_loss_on_one_process_skips_the_step_on_both(tmp_path):
    run = tmp_path / "nan"
    launch("demo", "--output-dir", str(run), "--set", "epochs=1", "batch_size=8", "log_every=1", "save_every=1",
           "keep_checkpoints=10", "test_file=", fault="nan:1:3:3", timeout=300)     # a hang fails here
    # no checkpoint inside a streak of skipped steps, and AdamW counted 3 steps by step 4: one was skipped
    assert steps_of(list_checkpoints(run)) == [1, 2, 4, 5]
    state = torch.load(run / "checkpoints" / "step-0000004" / "optimizer.bin", weights_only=True)["state"]
    assert {int(s["step"]) for s in state.values()} == {3}
    weights = load_file(run / "model" / "model.safetensors")
    assert all(torch.isfinite(t).all() for t in weights.values())
    losses = [r["loss"] for r in read_metrics(run) if "loss" in r]
    assert len(losses) == 5 and all(np.isfinite(losses))   # step 3's record: process 0's finite loss alone


def test_a_nan_loss_from_one_process_on_stops_the_run_on_both(tmp_path):
    run = tmp_path / "diverging"
    printed = launch("demo", "--output-dir", str(run), "--set", "epochs=3", "batch_size=8", "log_every=1",
                     "save_every=1", "keep_checkpoints=10", "max_skipped_steps=3", "test_file=", fault="nan:1:2",
                     expect=3, timeout=300)
    assert printed.count("3 optimizer steps in a row had a non-finite loss") == 2      # said by both processes
    assert steps_of(list_checkpoints(run)) == [1]


def test_two_processes_train_with_every_technique_on(tmp_path):
    """FGM's second backward pass goes through DDP's all-reduce too; the moving average, the same on
    both processes, is checkpointed once and saved as the model."""
    run = tmp_path / "techniques"
    launch("demo", "--output-dir", str(run), "--set", "epochs=2", "batch_size=8", "log_every=1", "dev_file=",
           "test_file=", "ema_decay=0.9", "fgm_epsilon=1.0", "layer_lr_decay=0.8", "answer_length_quantile=0.99")
    [last] = list_checkpoints(run)
    average = torch.load(last / "custom_checkpoint_0.pkl", weights_only=True)
    saved = load_file(run / "model" / "model.safetensors")
    assert saved.keys() <= average.keys() and all(torch.equal(saved[k], average[k]) for k in saved)
    trained = load_file(last / "model.safetensors")
    assert not all(torch.equal(saved[k], trained[k]) for k in saved)
    assert all(torch.isfinite(t).all() for t in trained.values())
    losses = [r["loss"] for r in read_metrics(run) if "loss" in r]
    assert len(losses) == 10 and all(np.isfinite(losses))


@pytest.mark.parametrize("ok", [True, False])
def test_a_command_takes_down_its_process_group(tmp_path, ok):
    """Left to the interpreter's exit, gloo's threads may abort a process whose work is done
    ("terminate called without an active exception"), failing the launch: main() ends the group."""
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        test_file = ROOT / "data" / "sample" / "hw7_test.json"
        csv = tmp_path / "result.csv"
        csv.write_text("ID,Answer\n" if not ok else "ID,Answer\n" + "".join(
            f"{q['id']},x\n" for q in json.loads(test_file.read_text(encoding="utf-8"))["questions"]), encoding="utf-8")
        assert main(["check", str(csv), str(test_file)]) == (0 if ok else 1)
        assert not dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_a_full_disk_on_one_process_stops_every_process_with_one_line(tmp_path):
    """Process 1 cannot write its RNG states into the second checkpoint: both processes stop with the
    same line (none waits forever for the other), the half checkpoint is removed, the first is kept."""
    run = tmp_path / "run"
    printed = launch("demo", "--output-dir", str(run), "--set", "epochs=1", "test_file=", *KNOBS[1:],
                     fault=r"full:1:torch\.save .*/step-0000004\.partial/random_states_1\.pkl", expect=4, timeout=300)
    line = f"error: no space left on the disk ({run / 'checkpoints' / 'step-0000004'})"
    assert printed.count(line) == 2, printed[-3000:]
    assert steps_of(list_checkpoints(run)) == [2] and not list((run / "checkpoints").glob("*.partial"))

"""More than one process: ``accelerate launch`` with 2 CPU processes (gloo) trains and evaluates the
demo, shares the work, and gathers predictions equal to a single process's.

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

from conftest import ROOT
from hw7qa.__main__ import main
from hw7qa.run import run_config, run_logits
from hw7qa.data import load_qa_file


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(*args, processes=2):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1"}
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
               "--num_machines", "1", "--main_process_port", str(free_port()), "--mixed_precision", "no",
               "--dynamo_backend", "no", "-m", "hw7qa", *args]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


def test_two_processes_train_and_evaluate_like_one(tmp_path):
    run = tmp_path / "run"
    printed = launch("demo", "--output-dir", str(run), "--set", "epochs=3", "batch_size=8", "log_every=1",
                     "eval_every=5")
    assert "processes: 2" in printed and printed.count("best model:") == 1       # printed once, by the main process
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses, evals = [r for r in records if "loss" in r], [r for r in records if "dev_em" in r]
    # batch_size is the global batch: 38 windows / 8 = 5 steps per epoch, as with one process; one record each
    assert [r["step"] for r in losses] == list(range(1, 16)) and [r["step"] for r in evals] == [5, 10, 15]
    assert (run / "result.csv").read_text(encoding="utf-8").count("\n") == 14   # header + 13, written once

    # evaluation with 2 processes (each runs half of the batches, gather_for_metrics) against 1 process
    launch("evaluate", str(run))
    two = (run / "dev_predictions.jsonl").read_text(encoding="utf-8")
    cfg = run_config(run)
    dev = load_qa_file(cfg.dev_file, need_answers=True)
    logits_two = run_logits(run, cfg, dev)[2]                           # read back from the cache
    shutil.rmtree(run / "logits")
    assert main(["evaluate", str(run)]) == 0
    one = (run / "dev_predictions.jsonl").read_text(encoding="utf-8")
    assert two == one
    logits_one = run_logits(run, cfg, dev)[2]
    assert len(logits_one) == len(logits_two) > 13                      # every window once, none duplicated
    for (s1, e1), (s2, e2) in zip(logits_one, logits_two):
        np.testing.assert_allclose(s1, s2, atol=1e-5)
        np.testing.assert_allclose(e1, e2, atol=1e-5)
    # the dev scores gathered during 2-process training are those of the saved model
    best = max(evals, key=lambda r: r["dev_em"])
    lines = [json.loads(line) for line in one.splitlines()]
    assert best["dev_f1"] == pytest.approx(sum(r["f1"] for r in lines) / len(lines), abs=1e-9)

"""The trainer's promises on the paths users take: train twice in one process, resume under the
contract, never reuse a run folder silently, restart before the first checkpoint, fp16-stored
checkpoints, and each knob taking effect (seen from inside the loop, not from an exit code)."""
import dataclasses
import hashlib
import json
import math
import shlex
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import hw7qa.train as train_module
from conftest import SAMPLE
from hw7qa.__main__ import main
from hw7qa.config import Config
from hw7qa.data import load_qa_file
from hw7qa.inference import window_logits
from hw7qa.models import load_model, run_tokenizer
from hw7qa.config import demo_config
from hw7qa.config import run_config
from conftest import run_logits
from hw7qa.tiny import build_tiny_model, build_tiny_tokenizer
from hw7qa.report import read_metrics
from hw7qa.batches import epoch_rng, micro_batches
from hw7qa.runfolder import TrainerState, list_checkpoints
from hw7qa.train import checkpoint_due, evaluate_due, is_better, log_due, train



def folder_digest(folder):
    """Every file under ``folder`` with a hash of its bytes."""
    return {str(p.relative_to(folder)): hashlib.sha1(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def watch_steps(monkeypatch, look):
    """Call ``look(run)`` after every optimizer step of the next ``train`` and collect what it returns."""
    seen, real = [], train_module.after_step

    def after_step(run, epoch_position):
        seen.append(look(run))
        real(run, epoch_position)
    monkeypatch.setattr(train_module, "after_step", after_step)
    return seen


QUICK = {"epochs": 2, "batch_size": 8, "log_every": 1, "test_file": ""}


# ---------------------------------------------------------------- policies

def test_policies_say_when_to_log_evaluate_and_checkpoint():
    cfg = Config(log_every=3, eval_every=0, save_every=4, keep_checkpoints=1)
    assert [s for s in range(1, 11) if log_due(s, 10, cfg)] == [3, 6, 9, 10]
    assert [s for s in range(1, 11) if evaluate_due(s, 5, 10, cfg)] == [5, 10]           # epoch ends
    assert [s for s in range(1, 11) if evaluate_due(s, 5, 10, Config(eval_every=3))] == [3, 6, 9, 10]
    assert [s for s in range(1, 11) if checkpoint_due(s, 5, cfg)] == [4, 5, 8, 10]       # save_every, epoch ends
    assert not any(checkpoint_due(s, 5, Config(keep_checkpoints=0)) for s in range(1, 11))


def test_best_model_is_chosen_by_em_then_f1():
    state = TrainerState(best_em=0.5, best_f1=0.6)
    assert is_better({"em": 0.5, "f1": 0.7}, state) and is_better({"em": 0.6, "f1": 0.1}, state)
    assert not is_better({"em": 0.5, "f1": 0.6}, state) and not is_better({"em": 0.4, "f1": 0.9}, state)


def test_seed_and_epoch_pairs_never_share_a_random_stream():
    draws = {(seed, epoch): epoch_rng(seed, epoch, "batches").random() for seed in range(4) for epoch in range(4)}
    assert len(set(draws.values())) == len(draws)
    assert epoch_rng(1, 0, "batches").random() == draws[(1, 0)]          # and a resumed run draws the same


# ---------------------------------------------------------------- the notebook's rerun loop

def test_two_trainings_in_one_process_with_other_precisions(tmp_path, capsys):
    first = train(demo_config(str(tmp_path / "fp32"), {**QUICK, "mixed_precision": "no"}))
    second = train(demo_config(str(tmp_path / "bf16"), {**QUICK, "mixed_precision": "bf16"}))
    printed = capsys.readouterr().out
    assert "precision: no" in printed and "precision: bf16" in printed
    for run in (first, second):
        assert [r["step"] for r in read_metrics(run) if "loss" in r] == list(range(1, 11))
        assert (run / "model" / "model.safetensors").exists() and list_checkpoints(run)
    # and once more with the first precision, as after changing the cell back
    third = train(demo_config(str(tmp_path / "again"), {**QUICK, "mixed_precision": "no"}))
    assert read_metrics(third) == read_metrics(first)


def test_the_accelerator_holds_one_dataloader_across_epochs_and_evaluations(tmp_path, monkeypatch):
    held = watch_steps(monkeypatch, lambda run: len(run.accelerator._dataloaders))
    train(demo_config(str(tmp_path / "run"), {**QUICK, "epochs": 3, "eval_every": 2}))
    assert len(held) == 15 and set(held) == {1}


# ---------------------------------------------------------------- knobs take effect

def test_gradient_checkpointing_is_on_in_the_model_being_trained(tmp_path, monkeypatch):
    def is_on(run):
        model = run.accelerator.unwrap_model(run.model)
        if hasattr(model, "is_activation_checkpointing"):       # transformers 5; the old name goes in 6
            return model.is_activation_checkpointing
        return model.is_gradient_checkpointing
    for knob in (True, False):
        seen = watch_steps(monkeypatch, is_on)
        train(demo_config(str(tmp_path / f"gc-{knob}"), {**QUICK, "epochs": 1, "gradient_checkpointing": knob}))
        monkeypatch.undo()
        assert set(seen) == {knob}


def test_group_by_length_pads_fewer_tokens(tmp_path, monkeypatch):
    padding = {}
    for knob in (False, True):
        pads, real = [], train_module.train_step

        def counting_step(run, batch):
            pads.append(int(batch["attention_mask"].numel() - batch["attention_mask"].sum()))
            return real(run, batch)
        monkeypatch.setattr(train_module, "train_step", counting_step)
        train(demo_config(str(tmp_path / f"g-{knob}"), {**QUICK, "epochs": 3, "group_by_length": knob,
                                                          "max_length": 256, "doc_stride": 96}))
        monkeypatch.undo()
        padding[knob] = sum(pads)
    assert padding[True] < padding[False] / 2


def expected_lr(schedule, step, warmup, total, peak):
    """The lr after ``step`` optimizer steps, from the schedules' definitions."""
    if step < warmup:
        return peak * step / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * {"linear": max(0.0, 1 - progress), "cosine": 0.5 * (1 + math.cos(math.pi * progress)),
                   "constant": 1.0}[schedule]


@pytest.mark.parametrize("schedule", ["linear", "cosine", "constant"])
def test_lr_sequence_is_the_configured_schedule(tmp_path, schedule):
    run = train(demo_config(str(tmp_path / schedule), {**QUICK, "epochs": 4, "lr_schedule": schedule,
                                                        "warmup_ratio": 0.25, "lr": 0.001, "dev_file": ""}))
    lrs = [r["lr"] for r in read_metrics(run) if "lr" in r]
    assert len(lrs) == 20
    assert lrs == pytest.approx([expected_lr(schedule, s, 5, 20, 0.001) for s in range(1, 21)], abs=1e-12)


def test_inference_runs_at_the_configured_precision(tmp_path):
    run = train(demo_config(str(tmp_path / "run"), {**QUICK, "epochs": 1}))
    cfg = run_config(run)
    dev = load_qa_file(cfg.dev_file, need_answers=True)
    enc, windows, cached = run_logits(run, cfg, dev)
    model, tokenizer = load_model(str(run / "model")), run_tokenizer(run, cfg)
    full = window_logits(model, tokenizer, windows, 32, "no")
    low = window_logits(model, tokenizer, windows, 32, "bf16")
    assert all(np.array_equal(a[0], b[0]) for a, b in zip(cached, full))       # the run's precision: no
    diffs = [float(abs(a[0] - b[0]).max()) for a, b in zip(full, low)]
    assert 0 < max(diffs) < 0.5                        # bf16 changes the logits a little, not wholesale
    # predict/evaluate take it from the config, and the logits cache keeps precisions apart
    bf16 = run_logits(run, run_config(run, ["mixed_precision=bf16"]), dev)[2]
    assert all(np.array_equal(a[0], b[0]) for a, b in zip(low, bf16))


# ---------------------------------------------------------------- fp32 master weights

def test_a_checkpoint_stored_in_fp16_is_trained_in_fp32(tmp_path, monkeypatch, sample_train):
    tokenizer = build_tiny_tokenizer(sample_train.paragraphs + [q.question_text for q in sample_train.questions])
    tokenizer.save_pretrained(tmp_path / "fp16-model")
    build_tiny_model(len(tokenizer)).half().save_pretrained(tmp_path / "fp16-model")
    assert {t.dtype for t in load_file(tmp_path / "fp16-model" / "model.safetensors").values()} == {torch.float16}
    dtypes = watch_steps(monkeypatch, lambda run: {p.dtype for p in run.model.parameters()})
    run = train(demo_config(str(tmp_path / "run"), {**QUICK, "epochs": 6, "model_name": str(tmp_path / "fp16-model")}))
    assert all(d == {torch.float32} for d in dtypes)
    assert {t.dtype for t in load_file(run / "model" / "model.safetensors").values()} == {torch.float32}
    losses = [r["loss"] for r in read_metrics(run) if "loss" in r]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.1


# ---------------------------------------------------------------- run folders

def test_a_new_run_never_reuses_an_existing_run_folder(tmp_path, capsys):
    run = train(demo_config(str(tmp_path / "run"), QUICK))
    before = folder_digest(run)
    overrides = [f"{k}={v}" for k, v in {**QUICK, "lr": 0.01}.items()]
    assert main(["demo", "--output-dir", str(run), "--set", *overrides]) == 2
    err = capsys.readouterr().err
    assert "already holds a run" in err and "--resume" in err and "--overwrite" in err
    assert folder_digest(run) == before                                    # not one byte changed
    with pytest.raises(ValueError, match="already holds a run"):
        train(dataclasses.replace(run_config(run), lr=0.01))               # the notebook's way
    assert folder_digest(run) == before
    # on purpose: the old run is replaced entirely
    assert main(["train", "--config", str(SAMPLE.parent.parent / "configs" / "demo.json"), "--overwrite", "--set",
                 f"output_dir={run}", *overrides]) == 0
    assert run_config(run).lr == 0.01 and [r["step"] for r in read_metrics(run) if "loss" in r] == list(range(1, 11))
    # a folder that holds something else is never emptied
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="holds no run"):
        train(demo_config(str(tmp_path / "mine"), QUICK), overwrite=True)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "mine"


def test_a_resume_without_a_checkpoint_starts_over_only_where_nothing_is_lost(tmp_path, monkeypatch, capsys):
    knobs = {**QUICK, "save_every": 0}                                      # first checkpoint at step 5
    whole = train(demo_config(str(tmp_path / "whole"), knobs))
    cut = tmp_path / "cut"
    # stopped before its first step: nothing but config.json, so a resume starts it again
    def stopped(run, batch):
        raise KeyboardInterrupt
    with monkeypatch.context() as patched:
        patched.setattr(train_module, "train_step", stopped)
        with pytest.raises(KeyboardInterrupt):
            train(demo_config(str(cut), knobs))
    assert [p.name for p in cut.iterdir()] == ["config.json"]
    assert main(["train", "--resume", str(cut)]) == 0
    assert read_metrics(cut) == read_metrics(whole)
    assert folder_digest(cut / "model")["model.safetensors"] == folder_digest(whole / "model")["model.safetensors"]

    # stopped after logging steps 1-3, before its first checkpoint: a resume would start over, so it refuses
    shutil.rmtree(cut)
    real = train_module.log_metrics

    def crash_at_step_3(run_dir, record):
        real(run_dir, record)
        if record.get("step") == 3:
            raise KeyboardInterrupt
    with monkeypatch.context() as patched:
        patched.setattr(train_module, "log_metrics", crash_at_step_3)
        with pytest.raises(KeyboardInterrupt):
            train(demo_config(str(cut), knobs))
    assert not list_checkpoints(cut) and [r["step"] for r in read_metrics(cut)] == [1, 2, 3]
    before = folder_digest(cut)
    assert main(["train", "--resume", str(cut)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert (f"error: cannot resume {cut}: it has no checkpoint to continue from (it stopped before its first "
            f"checkpoint), and starting it again would delete its records up to step 3 (metrics.jsonl)") in err
    assert folder_digest(cut) == before
    # what the message says to do starts it over, as one run
    command = shlex.split(err.split("deleting them: python -m hw7qa ")[1].split(" (notebook")[0])
    assert command == ["train", "--config", str(cut / "config.json"), "--set", f"output_dir={cut}", "--overwrite"]
    assert main(command) == 0
    assert read_metrics(cut) == read_metrics(whole)


# ---------------------------------------------------------------- the resume contract

def test_resume_refuses_a_setting_that_shapes_the_model_and_accepts_a_free_one(tmp_path, capsys):
    run = train(demo_config(str(tmp_path / "run"), QUICK))
    config_before = (run / "config.json").read_bytes()
    assert main(["train", "--resume", str(run), "--set", "lr=0.5", "seed=7"]) == 2
    err = capsys.readouterr().err
    assert "lr=0.5 (the run has 0.002)" in err and "seed=7 (the run has 0)" in err
    assert (run / "config.json").read_bytes() == config_before
    with pytest.raises(ValueError, match="train_windows='all'"):           # the notebook's way, same rule
        train(dataclasses.replace(run_config(run), train_windows="all"), resume=True)
    assert main(["train", "--resume", str(run), "--set", "eval_batch_size=16", "log_every=2"]) == 0
    assert run_config(run).eval_batch_size == 16 and "already finished" in capsys.readouterr().out


# ---------------------------------------------------------------- clear errors

def test_damaged_run_files_and_bad_model_paths_are_named(tmp_path, capsys):
    run = train(demo_config(str(tmp_path / "run"), {**QUICK, "epochs": 1}))
    checkpoint = list_checkpoints(run)[-1]
    (checkpoint / "trainer_state.json").write_text('{"step": 5, "ep')
    assert main(["train", "--resume", str(run)]) == 2
    assert f"{checkpoint / 'trainer_state.json'} is damaged" in capsys.readouterr().err
    weights = run / "model" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    assert main(["evaluate", str(run)]) == 2
    err = capsys.readouterr().err
    assert f"{weights} is damaged: not a whole safetensors file" in err and len(err.strip().splitlines()) == 1
    (run / "config.json").write_text('{"model_name": "tin')
    assert main(["evaluate", str(run)]) == 2
    assert f"{run / 'config.json'} is damaged" in capsys.readouterr().err
    assert main(["demo", "--output-dir", str(tmp_path / "r2"), "--set", "model_name=./no/such-model"]) == 2
    assert "model_name='./no/such-model': no such folder" in capsys.readouterr().err
    assert not (tmp_path / "r2").exists()


# ---------------------------------------------------------------- auto_batch

def test_micro_batches_halve_while_processes_still_share_evenly():
    assert micro_batches(16, 1) == [16, 8, 4, 2, 1] and micro_batches(16, 2) == [16, 8, 4, 2]
    assert micro_batches(12, 1) == [12, 6, 3] and micro_batches(7, 1) == [7]


def oom_above(monkeypatch, limit):
    """Training forward passes of more than ``limit`` windows fail as a GPU out of memory does."""
    from transformers import BertForQuestionAnswering
    real = BertForQuestionAnswering.forward

    def forward(self, input_ids=None, **kwargs):
        if torch.is_grad_enabled() and input_ids.shape[0] > limit:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(self, input_ids=input_ids, **kwargs)
    monkeypatch.setattr(BertForQuestionAnswering, "forward", forward)


def test_auto_batch_keeps_the_recipe_when_memory_is_short(tmp_path, monkeypatch, capsys):
    knobs = {**QUICK, "epochs": 3, "batch_size": 16, "grad_accum": 1, "save_every": 2, "keep_checkpoints": 5}
    fixed = train(demo_config(str(tmp_path / "fixed"), {**knobs, "batch_size": 4, "grad_accum": 4,
                                                       "auto_batch": False}))
    oom_above(monkeypatch, 4)
    auto = train(demo_config(str(tmp_path / "auto"), knobs))
    assert "16 windows per forward pass do not fit in memory; 4 × grad_accum 4 instead" in capsys.readouterr().out
    assert read_metrics(auto) == read_metrics(fixed)          # the same steps, lr and losses: 4 × 4 is 16 × 1
    state = json.loads((list_checkpoints(auto)[-1] / "trainer_state.json").read_text())
    assert (state["micro_batch"], state["grad_accum"]) == (4, 4)

    # a resumed run keeps the micro-batch it started with, even where more would fit now
    crash_after = train_module.after_step

    def crash_at_step_4(run, epoch_position):
        crash_after(run, epoch_position)
        if run.state.step == 4:
            raise KeyboardInterrupt
    monkeypatch.setattr(train_module, "after_step", crash_at_step_4)
    with pytest.raises(KeyboardInterrupt):
        train(demo_config(str(tmp_path / "cut"), knobs))
    monkeypatch.undo()                                        # no OOM any more: 16 would fit
    assert main(["train", "--resume", str(tmp_path / "cut")]) == 0
    assert read_metrics(tmp_path / "cut") == read_metrics(auto)


def test_auto_batch_gives_up_with_a_message_when_nothing_fits(tmp_path, monkeypatch, capsys):
    oom_above(monkeypatch, 0)
    assert main(["demo", "--output-dir", str(tmp_path / "run"), "--set", "test_file="]) == 3
    assert "not even 1 windows of up to 128 tokens per forward pass fit in memory" in capsys.readouterr().err


def test_an_oversized_batch_without_auto_batch_stops_with_what_to_change(tmp_path, monkeypatch, capsys):
    oom_above(monkeypatch, 4)
    run = tmp_path / "run"
    assert main(["demo", "--output-dir", str(run), "--set", "auto_batch=false", "batch_size=8", "grad_accum=2",
                 "test_file="]) == 3
    said = capsys.readouterr().err
    assert "GPU out of memory" in said and "Set auto_batch=true, or lower batch_size (now 8) and raise grad_accum (now 2)" \
        in said
    assert "Traceback" not in said and (run / "config.json").is_file()    # the run folder is kept for a resume
    assert "best model so far" not in said                                # none yet: the first step failed


# ---------------------------------------------------------------- trackers

def test_tensorboard_gets_what_metrics_jsonl_gets(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    run = train(demo_config(str(tmp_path / "run"), {**QUICK, "log_with": "tensorboard"}))
    [events] = (run / "tensorboard").glob("events.out.tfevents.*")
    board = EventAccumulator(str(events))
    board.Reload()
    records = read_metrics(run)
    for tag, key in (("train/loss", "loss"), ("train/lr", "lr"), ("dev/em", "dev_em"), ("dev/f1", "dev_f1")):
        logged = [r for r in records if key in r]
        scalars = board.Scalars(tag)                         # float32 values
        assert [e.step for e in scalars] == [r["step"] for r in logged], tag
        assert [e.value for e in scalars] == pytest.approx([r[key] for r in logged], rel=1e-6, abs=1e-9), tag


def test_a_tracker_whose_package_is_missing_is_refused_before_the_run(tmp_path, monkeypatch, capsys):
    import hw7qa.models
    monkeypatch.setitem(hw7qa.models.TRACKER_PACKAGES, "wandb", ("no_such_package_here",))
    assert main(["demo", "--output-dir", str(tmp_path / "run"), "--set", "log_with=wandb"]) == 2
    assert "log_with=wandb needs the no_such_package_here package" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_the_seed_decides_the_new_qa_head_and_dropout(tmp_path, sample_train):
    """A pretrained encoder without a QA head (as every hub model): the head is initialised at random,
    which must come from cfg.seed, not from whatever ran before in the process."""
    from transformers import BertConfig, BertModel
    tokenizer = build_tiny_tokenizer(sample_train.paragraphs + [q.question_text for q in sample_train.questions])
    tokenizer.save_pretrained(tmp_path / "encoder")
    BertModel(BertConfig(vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=128)).save_pretrained(tmp_path / "encoder")
    knobs = {**QUICK, "epochs": 1, "model_name": str(tmp_path / "encoder")}
    first = train(demo_config(str(tmp_path / "a"), knobs))
    torch.rand(100)                                         # the process's RNG moves on
    again = train(demo_config(str(tmp_path / "b"), knobs))
    other = train(demo_config(str(tmp_path / "c"), {**knobs, "seed": 1}))
    weights = [load_file(run / "model" / "model.safetensors") for run in (first, again, other)]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    assert not torch.equal(weights[0]["qa_outputs.weight"], weights[2]["qa_outputs.weight"])


def test_attention_runs_through_pytorchs_sdpa_kernel(tmp_path, monkeypatch, sample_train):
    """Training and inference use ``scaled_dot_product_attention`` (fused kernels on a GPU), not the
    eager softmax(QKᵀ)V, for a model loaded from a folder as for the demo's built one."""
    tokenizer = build_tiny_tokenizer(sample_train.paragraphs + [q.question_text for q in sample_train.questions])
    tokenizer.save_pretrained(tmp_path / "model")
    build_tiny_model(len(tokenizer)).save_pretrained(tmp_path / "model")
    calls, real = [], torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    steps = watch_steps(monkeypatch, lambda run: run.accelerator.unwrap_model(run.model).config._attn_implementation)
    train(demo_config(str(tmp_path / "run"), {**QUICK, "epochs": 1, "model_name": str(tmp_path / "model"),
                                               "dev_file": ""}))
    assert set(steps) == {"sdpa"} and len(calls) >= 2 * len(steps)     # 2 layers per forward pass

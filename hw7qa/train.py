"""Fine-tune a model for extractive QA: the Accelerator loop of accelerate's ``complete_nlp_example.py``,
read top to bottom: the policies (when to log, evaluate, save), then ``train`` → ``fit`` → ``run_epoch`` →
``train_step`` and ``after_step``. What it uses lives beside it: ``models.py``, ``optim.py``, ``batches.py``,
``runfolder.py`` (the run folder, its checkpoints and their state) and the opt-in ``techniques.py``.

Promises kept here, each tested (README: "Interrupted runs", "More than one GPU"): a fresh ``Accelerator`` per
``train()`` call, no state left behind; ``batch_size`` counts a forward pass's windows over all processes; the host
waits for the device only at logging, evaluation and checkpoints (fp16: also once per step, to learn whether the
loss scaler skipped it), a non-finite step being skipped on the device by every process alike; the run folder is
decided on the main process, never an old run's; a resume ends with an uninterrupted run's weights and metrics; a
write refused on any process stops them all with one ``OSError`` naming the file; ``compile=true`` compiles in place
after the moving average's copy is made (checkpoints keep the plain model's keys); ``tf32=true`` holds for the call.
"""
from __future__ import annotations

import dataclasses
import math
import shlex
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from accelerate.utils import set_seed
from tqdm.auto import tqdm

from .batches import EpochBatches, EpochWindows, choose_batches
from .config import Config, TrainingError
from .data import DataError, QAData, concat_data, load_qa_file
from .inference import Reader, answers
from .files import refused_as
from .metrics import score
from .models import (accelerator_for, check_divisible, check_max_length, check_tracker, compile_model,
                     load_model_and_tokenizer, processes, tf32_matmuls)
from .optim import make_optimizer, make_scheduler, step_unless
from .runfolder import (TrainerState, done_on_main, list_checkpoints, log_metrics, on_interrupt, past_the_start,
                        prepare_run_dir, read_trainer_state, save_checkpoint, save_model, what_is_kept)
from .techniques import WeightAverage, adversarial_backward, answer_length_from
from .windows import Encoded, encode, padding_of, train_windows


# ---------------------------------------------------------------- policies

def log_due(step: int, total_steps: int, cfg: Config) -> bool:
    return step % cfg.log_every == 0 or step == total_steps


def evaluate_due(step: int, steps_per_epoch: int, total_steps: int, cfg: Config) -> bool:
    """Every ``eval_every`` steps and at the last step; with ``eval_every=0`` at every epoch end."""
    if cfg.eval_every:
        return step % cfg.eval_every == 0 or step == total_steps
    return step % steps_per_epoch == 0


def checkpoint_due(step: int, steps_per_epoch: int, cfg: Config) -> bool:
    """Every ``save_every`` steps and at every epoch end, unless ``keep_checkpoints=0``."""
    return cfg.keep_checkpoints != 0 and (bool(cfg.save_every and step % cfg.save_every == 0)
                                          or step % steps_per_epoch == 0)


def is_better(scores: dict, state: TrainerState) -> bool:
    """Higher dev EM wins; on equal EM, higher F1 (a tie keeps the earlier model)."""
    return (scores["em"], scores["f1"]) > (state.best_em, state.best_f1)


# ---------------------------------------------------------------- the loop

# accelerate's trackers: TensorBoard writes to <run>/tensorboard; Weights & Biases to the project hw7qa
TRACKER_PROJECT = {"tensorboard": "tensorboard", "wandb": "hw7qa"}


def tracker_folder(cfg: Config, run_dir: Path) -> Path:
    """Where the tracker writes, as a write it fails names it: TensorBoard's folder, or the run's."""
    return run_dir / TRACKER_PROJECT["tensorboard"] if cfg.log_with == "tensorboard" else run_dir


@dataclass
class TrainingRun:
    """One training run: settings, the prepared objects, the state, and the device-side counters."""
    cfg: Config
    accelerator: object
    run_dir: Path
    model: torch.nn.Module
    tokenizer: object
    optimizer: object
    scheduler: object
    loader: DataLoader
    dataset: EpochWindows
    batches: EpochBatches
    dev_data: QAData | None
    dev_enc: Encoded | None
    steps_per_epoch: int
    state: TrainerState
    ema: WeightAverage | None       # ema_decay's moving average of the weights: evaluated and saved instead
    losses: torch.Tensor = None     # float64 on the device: sum and count of the finite losses since the last record
    streak: torch.Tensor = None     # optimizer steps skipped in a row (the same on every process)
    nonfinite: torch.Tensor = None  # micro-batches of the current optimizer step with a non-finite loss

    @property
    def total_steps(self) -> int:
        return self.steps_per_epoch * self.cfg.epochs

    @property
    def trained_steps(self) -> int:
        """Optimizer steps applied, as the schedule counts them: ``state.step`` less the fp16 loss scaler's skips."""
        return self.scheduler.scheduler.last_epoch

    def kept_model(self) -> torch.nn.Module:
        """The weights evaluated and saved: the moving average with ``ema_decay``, else the trained ones."""
        return self.ema.model if self.ema is not None else self.accelerator.unwrap_model(self.model)


def train(cfg: Config, resume: bool = False, overwrite: bool = False) -> Path:
    """Train with ``cfg``; returns the run folder, holding config.json, metrics.jsonl and model/. ``resume=True``
    continues the run in ``cfg.output_dir`` from its newest checkpoint, starts it again where it stopped before
    recording a step, or refuses (``runfolder.resume_point``); ``cfg`` may differ from the run's config only in
    ``FREE_ON_RESUME``. ``overwrite=True`` lets a new run replace the run there, which a new run otherwise refuses."""
    started = processes()             # the processes of accelerate launch (or this one): no Accelerator yet
    check_divisible(cfg, started.num_processes)
    check_tracker(cfg.log_with)
    set_seed(cfg.seed)                # the new QA head's weights and dropout: python, numpy, torch, cuda
    inputs = load_inputs(cfg)         # bad data, model or max_length stop the run before anything is written
    cfg = inputs.cfg                  # with max_answer_length from the training answers (answer_length_quantile)
    run_dir, checkpoint = done_on_main(started, lambda: prepare_run_dir(cfg, resume, overwrite))
    run = None
    with on_interrupt(lambda: continue_hint(run_dir, run)), \
            accelerator_for(cfg.mixed_precision, cfg.grad_accum, cfg.log_with, run_dir) as accelerator, \
            tf32_matmuls(cfg.tf32):
        run = start_run(cfg, accelerator, inputs, run_dir, checkpoint)
        fit(run)
        accelerator.wait_for_everyone()
        if run.state.step > run.trained_steps:
            accelerator.print(f"fp16: the loss scaler skipped {run.state.step - run.trained_steps} of the "
                              f"{run.state.step} optimizer steps (float16 gradients overflowed while it calibrated its "
                              f"scale); the other {run.trained_steps} were applied, and the lr schedule followed them")
        accelerator.print(f"best model: {run.run_dir / 'model'}" + (
            f" (dev EM {run.state.best_em:.4f}, F1 {run.state.best_f1:.4f})" if run.dev_data else
            " (no dev file: the last epoch's model)"))
        return run.run_dir


@dataclass
class Inputs:
    """What a run starts from, loaded and checked before its folder is touched."""
    cfg: Config
    train_data: QAData
    train_enc: Encoded
    dev_data: QAData | None
    dev_enc: Encoded | None
    model: torch.nn.Module
    tokenizer: object


def load_inputs(cfg: Config) -> Inputs:
    """The data, model and tokenizer of ``cfg``, the training and dev data tokenized (the test file too, to refuse
    one that cannot be answered), and ``cfg`` with ``max_answer_length`` from the training answers when
    ``answer_length_quantile`` asks for it (the value config.json records, and evaluate and predict use)."""
    train_data = load_qa_file(cfg.train_file, need_answers=True, setting="train_file")
    dev_data = load_qa_file(cfg.dev_file, need_answers=True, setting="dev_file") if cfg.dev_file else None
    if cfg.final_fit:
        train_data, dev_data = concat_data(train_data, dev_data), None
    model, tokenizer = load_model_and_tokenizer(cfg, train_data)
    check_max_length(model.config, cfg.max_length)
    train_enc = encode(train_data, tokenizer, cfg.windows)
    if not len(train_windows(train_enc, "center", None)):          # nothing to learn from
        raise DataError(f"{train_data.path}: no answer of its {len(train_data.questions)} questions fits in a window "
                        f"of max_length={cfg.max_length} tokens (with its question); raise max_length")
    dev_enc = encode(dev_data, tokenizer, cfg.windows) if dev_data else None
    if cfg.test_file:       # refused now, not after training
        encode(load_qa_file(cfg.test_file, setting="test_file"), tokenizer, cfg.windows)
    if cfg.answer_length_quantile:
        cfg = dataclasses.replace(cfg, max_answer_length=answer_length_from(train_enc.answer_tokens,
                                                                            cfg.answer_length_quantile))
    return Inputs(cfg, train_data, train_enc, dev_data, dev_enc, model, tokenizer)


def start_run(cfg: Config, accelerator, inputs: Inputs, run_dir: Path, checkpoint: Path | None) -> TrainingRun:
    """The prepared model, optimizer, schedule and loader, and the state (from ``checkpoint`` if resuming); the
    tracker of ``log_with`` started."""
    accelerator.print(f"run folder: {run_dir}  device: {accelerator.device}  processes: "
                      f"{accelerator.num_processes}  precision: {accelerator.mixed_precision}")
    model, tokenizer = inputs.model, inputs.tokenizer
    dataset = EpochWindows(inputs.train_enc, cfg.train_windows, cfg.seed, padding_of(tokenizer))
    dataset.start_epoch(0)
    report_training_data(cfg, accelerator, run_dir, inputs.train_data, len(dataset), checkpoint)
    if cfg.gradient_checkpointing:   # renamed in transformers 5; the old name goes in 6
        (getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable)()
    saved = read_trainer_state(checkpoint) if checkpoint else None
    micro_batch, grad_accum = choose_batches(cfg, model, dataset, accelerator, saved)
    accelerator.gradient_accumulation_steps = grad_accum
    batches = EpochBatches(dataset, micro_batch, cfg.group_by_length, cfg.seed, accelerator.num_processes)
    batches.start_epoch(0)
    steps_per_epoch = math.ceil(len(batches) / grad_accum)
    # an own generator: a DataLoader without one draws its base seed from the global RNG (dropout's)
    loader = DataLoader(dataset, batch_sampler=batches, collate_fn=dataset.collate,
                        generator=torch.Generator().manual_seed(cfg.seed), pin_memory=accelerator.device.type == "cuda")
    model.to(accelerator.device)
    optimizer = make_optimizer(model, cfg, accelerator.device)
    scheduler = make_scheduler(optimizer, cfg, steps_per_epoch * cfg.epochs)
    ema = WeightAverage(model, cfg.ema_decay) if cfg.ema_decay else None
    compile_model(model, cfg.compile)     # in place: checkpoints hold the keys of the plain model
    model, optimizer, scheduler, loader = accelerator.prepare(model, optimizer, scheduler, loader)
    if ema is not None:
        accelerator.register_for_checkpointing(ema)     # saved and restored with the checkpoints
    if cfg.log_with != "none":
        def init_trackers():
            with refused_as(tracker_folder(cfg, run_dir)):
                accelerator.init_trackers(TRACKER_PROJECT[cfg.log_with], config=dataclasses.asdict(cfg))
        done_on_main(accelerator, init_trackers)
    state = dataclasses.replace(saved or TrainerState(), micro_batch=micro_batch, grad_accum=grad_accum)
    run = TrainingRun(cfg, accelerator, run_dir, model, tokenizer, optimizer, scheduler, loader, dataset, batches,
                      inputs.dev_data, inputs.dev_enc, steps_per_epoch, state, ema)
    restore(run, checkpoint)
    return run


def report_training_data(cfg: Config, accelerator, run_dir: Path, train_data: QAData, n_windows: int,
                         checkpoint: Path | None) -> None:
    skipped = len(train_data.questions) - n_windows if cfg.train_windows != "all" else 0
    accelerator.print(f"train: {len(train_data.questions)} questions → {n_windows} windows per epoch "
                      f"(policy {cfg.train_windows}" + (f", {skipped} questions whose answer does not fit "
                                                         f"a window left out)" if skipped else ")"))
    if cfg.final_fit:
        accelerator.print("final_fit: training on train + dev. There is NO dev evaluation in this run: its dev "
                          "scores cannot be measured. Choose the recipe on a normal run first.")
        if checkpoint is None:
            done_on_main(accelerator, lambda: log_metrics(run_dir, {
                "step": 0, "note": f"final_fit: trained on {cfg.train_file} + {cfg.dev_file}, no dev evaluation"}))


def restore(run: TrainingRun, checkpoint: Path | None) -> None:
    """The device counters, from ``run.state`` (read from ``checkpoint``); the weights, optimizer, scheduler and RNG
    states of ``checkpoint`` if there is one."""
    device, rank, state = run.accelerator.device, run.accelerator.process_index, run.state
    if len(state.running_n) == run.accelerator.num_processes:   # else none yet, or a new process count: all on 0
        losses = [state.running_loss[rank], state.running_n[rank]]
    else:
        losses = [sum(state.running_loss), sum(state.running_n)] if rank == 0 else [0.0, 0.0]
    run.losses = torch.tensor(losses, dtype=torch.float64, device=device)
    run.streak, run.nonfinite = (torch.zeros((), dtype=torch.int64, device=device) for _ in range(2))
    if checkpoint is None:
        return
    run.accelerator.load_state(str(checkpoint))
    run.accelerator.print(f"resumed from {checkpoint} (step {run.state.step} of {run.total_steps}, epoch "
                          f"{run.state.epoch + 1}, {run.state.batches_done} batches into it)")
    if run.state.epoch >= run.cfg.epochs:
        run.accelerator.print(f"this run had already finished its {run.cfg.epochs} epochs: nothing to train")


def fit(run: TrainingRun) -> None:
    """The epochs, with a clear message instead of a traceback where the user can do something."""
    cfg = run.cfg
    run.model.train()
    with tqdm(total=run.total_steps, initial=run.state.step, desc="train", unit="step",
              disable=not run.accelerator.is_local_main_process) as progress:
        try:
            for epoch in range(run.state.epoch, cfg.epochs):
                run_epoch(run, epoch, progress)
        except torch.cuda.OutOfMemoryError as e:
            raise TrainingError(
                f"GPU out of memory ({str(e).splitlines()[0]}). Set auto_batch=true, or lower batch_size (now "
                f"{run.state.micro_batch}) and raise grad_accum (now {run.state.grad_accum}) by the same factor, "
                f"lower max_length (now {cfg.max_length}), or set gradient_checkpointing=true."
                f"{what_is_kept(run.run_dir)}") from None


def continue_hint(run_dir: Path, run: TrainingRun | None) -> str:
    """What an interrupted run kept and the command that continues it, as a resume will find it
    (``runfolder.resume_point``): from its last checkpoint, from the start if it has saved nothing, else over."""
    checkpoints, model = list_checkpoints(run_dir), run_dir / "model"
    at = f"at step {run.state.step} of {run.total_steps}; " if run else ""
    saved = ([f"the best model so far is in {model}"] if model.is_dir() else []) + (
        [f"the last checkpoint is {checkpoints[-1]}"] if checkpoints else [])
    if checkpoints or not past_the_start(run_dir):
        return (f"{at}{' and '.join(saved) or 'nothing is saved yet'}. Continue: python -m hw7qa train --resume "
                f"{shlex.quote(str(run_dir))}")
    return (f"{at}{''.join(f'{s}; ' for s in saved)}no checkpoint to continue from (save_every, keep_checkpoints). "
            f"Train it again from step 0: python -m hw7qa train --config {shlex.quote(str(run_dir / 'config.json'))} "
            f"--set {shlex.quote(f'output_dir={run_dir}')} --overwrite")


def run_epoch(run: TrainingRun, epoch: int, progress) -> None:
    """One epoch's batches (from where a resumed run stopped), an optimizer step every ``grad_accum``."""
    skip = run.state.batches_done
    run.dataset.start_epoch(epoch)
    run.batches.start_epoch(epoch, skip)
    n_batches = len(run.batches) + skip
    for batch_index, batch in enumerate(run.loader, start=skip):
        if not train_step(run, batch):
            continue
        run.state.step += 1
        done = batch_index + 1
        run.state.epoch, run.state.batches_done = (epoch + 1, 0) if done == n_batches else (epoch, done)
        progress.update(1)
        after_step(run, epoch + done / n_batches)


def train_step(run: TrainingRun, batch: dict) -> bool:
    """Forward and backward one micro-batch (twice with ``fgm_epsilon``: the second time with the embeddings
    perturbed); at the last of ``grad_accum``, clip, step and update the moving average of ``ema_decay``. Returns
    whether an optimizer step (taken or skipped) ended here. Nothing here waits for the device."""
    accelerator, cfg = run.accelerator, run.cfg
    with accelerator.accumulate(run.model):
        loss = run.model(**batch).loss
        # every process always runs backward: DDP all-reduces the gradients, so a NaN loss on one process makes
        # every process's gradients non-finite, and all of them skip that step together
        accelerator.backward(loss)
        if cfg.fgm_epsilon:
            embeddings = accelerator.unwrap_model(run.model).get_input_embeddings().weight
            adversarial_backward(run.model, embeddings, batch, cfg.fgm_epsilon, accelerator.backward)
        finite = torch.isfinite(loss.detach())
        run.losses += torch.stack([torch.where(finite, loss.detach().double(), 0.0), finite.double()])
        run.nonfinite += ~finite
        if accelerator.sync_gradients:
            norm = accelerator.clip_grad_norm_(run.model.parameters(), cfg.max_grad_norm or math.inf)
            skip = ~torch.isfinite(norm)
            step_unless(run.optimizer, skip)
            scaler = run.optimizer.scaler
            # fp16: a step the loss scaler skipped is not trained, so the schedule and the moving average wait for
            # the next applied one (accelerate's scheduler wrapper cannot see a fused AdamW skip it). Asking is the
            # one wait for the device per step that fp16 adds.
            if scaler is None or not skip.item():
                run.scheduler.step()
                if run.ema is not None:
                    run.ema.update(run.trained_steps)
            # fp16: a skip with a finite loss is the scaler lowering its scale (as it calibrates at the start), not
            # divergence; only a non-finite loss counts toward max_skipped_steps
            run.streak = torch.where(skip & ((run.nonfinite > 0) if scaler is not None else True), run.streak + 1, 0)
            run.nonfinite.zero_()
        run.optimizer.zero_grad()
    return accelerator.sync_gradients


def after_step(run: TrainingRun, epoch_position: float) -> None:
    """Log, evaluate, save the model of a run without dev, checkpoint: each when its policy says."""
    step, cfg = run.state.step, run.cfg
    if log_due(step, run.total_steps, cfg):
        log(run, epoch_position)
    if run.dev_data is not None and evaluate_due(step, run.steps_per_epoch, run.total_steps, cfg):
        evaluate(run, epoch_position)
    if run.dev_data is None and run.state.batches_done == 0:
        done_on_main(run.accelerator, lambda: save_model(run.kept_model(), run.tokenizer, cfg, run.run_dir / "model"))
    if checkpoint_due(step, run.steps_per_epoch, cfg):
        checkpoint(run)


def stop_if_diverging(run: TrainingRun) -> int:
    """The current streak of skipped steps (a host sync); a TrainingError once it reaches ``max_skipped_steps``.
    Called where the host syncs anyway: at log records and checkpoints."""
    streak = int(run.streak)
    if streak >= run.cfg.max_skipped_steps:
        raise TrainingError(
            f"{streak} optimizer steps in a row had a non-finite loss or gradients (step {run.state.step}). "
            f"The learning rate may be too high (lr={run.cfg.lr}); with fp16, try mixed_precision=bf16 (newer "
            f"GPUs) or no, a lower lr, or max_grad_norm=1.{what_is_kept(run.run_dir)}")
    return streak


def log(run: TrainingRun, epoch_position: float) -> None:
    """One metrics.jsonl record: the mean loss over all processes' micro-batches since the last one."""
    stop_if_diverging(run)
    loss_sum, n = run.accelerator.reduce(run.losses, "sum").tolist()
    lr = run.scheduler.get_last_lr()[0]
    if n:
        done_on_main(run.accelerator, lambda: record(run, {"epoch": round(epoch_position, 4), "loss": loss_sum / n,
                                                           "lr": lr}, {"train/loss": loss_sum / n, "train/lr": lr}))
    run.losses.zero_()


def record(run: TrainingRun, values: dict, tracked: dict) -> None:
    """``values`` at this step as a metrics.jsonl record, and ``tracked`` to the tracker of ``log_with``.
    Main process only (``done_on_main``): every process learns if a write failed."""
    log_metrics(run.run_dir, {"step": run.state.step, **values})
    with refused_as(tracker_folder(run.cfg, run.run_dir)):
        run.accelerator.log(tracked, step=run.state.step)


def evaluate(run: TrainingRun, epoch_position: float) -> None:
    """Dev EM/F1 of the current weights; the model is saved to <run>/model when it is the best yet."""
    accelerator, state, model = run.accelerator, run.state, run.kept_model()
    # doc_stride alone: tta_strides is for the final prediction, not for every dev evaluation
    predictions = answers(Reader(run.cfg, run.tokenizer, model, accelerator=accelerator), run.dev_data,
                          [run.cfg.doc_stride], run.dev_enc, desc="dev")
    scores = score([p.answer for p in predictions], [q.answer_text for q in run.dev_data.questions])
    improved = is_better(scores, state)
    accelerator.print(f"step {state.step} (epoch {epoch_position:.2f}): dev EM {scores['em']:.4f} F1 "
                      f"{scores['f1']:.4f}" + ("  (best so far, saved)" if improved else ""))
    def record_and_save():
        record(run, {"epoch": round(epoch_position, 4), "dev_em": scores["em"], "dev_f1": scores["f1"]},
               {"dev/em": scores["em"], "dev/f1": scores["f1"]})
        if improved:
            save_model(model, run.tokenizer, run.cfg, run.run_dir / "model")
    done_on_main(accelerator, record_and_save)
    if improved:
        state.best_em, state.best_f1 = scores["em"], scores["f1"]


def checkpoint(run: TrainingRun) -> None:
    """Save the training state, but never during a streak of skipped steps or with non-finite weights: the last
    checkpoint always stays a good one."""
    accelerator = run.accelerator
    if stop_if_diverging(run):
        return
    nonfinite = sum((~torch.isfinite(p)).sum() for p in run.model.parameters())
    if accelerator.reduce(nonfinite.to(accelerator.device), "sum").item():
        accelerator.print(f"step {run.state.step}: the weights are no longer finite; no checkpoint saved")
        return
    counters = accelerator.gather(run.losses.unsqueeze(0)).tolist()
    run.state.running_loss, run.state.running_n = ([c[i] for c in counters] for i in (0, 1))
    save_checkpoint(accelerator, run.run_dir, run.state, run.cfg.keep_checkpoints)


def train_and_predict(cfg: Config, resume: bool = False, overwrite: bool = False) -> Path:
    """``train``; then, if a test file is configured, the run's result.csv (``inference.predict_test``)."""
    from .inference import predict_test
    run_dir = train(cfg, resume=resume, overwrite=overwrite)
    if cfg.test_file:
        with on_interrupt(lambda: f"the trained model is saved in {run_dir / 'model'}; write its result.csv: "
                                  f"python -m hw7qa predict {shlex.quote(str(run_dir))}"):
            predict_test(run_dir)
    return run_dir

"""Fine-tune a model for extractive QA: the Accelerator training loop.

Follows accelerate's ``nlp_example.py``: ``Accelerator(mixed_precision=..., gradient_accumulation_steps=...)``,
``accelerator.accumulate``, ``accelerator.backward``; ``torch.optim.AdamW`` without weight decay on
biases and LayerNorm weights; ``get_linear_schedule_with_warmup``; gradient clipping; dynamic
padding to a multiple of 8. Dev EM/F1 at every epoch end, or every ``eval_every`` optimizer steps and at the end;
the best model (safetensors) and its tokenizer go to ``<run>/model``; loss, lr and dev scores are
appended to ``<run>/metrics.jsonl``.

Checkpoints (``accelerator.save_state``: model, optimizer, scheduler, GradScaler, RNG states, plus
``trainer_state.json`` with the step and the position in the epoch) go to
``<run>/checkpoints/step-NNNNNNN`` every ``save_every`` optimizer steps and at each epoch end, written
to a ``.partial`` folder and renamed when complete; only the last ``keep_checkpoints`` are kept.
``train(cfg, resume=True)`` continues from the newest one, mid-epoch included, and ends with the
same weights as a run that was never interrupted.

``batch_size`` is the number of windows per forward pass *in total*: with several processes
(``accelerate launch``) each one gets ``batch_size / num_processes`` of every batch
(``split_batches``), so a recipe means the same thing on one GPU or four.
"""
from __future__ import annotations

import json
import math
import random
import shutil
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, set_seed
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import (AutoModelForQuestionAnswering, DataCollatorWithPadding,
                          get_constant_schedule_with_warmup, get_linear_schedule_with_warmup)

from . import tiny
from .config import TINY_MODEL, Config, save_config
from .data import QAData, concat_data, load_qa_file
from .decode import predict_encoded
from .metrics import score
from .windows import encode, features, load_tokenizer, train_windows


class TrainingError(RuntimeError):
    """Training cannot go on; the message says which knobs to change."""


def resolve_precision(requested: str) -> str:
    """``auto`` → bf16 on GPUs that support it, fp16 on other GPUs (T4), no on CPU."""
    if requested != "auto":
        return requested
    if not torch.cuda.is_available():
        return "no"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def load_tokenizer_for(cfg: Config, train_data: QAData | None = None):
    """The run's tokenizer: ``cfg.model_name``'s, or for ``tiny-random-bert`` one built from the
    characters of the training file (``train_data``)."""
    if cfg.model_name == TINY_MODEL:
        texts = train_data.paragraphs + [q.question_text for q in train_data.questions]
        return tiny.build_tiny_tokenizer(texts, isolate_digits=cfg.isolate_digits)
    return load_tokenizer(cfg.model_name, cfg.isolate_digits, cfg.isolate_cjk)


def load_model_and_tokenizer(cfg: Config, train_data: QAData | None = None):
    """``AutoModelForQuestionAnswering`` + fast tokenizer from a hub name or a local folder.

    ``model_name="tiny-random-bert"`` builds a tiny random BERT whose vocabulary is the characters
    of the training file (demo and tests; nothing is downloaded).
    """
    tokenizer = load_tokenizer_for(cfg, train_data)
    if cfg.model_name == TINY_MODEL:
        return tiny.build_tiny_model(len(tokenizer), seed=cfg.seed), tokenizer
    return AutoModelForQuestionAnswering.from_pretrained(cfg.model_name), tokenizer


def check_max_length(model_config, max_length: int) -> None:
    """Refuse windows longer than the model's position embeddings (RoBERTa-style models lose two
    positions to their padding offset) with a clear message, not an index error deep in the model."""
    limit = getattr(model_config, "max_position_embeddings", None)
    if limit is None:
        return
    if "roberta" in getattr(model_config, "model_type", ""):
        limit -= 2
    if max_length > limit:
        raise ValueError(f"max_length={max_length} but this model has only {limit} positions; set max_length={limit} "
                         f"or less")


def parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only: biases and LayerNorm weights (1-D parameters) get none."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class PrecomputedBatches(list):
    """Batches of window indices for a DataLoader's ``batch_sampler``, with the ``batch_size``
    that accelerate needs to split every batch between processes."""

    def __init__(self, batches: list[list[int]], batch_size: int):
        super().__init__(batches)
        self.batch_size = batch_size


def length_grouped_batches(lengths: list[int], batch_size: int, rng: random.Random, chunk_batches: int = 50
                           ) -> PrecomputedBatches:
    """Batches of window indices of similar length, in random order (less padding, same randomness
    in which windows meet): shuffle, sort each chunk of ``chunk_batches`` batches by length, cut
    into batches, shuffle the batches. Every batch is full except perhaps the last one, which stays
    last (accelerate, splitting batches between processes, completes only a short *last* batch)."""
    order = list(range(len(lengths)))
    rng.shuffle(order)
    chunk, batches = batch_size * chunk_batches, []
    for c in range(0, len(order), chunk):
        part = sorted(order[c:c + chunk], key=lambda i: lengths[i], reverse=True)
        batches += [part[b:b + batch_size] for b in range(0, len(part), batch_size)]
    short = [batches.pop()] if len(batches[-1]) < batch_size else []
    rng.shuffle(batches)
    return PrecomputedBatches(batches + short, batch_size)


def new_run_dir(cfg: Config) -> Path:
    if cfg.output_dir:
        return Path(cfg.output_dir)
    name = Path(cfg.model_name.rstrip("/")).name.replace("/", "_")
    return Path("outputs") / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"


def save_model(model, tokenizer, cfg: Config, directory: Path) -> None:
    """Save model (safetensors), tokenizer and the run's config (``hw7qa_config.json``) to
    ``directory``, replacing it only once complete."""
    partial = directory.with_name(directory.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    save_config(cfg, partial / "hw7qa_config.json")
    shutil.rmtree(directory, ignore_errors=True)
    partial.rename(directory)


def log_metrics(run_dir: Path, record: dict) -> None:
    with open(run_dir / "metrics.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first (``.partial`` folders are unfinished saves)."""
    root = Path(run_dir) / "checkpoints"
    found = [d for d in root.glob("step-*") if d.is_dir() and not d.name.endswith(".partial")
             and (d / "trainer_state.json").exists()]
    return sorted(found, key=lambda d: int(d.name.split("-")[1]))


def save_checkpoint(accelerator: Accelerator, run_dir: Path, state: dict, keep: int) -> Path:
    """Everything needed to continue training, into ``<run>/checkpoints/step-NNNNNNN``.

    ``accelerator.save_state`` writes model, optimizer, scheduler, GradScaler and every process's RNG
    states; ``state`` (step, epoch, batches done in it, ...) goes to ``trainer_state.json``, written
    last. The folder is filled under a ``.partial`` name and renamed when complete, so an
    interruption never leaves a half-written checkpoint that looks complete. Older checkpoints beyond
    the newest ``keep`` are deleted after that. Every process must call this.
    """
    final = run_dir / "checkpoints" / f"step-{state['step']:07d}"
    partial = final.with_name(final.name + ".partial")
    if accelerator.is_main_process:
        shutil.rmtree(partial, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(partial))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (partial / "trainer_state.json").write_text(json.dumps(state, indent=1) + "\n", encoding="utf-8")
        shutil.rmtree(final, ignore_errors=True)
        partial.rename(final)
        for old in list_checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def truncate_metrics(run_dir: Path, step: int) -> None:
    """Drop ``metrics.jsonl`` records after ``step``: the resumed run logs them again."""
    path = run_dir / "metrics.jsonl"
    if path.exists():
        records = [line for line in path.read_text(encoding="utf-8").splitlines()
                   if line.strip() and json.loads(line).get("step", 0) <= step]
        path.write_text("".join(line + "\n" for line in records), encoding="utf-8")


def train(cfg: Config, resume: bool = False) -> Path:
    """Train with ``cfg``; returns the run folder, holding config.json, metrics.jsonl and model/.

    ``resume=True`` continues the run in ``cfg.output_dir`` from its newest checkpoint (or starts it
    there if it has none yet).
    """
    set_seed(cfg.seed)
    accelerator = Accelerator(mixed_precision=resolve_precision(cfg.mixed_precision),
                              gradient_accumulation_steps=cfg.grad_accum,
                              dataloader_config=DataLoaderConfiguration(split_batches=True))
    for key in ("batch_size", "eval_batch_size"):
        if getattr(cfg, key) % accelerator.num_processes:
            raise ValueError(f"{key} ({getattr(cfg, key)}) must be a multiple of the number of processes "
                             f"({accelerator.num_processes}): each process gets an equal part of every batch")
    if resume and not cfg.output_dir:
        raise ValueError("resume needs the run folder (output_dir)")
    # bad data, a bad model name or a too long max_length stop the run before anything is written
    train_data = load_qa_file(cfg.train_file, need_answers=True)
    dev_data = load_qa_file(cfg.dev_file, need_answers=True) if cfg.dev_file else None
    if cfg.final_fit:
        train_data, dev_data = concat_data(train_data, dev_data), None
    model, tokenizer = load_model_and_tokenizer(cfg, train_data)
    check_max_length(model.config, cfg.max_length)

    run_dir = new_run_dir(cfg)
    checkpoint = list_checkpoints(run_dir)[-1] if resume and list_checkpoints(run_dir) else None
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.json")
    accelerator.print(f"run folder: {run_dir}  device: {accelerator.device}  processes: "
                      f"{accelerator.num_processes}  precision: {accelerator.mixed_precision}")
    if resume and checkpoint is None:
        accelerator.print(f"no checkpoint in {run_dir / 'checkpoints'} yet: starting from the beginning")
    if cfg.final_fit:
        accelerator.print(f"final_fit: training on train + dev ({len(train_data.questions)} questions). "
                          f"There is NO dev evaluation in this run: its dev scores cannot be measured. "
                          f"Choose the recipe on a normal run first.")
        if accelerator.is_main_process and checkpoint is None:
            log_metrics(run_dir, {"step": 0, "note": f"final_fit: trained on {cfg.train_file} + {cfg.dev_file}, "
                                                     f"no dev evaluation"})
    train_enc = encode(train_data, tokenizer, cfg.max_length, cfg.max_question_tokens, cfg.max_paragraph_tokens)
    dev_enc = (encode(dev_data, tokenizer, cfg.max_length, cfg.max_question_tokens, cfg.max_paragraph_tokens)
               if dev_data else None)
    n_windows = len(train_windows(train_enc, cfg.train_windows, cfg.doc_stride, random.Random(cfg.seed)))
    skipped = len(train_data.questions) - n_windows if cfg.train_windows != "all" else 0
    accelerator.print(f"train: {len(train_data.questions)} questions → {n_windows} windows per epoch "
                      f"(policy {cfg.train_windows}" + (f", {skipped} questions whose answer does not fit "
                                                         f"a window left out)" if skipped else ")"))

    if cfg.gradient_checkpointing:   # renamed in transformers 5; the old name goes in 6
        getattr(model, "activation_checkpointing_enable", model.gradient_checkpointing_enable)()
    model.to(accelerator.device)
    # the fused kernel updates all parameters at once: much faster for large embedding tables
    optimizer = torch.optim.AdamW(parameter_groups(model, cfg.weight_decay), lr=cfg.lr,
                                  fused=accelerator.device.type in ("cpu", "cuda"))
    batches_per_epoch = math.ceil(n_windows / cfg.batch_size)
    steps_per_epoch = math.ceil(batches_per_epoch / cfg.grad_accum)
    total_steps = steps_per_epoch * cfg.epochs
    warmup_steps = int(cfg.warmup_ratio * total_steps)
    if cfg.lr_schedule == "linear":
        scheduler = get_linear_schedule_with_warmup(optimizer, warmup_steps, total_steps)
    else:
        scheduler = get_constant_schedule_with_warmup(optimizer, warmup_steps)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    collate = DataCollatorWithPadding(tokenizer, pad_to_multiple_of=8)

    # everything the loop carries from step to step; saved in each checkpoint
    state = {"step": 0, "epoch": 0, "batches_done": 0, "best_em": -1.0, "skipped_in_a_row": 0,
             "running_loss": 0.0, "running_n": 0}
    if checkpoint is not None:
        accelerator.load_state(str(checkpoint))
        state = json.loads((checkpoint / "trainer_state.json").read_text(encoding="utf-8"))
        if accelerator.is_main_process:
            truncate_metrics(run_dir, state["step"])
        accelerator.print(f"resumed from {checkpoint} (step {state['step']} of {total_steps}, epoch "
                          f"{state['epoch'] + 1}, {state['batches_done']} batches into it)")
        if state["epoch"] >= cfg.epochs:
            accelerator.print(f"this run had already finished its {cfg.epochs} epochs: nothing to train")

    def evaluate_and_keep_best(epoch: float) -> None:
        if dev_data is None:
            return
        predictions = predict_encoded(accelerator.unwrap_model(model), tokenizer, dev_enc, cfg, accelerator, desc="dev")
        scores = score([p.answer for p in predictions], [q.answer_text for q in dev_data.questions])
        improved = scores["em"] > state["best_em"]
        accelerator.print(f"step {state['step']} (epoch {epoch:.2f}): dev EM {scores['em']:.4f} F1 {scores['f1']:.4f}"
                          + ("  (best so far, saved)" if improved else ""))
        if accelerator.is_main_process:
            log_metrics(run_dir, {"step": state["step"], "epoch": round(epoch, 4), "dev_em": scores["em"],
                                  "dev_f1": scores["f1"]})
            if improved:
                save_model(accelerator.unwrap_model(model), tokenizer, cfg, run_dir / "model")
        state["best_em"] = max(state["best_em"], scores["em"])

    def checkpoint_now() -> None:
        # never during a streak of skipped steps or with non-finite weights: the last checkpoint stays a good one
        if cfg.keep_checkpoints == 0 or state["skipped_in_a_row"]:
            return
        finite = torch.tensor(float(all(bool(torch.isfinite(p).all()) for p in model.parameters())),
                              device=accelerator.device)
        if accelerator.reduce(finite, "min").item() == 1.0:
            save_checkpoint(accelerator, run_dir, state, cfg.keep_checkpoints)
        else:
            accelerator.print(f"step {state['step']}: the weights are no longer finite; no checkpoint saved")

    progress = tqdm(total=total_steps, initial=state["step"], desc="train", unit="step",
                    disable=not accelerator.is_local_main_process)
    model.train()
    try:
        for epoch in range(state["epoch"], cfg.epochs):
            # the epoch's windows and order depend on (seed, epoch) only, so a resumed run sees the same batches
            windows = train_windows(train_enc, cfg.train_windows, cfg.doc_stride, random.Random(cfg.seed * 1000 + epoch))
            # an own generator: iterating a DataLoader without one draws from the global RNG (dropout's)
            generator = torch.Generator().manual_seed(cfg.seed + epoch)
            if cfg.group_by_length:
                batches = length_grouped_batches([len(w.input_ids) for w in windows], cfg.batch_size,
                                                 random.Random(cfg.seed + epoch))
                loader = DataLoader(features(windows, with_labels=True), batch_sampler=batches, collate_fn=collate,
                                    generator=generator)
            else:
                loader = DataLoader(features(windows, with_labels=True), batch_size=cfg.batch_size, shuffle=True,
                                    collate_fn=collate, generator=generator)
            loader = accelerator.prepare(loader)
            n_batches, first = len(loader), state["batches_done"]
            if first:
                loader = accelerator.skip_first_batches(loader, first)
            for batch_index, batch in enumerate(loader, start=first):
                with accelerator.accumulate(model):
                    loss = model(**batch).loss
                    finite = bool(torch.isfinite(loss))
                    if finite:       # a NaN/inf loss is not learned from: its step is skipped
                        accelerator.backward(loss)
                        if accelerator.sync_gradients and cfg.max_grad_norm > 0:
                            accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
                        optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad()
                if finite:
                    state["running_loss"] += loss.item()
                    state["running_n"] += 1
                if not accelerator.sync_gradients:
                    continue
                state["step"] += 1
                state["batches_done"] = batch_index + 1
                step = state["step"]
                # fp16: the GradScaler skips steps whose gradients overflowed; many in a row means divergence
                skipped = not finite or optimizer.step_was_skipped
                state["skipped_in_a_row"] = state["skipped_in_a_row"] + 1 if skipped else 0
                if state["skipped_in_a_row"] >= cfg.max_skipped_steps:
                    raise TrainingError(
                        f"{state['skipped_in_a_row']} optimizer steps in a row had a non-finite loss or gradients "
                        f"(step {step}). The learning rate may be too high (lr={cfg.lr}); with fp16, try "
                        f"mixed_precision=bf16 (newer GPUs) or no, a lower lr, or max_grad_norm=1. "
                        f"The best model so far is in {run_dir / 'model'}; the last good checkpoint "
                        f"in {run_dir / 'checkpoints'}.")
                lr = scheduler.get_last_lr()[0]
                progress.update(1)
                progress.set_postfix(loss=f"{state['running_loss'] / max(state['running_n'], 1):.3f}", lr=f"{lr:.2e}")
                epoch_position = epoch + (batch_index + 1) / n_batches
                if step % cfg.log_every == 0 or step == total_steps:
                    # the mean loss over all processes' parts of the batches since the last record
                    loss_sum, n = accelerator.reduce(torch.tensor([state["running_loss"], state["running_n"]],
                                                                  dtype=torch.float64, device=accelerator.device),
                                                     "sum").tolist()
                    if n and accelerator.is_main_process:
                        log_metrics(run_dir, {"step": step, "epoch": round(epoch_position, 4),
                                              "loss": loss_sum / n, "lr": lr})
                    state["running_loss"], state["running_n"] = 0.0, 0
                if cfg.eval_every and step % cfg.eval_every == 0:
                    evaluate_and_keep_best(epoch_position)
                if cfg.save_every and step % cfg.save_every == 0 and batch_index + 1 < n_batches:
                    checkpoint_now()
            if not (cfg.eval_every and state["step"] % cfg.eval_every == 0) and (
                    not cfg.eval_every or epoch == cfg.epochs - 1):
                evaluate_and_keep_best(epoch + 1.0)
            if dev_data is None and accelerator.is_main_process:
                save_model(accelerator.unwrap_model(model), tokenizer, cfg, run_dir / "model")
            state["epoch"], state["batches_done"] = epoch + 1, 0
            checkpoint_now()
    except torch.cuda.OutOfMemoryError as e:
        raise TrainingError(
            f"GPU out of memory ({str(e).splitlines()[0]}). Lower batch_size (now {cfg.batch_size}) and raise "
            f"grad_accum (now {cfg.grad_accum}) by the same factor, lower max_length (now {cfg.max_length}), "
            f"or set gradient_checkpointing=true. The best model so far is in {run_dir / 'model'}.") from None
    except KeyboardInterrupt:
        last = list_checkpoints(run_dir)
        accelerator.print(f"\ninterrupted at step {state['step']}. " + (
            f"Continue from {last[-1].name}: python -m hw7qa train --resume {run_dir}" if last else
            "No checkpoint was saved yet (save_every, keep_checkpoints)."))
        raise
    finally:
        progress.close()
    accelerator.wait_for_everyone()
    accelerator.print(f"best model: {run_dir / 'model'}" + (f" (dev EM {state['best_em']:.4f})" if dev_data else
                                                           " (no dev file: the last epoch's model)"))
    return run_dir

"""Fine-tune a model for extractive QA: the Accelerator training loop.

Follows accelerate's ``nlp_example.py``: ``Accelerator(mixed_precision=..., gradient_accumulation_steps=...)``,
``accelerator.accumulate``, ``accelerator.backward``; ``torch.optim.AdamW`` without weight decay on
biases and LayerNorm weights; ``get_linear_schedule_with_warmup``; gradient clipping; dynamic
padding to a multiple of 8. Dev EM/F1 at every epoch end, or every ``eval_every`` optimizer steps and at the end;
the best model (safetensors) and its tokenizer go to ``<run>/model``; loss, lr and dev scores are
appended to ``<run>/metrics.jsonl``.
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
from accelerate.utils import set_seed
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import (AutoModelForQuestionAnswering, DataCollatorWithPadding,
                          get_constant_schedule_with_warmup, get_linear_schedule_with_warmup)

from . import tiny
from .config import TINY_MODEL, Config, save_config
from .data import QAData, load_qa_file
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


def parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only: biases and LayerNorm weights (1-D parameters) get none."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def length_grouped_batches(lengths: list[int], batch_size: int, rng: random.Random, chunk_batches: int = 50
                           ) -> list[list[int]]:
    """Batches of window indices of similar length, in random order (less padding, same randomness
    in which windows meet): shuffle, sort each chunk of ``chunk_batches`` batches by length, cut
    into batches, shuffle the batches."""
    order = list(range(len(lengths)))
    rng.shuffle(order)
    chunk, batches = batch_size * chunk_batches, []
    for c in range(0, len(order), chunk):
        part = sorted(order[c:c + chunk], key=lambda i: lengths[i], reverse=True)
        batches += [part[b:b + batch_size] for b in range(0, len(part), batch_size)]
    rng.shuffle(batches)
    return batches


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


def train(cfg: Config) -> Path:
    """Train with ``cfg``; returns the run folder, holding config.json, metrics.jsonl and model/."""
    set_seed(cfg.seed)
    accelerator = Accelerator(mixed_precision=resolve_precision(cfg.mixed_precision),
                              gradient_accumulation_steps=cfg.grad_accum)
    run_dir = new_run_dir(cfg)
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.json")
    accelerator.print(f"run folder: {run_dir}  device: {accelerator.device}  "
                      f"precision: {accelerator.mixed_precision}")

    train_data = load_qa_file(cfg.train_file, need_answers=True)
    dev_data = load_qa_file(cfg.dev_file, need_answers=True) if cfg.dev_file else None
    model, tokenizer = load_model_and_tokenizer(cfg, train_data)
    train_enc = encode(train_data, tokenizer, cfg.max_length, cfg.max_question_tokens, cfg.max_paragraph_tokens)
    dev_enc = (encode(dev_data, tokenizer, cfg.max_length, cfg.max_question_tokens, cfg.max_paragraph_tokens)
               if dev_data else None)
    rng = random.Random(cfg.seed)
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
    batches_per_epoch = math.ceil(n_windows / (cfg.batch_size * accelerator.num_processes))
    steps_per_epoch = math.ceil(batches_per_epoch / cfg.grad_accum)
    total_steps = steps_per_epoch * cfg.epochs
    warmup_steps = int(cfg.warmup_ratio * total_steps)
    # an AcceleratedScheduler steps once per process for every optimizer step
    if cfg.lr_schedule == "linear":
        scheduler = get_linear_schedule_with_warmup(optimizer, warmup_steps * accelerator.num_processes,
                                                    total_steps * accelerator.num_processes)
    else:
        scheduler = get_constant_schedule_with_warmup(optimizer, warmup_steps * accelerator.num_processes)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    collate = DataCollatorWithPadding(tokenizer, pad_to_multiple_of=8)

    step, best_em, running_loss, running_n = 0, -1.0, 0.0, 0

    def evaluate_and_keep_best(epoch: float) -> None:
        nonlocal best_em
        if dev_data is None:
            return
        predictions = predict_encoded(model, tokenizer, dev_enc, cfg, accelerator, desc="dev")
        scores = score([p.answer for p in predictions], [q.answer_text for q in dev_data.questions])
        improved = scores["em"] > best_em
        accelerator.print(f"step {step} (epoch {epoch:.2f}): dev EM {scores['em']:.4f} F1 {scores['f1']:.4f}"
                          + ("  (best so far, saved)" if improved else ""))
        if accelerator.is_main_process:
            log_metrics(run_dir, {"step": step, "epoch": round(epoch, 4), "dev_em": scores["em"],
                                  "dev_f1": scores["f1"]})
            if improved:
                save_model(accelerator.unwrap_model(model), tokenizer, cfg, run_dir / "model")
        best_em = max(best_em, scores["em"])

    progress = tqdm(total=total_steps, desc="train", unit="step", disable=not accelerator.is_local_main_process)
    skipped_in_a_row = 0
    model.train()
    try:
        for epoch in range(cfg.epochs):
            windows = train_windows(train_enc, cfg.train_windows, cfg.doc_stride, rng)
            if cfg.group_by_length:
                batches = length_grouped_batches([len(w.input_ids) for w in windows], cfg.batch_size,
                                                 random.Random(cfg.seed + epoch))
                loader = DataLoader(features(windows, with_labels=True), batch_sampler=batches, collate_fn=collate)
            else:
                loader = DataLoader(features(windows, with_labels=True), batch_size=cfg.batch_size, shuffle=True,
                                    collate_fn=collate, generator=torch.Generator().manual_seed(cfg.seed + epoch))
            loader = accelerator.prepare(loader)
            for batch_index, batch in enumerate(loader):
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
                    running_loss += loss.item()
                    running_n += 1
                if not accelerator.sync_gradients:
                    continue
                step += 1
                # fp16: the GradScaler skips steps whose gradients overflowed; many in a row means divergence
                skipped = not finite or optimizer.step_was_skipped
                skipped_in_a_row = skipped_in_a_row + 1 if skipped else 0
                if skipped_in_a_row >= cfg.max_skipped_steps:
                    raise TrainingError(
                        f"{skipped_in_a_row} optimizer steps in a row had a non-finite loss or gradients "
                        f"(step {step}). The learning rate may be too high (lr={cfg.lr}); with fp16, try "
                        f"mixed_precision=bf16 (newer GPUs) or no, a lower lr, or max_grad_norm=1. "
                        f"The best model so far is in {run_dir / 'model'}.")
                lr = scheduler.get_last_lr()[0]
                progress.update(1)
                progress.set_postfix(loss=f"{running_loss / max(running_n, 1):.3f}", lr=f"{lr:.2e}")
                if (step % cfg.log_every == 0 or step == total_steps) and running_n:
                    if accelerator.is_main_process:
                        log_metrics(run_dir, {"step": step, "epoch": round(epoch + (batch_index + 1) / len(loader), 4),
                                              "loss": running_loss / running_n, "lr": lr})
                    running_loss, running_n = 0.0, 0
                if cfg.eval_every and step % cfg.eval_every == 0:
                    evaluate_and_keep_best(epoch + (batch_index + 1) / len(loader))
            last_epoch = epoch == cfg.epochs - 1
            if (not cfg.eval_every or last_epoch) and not (cfg.eval_every and step % cfg.eval_every == 0):
                evaluate_and_keep_best(epoch + 1.0)
            if dev_data is None and accelerator.is_main_process:
                save_model(accelerator.unwrap_model(model), tokenizer, cfg, run_dir / "model")
    except torch.cuda.OutOfMemoryError as e:
        raise TrainingError(
            f"GPU out of memory ({str(e).splitlines()[0]}). Lower batch_size (now {cfg.batch_size}) and raise "
            f"grad_accum (now {cfg.grad_accum}) by the same factor, lower max_length (now {cfg.max_length}), "
            f"or set gradient_checkpointing=true. The best model so far is in {run_dir / 'model'}.") from None
    finally:
        progress.close()
    accelerator.wait_for_everyone()
    accelerator.print(f"best model: {run_dir / 'model'}" + (f" (dev EM {best_em:.4f})" if dev_data else
                                                           " (no dev file: the last epoch's model)"))
    return run_dir

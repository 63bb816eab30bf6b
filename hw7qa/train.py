"""Fine-tune a model for extractive QA: the Accelerator training loop.

Read it top to bottom: what a model is loaded as, the optimizer and schedule, the batches of an
epoch, the run folder and its checkpoints, the policies (when to log, evaluate, save), the state
that a checkpoint holds, and the loop (``train`` → ``fit`` → ``run_epoch`` → ``train_step`` and
``after_step``). It follows accelerate's ``complete_nlp_example.py``: ``Accelerator(mixed_precision,
gradient_accumulation_steps)``, ``accelerator.accumulate``, ``accelerator.backward``,
``save_state``/``load_state``.

Promises kept here, each tested:

- ``train()`` can be called any number of times in one process with any settings: each call gets a
  fresh ``Accelerator`` (``devices.accelerator_for``) and leaves no state behind.
- ``batch_size`` is the number of windows per forward pass *in total*: with several processes
  (``accelerate launch``) each gets ``batch_size / num_processes`` of every batch (``split_batches``).
- The host waits for the GPU only at logging, evaluation and checkpoints: a micro-batch's loss is
  accumulated on the device, and a non-finite loss or gradient skips the optimizer step on the device
  (every process sees the same all-reduced gradients, so all skip it together; none waits for another).
- The run folder is decided on the main process and shared; a new run never reuses an old run's folder.
- Checkpoints (model, optimizer, scheduler, GradScaler, RNG states and ``trainer_state.json``) go to
  ``<run>/checkpoints/step-NNNNNNN`` every ``save_every`` steps and at each epoch end, written under a
  ``.partial`` name and renamed when complete. ``train(cfg, resume=True)`` continues from the newest
  one, mid-epoch included, and ends with the same weights and metrics as an uninterrupted run.

The opt-in techniques of ``techniques.py`` hook in at four places, each off by default: the
optimizer's parameter groups (``layer_lr_decay``), a second backward pass in ``train_step``
(``fgm_epsilon``), the moving average after each step, evaluated and saved instead of the trained
weights (``ema_decay``, ``Run.kept_model``), and ``max_answer_length`` set in ``load_inputs``
(``answer_length_quantile``).
"""
from __future__ import annotations

import dataclasses
import json
import math
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from accelerate.utils import set_seed
from tqdm.auto import tqdm

from . import tiny
from .config import TINY_MODEL, Config, TrainingError, check_resume, load_config, read_json, save_config
from .data import QAData, concat_data, load_qa_file
from .decode import predict_encoded
from .devices import accelerator_for, check_divisible, check_tracker, processes
from .metrics import score
from .techniques import WeightAverage, adversarial_backward, answer_length_from, layer_parameter_groups
from .windows import Encoded, Windows, encode, load_tokenizer, padding_of, train_windows


# ---------------------------------------------------------------- model and tokenizer

def looks_like_path(name: str) -> bool:
    """Hub names are ``name`` or ``owner/name``; anything else is meant as a folder."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name


def from_pretrained(what: str, load, name_or_dir: str):
    """``load(name_or_dir)``, or a ValueError that says in one sentence why it failed."""
    folder = Path(name_or_dir).expanduser()
    if not folder.exists() and looks_like_path(name_or_dir):
        raise ValueError(f"model_name={name_or_dir!r}: no such folder")
    try:
        return load(str(folder) if folder.exists() else name_or_dir)
    except Exception as e:  # transformers raises OSError, ValueError or safetensors' own errors here
        where = f"the folder {folder}" if folder.exists() else f"{name_or_dir!r} (not a local folder; from the hub)"
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ValueError(f"cannot load the {what} of {where}: {reason}") from e


def load_model(name_or_dir: str):
    """``AutoModelForQuestionAnswering`` in float32 whatever dtype its files hold.

    transformers 5 loads weights in the checkpoint's dtype; a model stored in fp16 would then be
    trained in fp16 (AdamW on fp16 weights: the loss moves in steps of 1/256 and stalls). Mixed
    precision casts per operation; the weights the optimizer updates stay fp32.
    """
    import transformers
    # ``dtype`` since transformers 4.56; ``torch_dtype`` before (and deprecated after)
    new = tuple(int(part) for part in transformers.__version__.split(".")[:2]) >= (4, 56)
    dtype = {"dtype" if new else "torch_dtype": torch.float32}
    return from_pretrained("model", lambda name: transformers.AutoModelForQuestionAnswering.from_pretrained(
        name, **dtype), name_or_dir)


def load_tokenizer_for(cfg: Config, train_data: QAData | None = None):
    """The run's tokenizer: ``cfg.model_name``'s, or for ``tiny-random-bert`` one built from the
    characters of the training file (``train_data``)."""
    if cfg.model_name == TINY_MODEL:
        texts = train_data.paragraphs + [q.question_text for q in train_data.questions]
        return tiny.build_tiny_tokenizer(texts, isolate_digits=cfg.isolate_digits)
    return from_pretrained("tokenizer", lambda name: load_tokenizer(name, cfg.isolate_digits, cfg.isolate_cjk),
                           cfg.model_name)


def load_model_and_tokenizer(cfg: Config, train_data: QAData | None = None):
    """Model and fast tokenizer from a hub name or a local folder; ``tiny-random-bert`` builds a tiny
    random BERT whose vocabulary is the characters of the training file (demo and tests)."""
    if cfg.model_name == TINY_MODEL:
        tokenizer = load_tokenizer_for(cfg, train_data)
        return tiny.build_tiny_model(len(tokenizer), seed=cfg.seed), tokenizer
    return load_model(cfg.model_name), load_tokenizer_for(cfg, train_data)


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


# ---------------------------------------------------------------- optimizer and schedule

def parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only: biases and LayerNorm weights (1-D parameters) get none."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(model: torch.nn.Module, cfg: Config, device: torch.device) -> torch.optim.AdamW:
    # the fused kernel updates all parameters at once (much faster for large embedding tables) and
    # can skip a step on the device (``step_unless``)
    groups = (layer_parameter_groups(model, cfg.lr, cfg.weight_decay, cfg.layer_lr_decay)
              if cfg.layer_lr_decay < 1 else parameter_groups(model, cfg.weight_decay))
    return torch.optim.AdamW(groups, lr=cfg.lr, fused=device.type in ("cpu", "cuda"))


def make_scheduler(optimizer, cfg: Config, total_steps: int):
    """``transformers.get_scheduler`` with ``warmup_ratio`` of the steps warming up; the project's
    ``constant`` warms up too (``constant_with_warmup``)."""
    from transformers import get_scheduler
    name = "constant_with_warmup" if cfg.lr_schedule == "constant" else cfg.lr_schedule
    return get_scheduler(name, optimizer, num_warmup_steps=int(cfg.warmup_ratio * total_steps),
                         num_training_steps=total_steps)


def step_unless(optimizer, skip: torch.Tensor) -> None:
    """``optimizer.step()`` unless ``skip`` (a 0-dim bool tensor), deciding on the device.

    fp16: the GradScaler skips steps with non-finite gradients by itself. A fused AdamW takes
    ``found_inf`` and leaves weights, moments and step count alone when it is 1. Any other optimizer
    has to ask the host.
    """
    inner = optimizer.optimizer
    if optimizer.scaler is not None:
        optimizer.step()
    elif inner.defaults.get("fused"):
        inner.found_inf = skip.float()
        try:
            optimizer.step()
        finally:
            del inner.found_inf
    elif not bool(skip):
        optimizer.step()


# ---------------------------------------------------------------- the batches of an epoch

def epoch_rng(seed: int, epoch: int, purpose: str) -> random.Random:
    """A random stream for one (seed, epoch, purpose): no two pairs share one (seed 1 in epoch 0
    and seed 0 in epoch 1 differ), and a resumed run draws exactly what it drew before."""
    return random.Random(f"hw7qa:{seed}:{epoch}:{purpose}")


def shuffled_batches(n: int, batch_size: int, rng: random.Random) -> list[list[int]]:
    """``range(n)`` shuffled and cut into batches; only the last may be short."""
    order = list(range(n))
    rng.shuffle(order)
    return [order[b:b + batch_size] for b in range(0, n, batch_size)]


def length_grouped_batches(lengths: list[int], batch_size: int, rng: random.Random, chunk_batches: int = 50
                           ) -> list[list[int]]:
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
    return batches + short


class EpochWindows(Dataset):
    """The labelled training windows of one epoch (a ``Windows`` table); ``start_epoch`` draws the
    next epoch's (policy ``random`` places each window anew). One object for the whole run, so the
    DataLoader around it is built and prepared once.

    An item is just its row number: ``collate`` gathers a whole batch from the table's arrays at
    once (``Windows.model_inputs``), the same tensors ``DataCollatorWithPadding(pad_to_multiple_of=8)``
    makes from per-window lists, at a fraction of the host time per step.

    Not ``set_epoch``: accelerate's DataLoaderShard calls a ``set_epoch`` of the dataset and batch
    sampler with its own count of iterations, which restarts at 0 in a resumed run."""

    def __init__(self, enc: Encoded, policy: str, seed: int, padding: dict):
        self.enc, self.policy, self.seed, self.padding = enc, policy, seed, padding
        self.windows: Windows | None = None

    def start_epoch(self, epoch: int) -> None:
        self.windows = train_windows(self.enc, self.policy, epoch_rng(self.seed, epoch, "windows"))

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, i: int) -> int:
        return i

    def collate(self, rows: list[int]) -> dict[str, torch.Tensor]:
        """Windows ``rows`` of this epoch, padded, with their answer positions, as int64 tensors."""
        rows = np.asarray(rows, dtype=np.int64)
        batch = self.windows.model_inputs(rows, **self.padding)
        batch["start_positions"] = self.windows.start_position[rows]
        batch["end_positions"] = self.windows.end_position[rows]
        return {key: torch.from_numpy(value) for key, value in batch.items()}


class EpochBatches:
    """The DataLoader's ``batch_sampler``: the batches of the current epoch (shuffled, or grouped by
    length), from batch ``skip`` on. ``batch_size`` is what accelerate splits between processes.

    With several processes a short last batch is completed with the epoch's first windows, as
    accelerate's ``even_batches`` would do; done here, a resumed run that skips the first batches
    completes it with the same windows."""

    def __init__(self, dataset: EpochWindows, batch_size: int, group_by_length: bool, seed: int,
                 num_processes: int = 1):
        self.dataset, self.batch_size, self.group_by_length, self.seed = dataset, batch_size, group_by_length, seed
        self.num_processes = num_processes
        self.batches: list[list[int]] = []
        self.skip = 0

    def start_epoch(self, epoch: int, skip: int = 0) -> None:
        rng = epoch_rng(self.seed, epoch, "batches")
        if self.group_by_length:
            lengths = self.dataset.windows.length.tolist()
            self.batches = length_grouped_batches(lengths, self.batch_size, rng)
        else:
            self.batches = shuffled_batches(len(self.dataset), self.batch_size, rng)
        if self.num_processes > 1 and len(self.batches[-1]) < self.batch_size:
            filler = self.batches[0] * self.batch_size
            self.batches[-1] = (self.batches[-1] + filler)[:self.batch_size]
        self.skip = skip

    def __iter__(self):
        return iter(self.batches[self.skip:])

    def __len__(self) -> int:
        return len(self.batches) - self.skip


# ---------------------------------------------------------------- the micro-batch that fits

def micro_batches(batch_size: int, num_processes: int) -> list[int]:
    """``batch_size`` and its halves that still split evenly between processes, largest first: the
    micro-batches ``auto_batch`` tries. Halving (not accelerate's ``find_executable_batch_size``,
    which shrinks by 10 %) keeps ``batch_size × grad_accum``, the recipe's batch, exactly."""
    sizes = [batch_size]
    while sizes[-1] % (2 * num_processes) == 0:
        sizes.append(sizes[-1] // 2)
    return sizes


def step_fits(model, batch: dict, accelerator, reserve_bytes: int) -> bool:
    """Whether one forward and backward pass of ``batch`` fits in memory while ``reserve_bytes`` stay
    taken (the optimizer's moments, not allocated yet). Errors other than out-of-memory are raised."""
    from accelerate.utils.memory import release_memory, should_reduce_batch_size
    try:
        held = torch.empty(reserve_bytes, dtype=torch.uint8, device=accelerator.device)
        with accelerator.autocast():
            model(**batch).loss.backward()
        del held
        return True
    except Exception as e:
        if not should_reduce_batch_size(e):
            raise
        return False
    finally:
        model.zero_grad(set_to_none=True)
        release_memory()    # collects garbage and empties the device's cache


def fit_micro_batch(cfg: Config, model, dataset: EpochWindows, accelerator) -> int:
    """The largest of ``micro_batches`` whose step over the longest training windows fits in memory
    on every process: the model, its gradients, the activations, AdamW's two fp32 moments and the
    moving average of ``ema_decay``."""
    longest = np.argsort(-dataset.windows.length, kind="stable")
    copies = 2 + (cfg.ema_decay > 0)                 # AdamW's two moments, the moving average's weights
    reserve = copies * 4 * sum(p.numel() for p in model.parameters())
    model.to(accelerator.device).train()
    cuda = [accelerator.device.index or 0] if accelerator.device.type == "cuda" else []
    fits = 0
    with torch.random.fork_rng(devices=cuda):        # probing draws no dropout mask of the real run
        for size in micro_batches(cfg.batch_size, accelerator.num_processes):
            share = dataset.collate([longest[i % len(longest)] for i in range(size // accelerator.num_processes)])
            if step_fits(model, {k: v.to(accelerator.device) for k, v in share.items()}, accelerator, reserve):
                fits = size
                break
    agreed = min(accelerator.gather(torch.tensor([fits], device=accelerator.device)).tolist())
    if agreed == 0:
        raise TrainingError(f"not even {micro_batches(cfg.batch_size, accelerator.num_processes)[-1]} windows of "
                            f"up to {cfg.max_length} tokens per forward pass fit in memory: lower max_length or "
                            f"set gradient_checkpointing=true")
    return agreed


def choose_batches(cfg: Config, model, dataset: EpochWindows, accelerator, saved: TrainState | None
                   ) -> tuple[int, int]:
    """``(micro-batch, grad_accum)``: the checkpoint's when resuming (the same batches again), else
    ``fit_micro_batch``'s with ``auto_batch``, else the config's."""
    if saved is not None and saved.micro_batch:
        return saved.micro_batch, saved.grad_accum
    if not cfg.auto_batch:
        return cfg.batch_size, cfg.grad_accum
    micro = fit_micro_batch(cfg, model, dataset, accelerator)
    grad_accum = cfg.grad_accum * cfg.batch_size // micro
    if micro < cfg.batch_size:
        accelerator.print(f"auto_batch: {cfg.batch_size} windows per forward pass do not fit in memory; "
                          f"{micro} × grad_accum {grad_accum} instead (the same {cfg.batch_size * cfg.grad_accum} "
                          f"windows per optimizer step)")
    return micro, grad_accum


# ---------------------------------------------------------------- the run folder

def new_run_dir(cfg: Config) -> Path:
    if cfg.output_dir:
        return Path(cfg.output_dir)
    name = Path(cfg.model_name.rstrip("/")).name.replace("/", "_")
    return Path("outputs") / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first (``.partial`` folders are unfinished saves)."""
    root = Path(run_dir) / "checkpoints"
    found = [d for d in root.glob("step-*") if d.is_dir() and not d.name.endswith(".partial")
             and (d / "trainer_state.json").exists()]
    return sorted(found, key=lambda d: int(d.name.split("-")[1]))


def clear_folder(folder: Path) -> None:
    for item in folder.iterdir():
        shutil.rmtree(item) if item.is_dir() else item.unlink()


def prepare_run_dir(cfg: Config, resume: bool, overwrite: bool) -> tuple[Path, Path | None]:
    """The run folder, ready for this run, and the checkpoint to continue from (None: from the start).

    A new run goes only into a new or empty folder, or, with ``overwrite``, into an old run's folder
    that it empties first. A resume checks that ``cfg`` continues the run (``check_resume``); with no
    checkpoint yet it starts again and drops the records of the attempt it replaces, so the folder's
    files always describe one run. Writes ``config.json``. Main process only.
    """
    if resume and not cfg.output_dir:
        raise ValueError("resume needs the run folder (output_dir)")
    run_dir = new_run_dir(cfg)
    is_run = (run_dir / "config.json").is_file()
    if resume and is_run:
        check_resume(load_config(run_dir / "config.json"), cfg, run_dir)
    elif run_dir.is_dir() and any(run_dir.iterdir()):
        if not is_run:
            raise ValueError(f"output_dir {run_dir} is not empty and holds no run: choose a new or empty folder")
        if not overwrite:
            raise ValueError(f"{run_dir} already holds a run. Continue it with: python -m hw7qa train --resume "
                             f"{run_dir} (notebook: RESUME = True); start it over, deleting it, with --overwrite "
                             f"(notebook: OVERWRITE = True); or choose another output_dir")
        clear_folder(run_dir)
    for unfinished in run_dir.glob("checkpoints/*.partial"):    # saves cut off by a kill
        shutil.rmtree(unfinished, ignore_errors=True)
    checkpoint = (list_checkpoints(run_dir) or [None])[-1] if resume else None
    if resume and checkpoint is None and run_dir.is_dir():
        clear_folder(run_dir)                  # an attempt killed before its first checkpoint
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir / "config.json")
    if checkpoint is not None:
        truncate_metrics(run_dir, read_trainer_state(checkpoint).step)
    return run_dir, checkpoint


def decided_on_main(accelerator, decide):
    """``decide()`` run by the main process alone; its result, or its error, reaches every process
    (a process that decided by itself could pick another folder, or wait forever for one that failed)."""
    result, error = None, None
    if accelerator.is_main_process:
        try:
            result = decide()
        except (ValueError, OSError) as e:
            if accelerator.num_processes == 1:
                raise
            error = e
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list
        shared = broadcast_object_list([result, None if error is None else str(error)])
        if error is not None:
            raise error
        if shared[1] is not None:
            raise ValueError(shared[1])
        result = shared[0]
    return result


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


def truncate_metrics(run_dir: Path, step: int) -> None:
    """Drop ``metrics.jsonl`` records after ``step``: the resumed run logs them again."""
    path = run_dir / "metrics.jsonl"
    if path.exists():
        records = [line for line in path.read_text(encoding="utf-8").splitlines()
                   if line.strip() and json.loads(line).get("step", 0) <= step]
        path.write_text("".join(line + "\n" for line in records), encoding="utf-8")


# ---------------------------------------------------------------- the state a checkpoint holds

@dataclass
class TrainState:
    """Everything the loop carries from step to step, saved in each checkpoint's trainer_state.json.

    No count of skipped steps: a checkpoint is never written during a streak of them."""
    step: int = 0                   # optimizer steps taken
    epoch: int = 0                  # the epoch in progress (== epochs when finished)
    batches_done: int = 0           # batches of that epoch already trained on
    best_em: float = -1.0           # dev scores of the model in <run>/model
    best_f1: float = -1.0
    running_loss: list = dataclasses.field(default_factory=list)   # per process: loss sum and count since the
    running_n: list = dataclasses.field(default_factory=list)      # last log record
    micro_batch: int = 0            # windows per forward pass and passes per step actually used (auto_batch);
    grad_accum: int = 0             # 0: a checkpoint from before auto_batch, the config's


def read_trainer_state(checkpoint: Path) -> TrainState:
    values = read_json(checkpoint / "trainer_state.json")
    for key in ("running_loss", "running_n"):      # one number in checkpoints of hw7qa before 0.2
        if not isinstance(values.get(key, []), list):
            values[key] = [values[key]]
    known = {f.name for f in dataclasses.fields(TrainState)}
    return TrainState(**{k: v for k, v in values.items() if k in known})


def save_checkpoint(accelerator, run_dir: Path, state: TrainState, keep: int) -> Path:
    """Everything needed to continue training, into ``<run>/checkpoints/step-NNNNNNN``.

    ``accelerator.save_state`` writes model, optimizer, scheduler, GradScaler and every process's RNG
    states; ``state`` goes to ``trainer_state.json``, written last. The folder is filled under a
    ``.partial`` name and renamed when complete, so an interruption never leaves a half-written
    checkpoint that looks complete. Checkpoints beyond the newest ``keep`` are deleted after that.
    Every process must call this.
    """
    final = run_dir / "checkpoints" / f"step-{state.step:07d}"
    partial = final.with_name(final.name + ".partial")
    if accelerator.is_main_process:
        shutil.rmtree(partial, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(partial))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        text = json.dumps(dataclasses.asdict(state), indent=1) + "\n"
        (partial / "trainer_state.json").write_text(text, encoding="utf-8")
        shutil.rmtree(final, ignore_errors=True)
        partial.rename(final)
        for old in list_checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


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
    if cfg.keep_checkpoints == 0:
        return False
    return bool(cfg.save_every and step % cfg.save_every == 0) or step % steps_per_epoch == 0


def is_better(scores: dict, state: TrainState) -> bool:
    """Higher dev EM wins; on equal EM, higher F1 (a tie keeps the earlier model)."""
    return (scores["em"], scores["f1"]) > (state.best_em, state.best_f1)


# ---------------------------------------------------------------- the loop

# accelerate's trackers: TensorBoard writes to <run>/tensorboard; Weights & Biases to the project hw7qa
TRACKER_PROJECT = {"tensorboard": "tensorboard", "wandb": "hw7qa"}

@dataclass
class Run:
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
    state: TrainState
    ema: WeightAverage | None       # ema_decay's moving average of the weights: evaluated and saved instead
    loss_sum: torch.Tensor = None   # float64 on the device: finite micro-batch losses since the last record
    loss_n: torch.Tensor = None     # and how many they were
    streak: torch.Tensor = None     # optimizer steps skipped in a row (the same on every process)

    @property
    def total_steps(self) -> int:
        return self.steps_per_epoch * self.cfg.epochs

    def kept_model(self) -> torch.nn.Module:
        """The weights that are evaluated and saved: the moving average with ``ema_decay``, else the
        trained ones."""
        return self.ema.model if self.ema is not None else self.accelerator.unwrap_model(self.model)


def train(cfg: Config, resume: bool = False, overwrite: bool = False) -> Path:
    """Train with ``cfg``; returns the run folder, holding config.json, metrics.jsonl and model/.

    ``resume=True`` continues the run in ``cfg.output_dir`` from its newest checkpoint (or starts it
    there if it has none yet); ``cfg`` may differ from the run's config only in ``FREE_ON_RESUME``.
    ``overwrite=True`` lets a new run replace the run in ``cfg.output_dir``; without it a new run
    refuses an existing one.
    """
    started = processes()             # the processes of accelerate launch (or this one): no Accelerator yet
    check_divisible(cfg, started.num_processes)
    check_tracker(cfg.log_with)
    set_seed(cfg.seed)                # the new QA head's weights and dropout: python, numpy, torch, cuda
    inputs = load_inputs(cfg)         # bad data, model or max_length stop the run before anything is written
    cfg = inputs.cfg                  # with max_answer_length from the training answers (answer_length_quantile)
    run_dir, checkpoint = decided_on_main(started, lambda: prepare_run_dir(cfg, resume, overwrite))
    with accelerator_for(cfg.mixed_precision, cfg.grad_accum, cfg.log_with, run_dir) as accelerator:
        run = start_run(cfg, accelerator, inputs, run_dir, checkpoint)
        fit(run)
        accelerator.wait_for_everyone()
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
    model: torch.nn.Module
    tokenizer: object


def load_inputs(cfg: Config) -> Inputs:
    """The data, model and tokenizer of ``cfg``, the training data tokenized, and ``cfg`` itself with
    ``max_answer_length`` set from the training answers when ``answer_length_quantile`` asks for it
    (that value is what config.json records, and what evaluate and predict use)."""
    train_data = load_qa_file(cfg.train_file, need_answers=True)
    dev_data = load_qa_file(cfg.dev_file, need_answers=True) if cfg.dev_file else None
    if cfg.final_fit:
        train_data, dev_data = concat_data(train_data, dev_data), None
    model, tokenizer = load_model_and_tokenizer(cfg, train_data)
    check_max_length(model.config, cfg.max_length)
    train_enc = encode(train_data, tokenizer, cfg.windows)
    if cfg.answer_length_quantile:
        cfg = dataclasses.replace(cfg, max_answer_length=answer_length_from(train_enc.answer_tokens,
                                                                            cfg.answer_length_quantile))
    return Inputs(cfg, train_data, train_enc, dev_data, model, tokenizer)


def start_run(cfg: Config, accelerator, inputs: Inputs, run_dir: Path, checkpoint: Path | None) -> Run:
    """The prepared model, optimizer, schedule and loader, and the state (from ``checkpoint`` if
    resuming); the tracker of ``log_with`` started."""
    accelerator.print(f"run folder: {run_dir}  device: {accelerator.device}  processes: "
                      f"{accelerator.num_processes}  precision: {accelerator.mixed_precision}")
    model, tokenizer = inputs.model, inputs.tokenizer
    dataset = EpochWindows(inputs.train_enc, cfg.train_windows, cfg.seed, padding_of(tokenizer))
    dataset.start_epoch(0)
    report_training_data(cfg, accelerator, run_dir, inputs.train_data, len(dataset), checkpoint)
    if cfg.gradient_checkpointing:   # renamed in transformers 5; the old name goes in 6
        enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
        enable()
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
    model, optimizer, scheduler, loader = accelerator.prepare(model, optimizer, scheduler, loader)
    if ema is not None:
        accelerator.register_for_checkpointing(ema)     # saved and restored with the checkpoints
    dev_enc = encode(inputs.dev_data, tokenizer, cfg.windows) if inputs.dev_data else None
    if cfg.log_with != "none":
        accelerator.init_trackers(TRACKER_PROJECT[cfg.log_with], config=dataclasses.asdict(cfg))
    state = dataclasses.replace(saved or TrainState(), micro_batch=micro_batch, grad_accum=grad_accum)
    run = Run(cfg, accelerator, run_dir, model, tokenizer, optimizer, scheduler, loader, dataset, batches,
              inputs.dev_data, dev_enc, steps_per_epoch, state, ema)
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
        if accelerator.is_main_process and checkpoint is None:
            log_metrics(run_dir, {"step": 0, "note": f"final_fit: trained on {cfg.train_file} + {cfg.dev_file}, "
                                                     f"no dev evaluation"})


def restore(run: Run, checkpoint: Path | None) -> None:
    """The device counters, from ``run.state`` (read from ``checkpoint``); the weights, optimizer,
    scheduler and RNG states of ``checkpoint`` if there is one."""
    device, rank = run.accelerator.device, run.accelerator.process_index
    run.loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    run.loss_n = torch.zeros((), dtype=torch.float64, device=device)
    run.streak = torch.zeros((), dtype=torch.int64, device=device)
    if checkpoint is None:
        return
    run.accelerator.load_state(str(checkpoint))
    if len(run.state.running_n) == run.accelerator.num_processes:   # else a new process count: all on process 0
        run.loss_sum += run.state.running_loss[rank]
        run.loss_n += run.state.running_n[rank]
    elif rank == 0:
        run.loss_sum += sum(run.state.running_loss)
        run.loss_n += sum(run.state.running_n)
    run.accelerator.print(f"resumed from {checkpoint} (step {run.state.step} of {run.total_steps}, epoch "
                          f"{run.state.epoch + 1}, {run.state.batches_done} batches into it)")
    if run.state.epoch >= run.cfg.epochs:
        run.accelerator.print(f"this run had already finished its {run.cfg.epochs} epochs: nothing to train")


def fit(run: Run) -> None:
    """The epochs, with a clear message instead of a traceback where the user can do something."""
    cfg, accelerator = run.cfg, run.accelerator
    progress = tqdm(total=run.total_steps, initial=run.state.step, desc="train", unit="step",
                    disable=not accelerator.is_local_main_process)
    run.model.train()
    try:
        for epoch in range(run.state.epoch, cfg.epochs):
            run_epoch(run, epoch, progress)
    except torch.cuda.OutOfMemoryError as e:
        raise TrainingError(
            f"GPU out of memory ({str(e).splitlines()[0]}). Set auto_batch=true, or lower batch_size (now "
            f"{run.state.micro_batch}) and raise grad_accum (now {run.state.grad_accum}) by the same factor, lower "
            f"max_length (now {cfg.max_length}), or set gradient_checkpointing=true.{what_is_kept(run)}") from None
    except KeyboardInterrupt:
        last = list_checkpoints(run.run_dir)
        accelerator.print(f"\ninterrupted at step {run.state.step}. " + (
            f"Continue from {last[-1].name}: python -m hw7qa train --resume {run.run_dir}" if last else
            "No checkpoint was saved yet (save_every, keep_checkpoints)."))
        raise
    finally:
        progress.close()


def run_epoch(run: Run, epoch: int, progress) -> None:
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


def train_step(run: Run, batch: dict) -> bool:
    """Forward and backward one micro-batch (twice with ``fgm_epsilon``: the second time with the
    embeddings perturbed); at the last of ``grad_accum``, clip, step and update the moving average
    of ``ema_decay``. Returns whether an optimizer step (taken or skipped) ended here. Nothing here
    waits for the device.

    Every process always runs backward: DDP all-reduces the gradients, so a NaN loss on one process
    makes every process's gradients non-finite, and all of them skip that step together.
    """
    accelerator, cfg = run.accelerator, run.cfg
    with accelerator.accumulate(run.model):
        loss = run.model(**batch).loss
        accelerator.backward(loss)
        if cfg.fgm_epsilon:
            embeddings = accelerator.unwrap_model(run.model).get_input_embeddings().weight
            adversarial_backward(run.model, embeddings, batch, cfg.fgm_epsilon, accelerator.backward)
        finite = torch.isfinite(loss.detach())
        run.loss_sum += torch.where(finite, loss.detach().double(), 0.0)
        run.loss_n += finite
        if accelerator.sync_gradients:
            norm = accelerator.clip_grad_norm_(run.model.parameters(), cfg.max_grad_norm or math.inf)
            skip = ~torch.isfinite(norm)
            step_unless(run.optimizer, skip)
            run.scheduler.step()
            if run.ema is not None:
                run.ema.update(run.state.step + 1)
            run.streak = torch.where(skip, run.streak + 1, 0)
        run.optimizer.zero_grad()
    return accelerator.sync_gradients


def after_step(run: Run, epoch_position: float) -> None:
    """Log, evaluate, save the model of a run without dev, checkpoint: each when its policy says."""
    step, cfg = run.state.step, run.cfg
    if log_due(step, run.total_steps, cfg):
        log(run, epoch_position)
    if run.dev_data is not None and evaluate_due(step, run.steps_per_epoch, run.total_steps, cfg):
        evaluate(run, epoch_position)
    if run.dev_data is None and run.state.batches_done == 0 and run.accelerator.is_main_process:
        save_model(run.kept_model(), run.tokenizer, cfg, run.run_dir / "model")
    if checkpoint_due(step, run.steps_per_epoch, cfg):
        checkpoint(run)


def stop_if_diverging(run: Run) -> int:
    """The current streak of skipped steps (a host sync); a TrainingError once it reaches
    ``max_skipped_steps``. Called where the host syncs anyway: at log records and checkpoints."""
    streak = int(run.streak)
    if streak >= run.cfg.max_skipped_steps:
        raise TrainingError(
            f"{streak} optimizer steps in a row had a non-finite loss or gradients (step {run.state.step}). "
            f"The learning rate may be too high (lr={run.cfg.lr}); with fp16, try mixed_precision=bf16 (newer "
            f"GPUs) or no, a lower lr, or max_grad_norm=1.{what_is_kept(run)}")
    return streak


def what_is_kept(run: Run) -> str:
    """A sentence naming the saved model and the last checkpoint of a stopped run, where they exist."""
    model, checkpoints = run.run_dir / "model", list_checkpoints(run.run_dir)
    return ((f" The best model so far is in {model}." if model.is_dir() else "") +
            (f" The last good checkpoint is {checkpoints[-1]}." if checkpoints else ""))


def log(run: Run, epoch_position: float) -> None:
    """One metrics.jsonl record: the mean loss over all processes' micro-batches since the last one."""
    stop_if_diverging(run)
    totals = run.accelerator.reduce(torch.stack([run.loss_sum, run.loss_n]), "sum")
    loss_sum, n = totals.tolist()
    lr = run.scheduler.get_last_lr()[0]
    if n and run.accelerator.is_main_process:
        log_metrics(run.run_dir, {"step": run.state.step, "epoch": round(epoch_position, 4), "loss": loss_sum / n,
                                  "lr": lr})
    if n:
        run.accelerator.log({"train/loss": loss_sum / n, "train/lr": lr}, step=run.state.step)
    run.loss_sum.zero_()
    run.loss_n.zero_()


def evaluate(run: Run, epoch_position: float) -> None:
    """Dev EM/F1 of the current weights; the model is saved to <run>/model when it is the best yet."""
    accelerator, state = run.accelerator, run.state
    model = run.kept_model()
    predictions = predict_encoded(model, run.tokenizer, run.dev_enc, run.cfg, accelerator, desc="dev")
    scores = score([p.answer for p in predictions], [q.answer_text for q in run.dev_data.questions])
    improved = is_better(scores, state)
    accelerator.print(f"step {state.step} (epoch {epoch_position:.2f}): dev EM {scores['em']:.4f} F1 "
                      f"{scores['f1']:.4f}" + ("  (best so far, saved)" if improved else ""))
    accelerator.log({"dev/em": scores["em"], "dev/f1": scores["f1"]}, step=state.step)
    if accelerator.is_main_process:
        log_metrics(run.run_dir, {"step": state.step, "epoch": round(epoch_position, 4), "dev_em": scores["em"],
                                  "dev_f1": scores["f1"]})
        if improved:
            save_model(model, run.tokenizer, run.cfg, run.run_dir / "model")
    if improved:
        state.best_em, state.best_f1 = scores["em"], scores["f1"]


def checkpoint(run: Run) -> None:
    """Save the training state, but never during a streak of skipped steps or with non-finite
    weights: the last checkpoint always stays a good one."""
    accelerator = run.accelerator
    if stop_if_diverging(run):
        return
    nonfinite = sum((~torch.isfinite(p)).sum() for p in run.model.parameters())
    if accelerator.reduce(nonfinite.to(accelerator.device), "sum").item():
        accelerator.print(f"step {run.state.step}: the weights are no longer finite; no checkpoint saved")
        return
    counters = accelerator.gather(torch.stack([run.loss_sum, run.loss_n]).unsqueeze(0)).tolist()
    run.state.running_loss = [c[0] for c in counters]
    run.state.running_n = [c[1] for c in counters]
    save_checkpoint(accelerator, run.run_dir, run.state, run.cfg.keep_checkpoints)

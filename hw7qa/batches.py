"""The batches of an epoch: the labelled training windows (``EpochWindows``), their order
(shuffled, or grouped by length: ``EpochBatches``), and the micro-batch that fits in memory
(``auto_batch``: ``choose_batches``).

Every random choice comes from ``epoch_rng(seed, epoch, purpose)``, so a resumed run draws exactly
the windows and batches it drew before.
"""
from __future__ import annotations

import random

import numpy as np
import torch
from torch.utils.data import Dataset

from .config import Config, TrainingError
from .devices import inference_autocast
from .runs import TrainState
from .windows import Encoded, Windows, train_windows


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
        # not accelerator.autocast(): before accelerate 1.11 an error inside it (the out-of-memory
        # error looked for here) left autocast on for the rest of the process
        with inference_autocast(accelerator.mixed_precision, accelerator.device):
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

"""The batches of an epoch: the labelled training windows (``EpochWindows``), their order (shuffled, or grouped
by length: ``EpochBatches``), and the micro-batch that fits in memory (``auto_batch``: ``choose_batches``).
Every random choice comes from ``epoch_rng``, so a resumed run draws exactly the windows and batches it drew.
"""
from __future__ import annotations

import random

import numpy as np
import torch
from torch.utils.data import Dataset

from .config import Config, TrainingError
from .models import inference_autocast
from .runfolder import TrainerState
from .windows import Encoded, Windows, train_windows


def epoch_rng(seed: int, epoch: int, purpose: str) -> random.Random:
    """A random stream of its own for each (seed, epoch, purpose), the same again in a resumed run."""
    return random.Random(f"hw7qa:{seed}:{epoch}:{purpose}")


def shuffled_batches(n: int, batch_size: int, rng: random.Random) -> list[list[int]]:
    """``range(n)`` shuffled and cut into batches; only the last may be short."""
    order = list(range(n))
    rng.shuffle(order)
    return [order[b:b + batch_size] for b in range(0, n, batch_size)]


def length_grouped_batches(lengths: list[int], batch_size: int, rng: random.Random, chunk_batches: int = 50
                           ) -> list[list[int]]:
    """Batches of window indices of similar length (less padding), in random order: each chunk of ``chunk_batches``
    batches of a shuffle is sorted by length. All are full but perhaps the last, which stays last."""
    order = list(range(len(lengths)))
    rng.shuffle(order)
    chunk, batches = batch_size * chunk_batches, []
    for c in range(0, len(order), chunk):
        part = sorted(order[c:c + chunk], key=lambda i: lengths[i], reverse=True)
        batches += [part[b:b + batch_size] for b in range(0, len(part), batch_size)]
    short = [batches.pop()] if len(batches[-1]) < batch_size else []   # accelerate completes a short *last* one
    rng.shuffle(batches)
    return batches + short


class EpochWindows(Dataset):
    """The labelled training windows of one epoch (a ``Windows`` table), one object per run so that its DataLoader
    is prepared once; ``start_epoch`` draws the next epoch's (policy ``random`` places each window anew). An item
    is its row number: ``collate`` gathers a whole batch from the table's arrays at once."""

    def __init__(self, enc: Encoded, policy: str, seed: int, padding: dict):
        self.enc, self.policy, self.seed, self.padding = enc, policy, seed, padding
        self.windows: Windows | None = None

    def start_epoch(self, epoch: int) -> None:   # not set_epoch: accelerate calls that with its own count, 0 on resume
        self.windows = train_windows(self.enc, self.policy, epoch_rng(self.seed, epoch, "windows"))

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, i: int) -> int:
        return i

    def collate(self, rows: list[int]) -> dict[str, torch.Tensor]:
        """Windows ``rows`` of this epoch, padded as ``DataCollatorWithPadding(pad_to_multiple_of=8)`` would, with
        their answer positions, as int64 tensors."""
        rows = np.asarray(rows, dtype=np.int64)
        batch = self.windows.model_inputs(rows, **self.padding)
        batch["start_positions"] = self.windows.start_position[rows]
        batch["end_positions"] = self.windows.end_position[rows]
        return {key: torch.from_numpy(value) for key, value in batch.items()}


class EpochBatches:
    """The DataLoader's ``batch_sampler``: the current epoch's batches (shuffled, or grouped by length) from batch
    ``skip`` on; ``batch_size`` is split between processes. With several, a short last batch is completed here
    from the epoch's first windows (not by ``even_batches``), so a resumed run that skips batches does it alike."""

    def __init__(self, dataset: EpochWindows, batch_size: int, group_by_length: bool, seed: int,
                 num_processes: int = 1):
        self.dataset, self.batch_size, self.group_by_length, self.seed = dataset, batch_size, group_by_length, seed
        self.num_processes = num_processes
        self.batches: list[list[int]] = []
        self.skip = 0

    def start_epoch(self, epoch: int, skip: int = 0) -> None:
        rng = epoch_rng(self.seed, epoch, "batches")
        self.batches = (length_grouped_batches(self.dataset.windows.length.tolist(), self.batch_size, rng)
                        if self.group_by_length else shuffled_batches(len(self.dataset), self.batch_size, rng))
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
    """``batch_size`` and its halves that still split evenly between processes, largest first (halving, unlike
    ``find_executable_batch_size``, keeps ``batch_size × grad_accum`` exact)."""
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
    """The largest of ``micro_batches`` whose step over the longest training windows fits in memory on every
    process, AdamW's moments and the ``ema_decay`` average included; TrainingError if none does."""
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


def choose_batches(cfg: Config, model, dataset: EpochWindows, accelerator, saved: TrainerState | None
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

"""Which precision, and one fresh ``Accelerator`` per call of ``train``/``predict``/``evaluate``.

accelerate keeps its state in process-wide singletons: a second ``Accelerator(mixed_precision=...)``
with another precision raises "AcceleratorState has already been initialized", which is the
notebook's everyday loop (train, change a cell, train again). ``accelerator_for`` therefore starts
each call from a clean ``AcceleratorState`` and ``GradientState`` and clears them again when the
call ends. ``PartialState`` (the processes started by ``accelerate launch`` and their process group)
is kept: it is the same for every call.
"""
from __future__ import annotations

import contextlib

import torch

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_precision(requested: str) -> str:
    """``auto`` → bf16 on GPUs that support it, fp16 on other GPUs (T4), no on CPU."""
    if requested != "auto":
        return requested
    if not torch.cuda.is_available():
        return "no"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def inference_autocast(precision: str, device: torch.device):
    """The autocast context for a forward pass at ``precision`` (a ``Config.mixed_precision`` value)."""
    dtype = AUTOCAST_DTYPES.get(resolve_precision(precision))
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def reset_accelerate_state() -> None:
    """Forget the precision and accumulation settings of the last ``Accelerator`` (not the processes)."""
    from accelerate.state import AcceleratorState, GradientState
    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()


@contextlib.contextmanager
def accelerator_for(precision: str = "no", grad_accum: int = 1):
    """A new ``Accelerator`` that gives every batch's windows to the processes in equal parts
    (``split_batches``: ``batch_size`` is the total over all processes), released on exit."""
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration
    reset_accelerate_state()
    accelerator = Accelerator(mixed_precision=resolve_precision(precision), gradient_accumulation_steps=grad_accum,
                              dataloader_config=DataLoaderConfiguration(split_batches=True))
    try:
        yield accelerator
    finally:
        accelerator.free_memory()
        reset_accelerate_state()


def check_divisible(cfg, num_processes: int) -> None:
    """Each process gets an equal part of every batch, so batch sizes must divide evenly."""
    for key in ("batch_size", "eval_batch_size"):
        if getattr(cfg, key) % num_processes:
            raise ValueError(f"{key} ({getattr(cfg, key)}) must be a multiple of the number of processes "
                             f"({num_processes}): each process gets an equal part of every batch")

"""Which precision (mixed, and ``tf32`` for float32 matmuls), and one fresh ``Accelerator`` per call of
``train``/``predict``/``evaluate``, so that a notebook can train again with other settings."""
from __future__ import annotations

import contextlib

import torch

from .files import refused_as

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


@contextlib.contextmanager
def tf32_matmuls(enabled: bool):
    """TF32 for CUDA float32 matmuls and convolutions inside the block if ``enabled``; old settings restored."""
    # CUDA flags only: set_float32_matmul_precision also changes CPU (oneDNN) results and breaks inductor (torch 2.9)
    if not enabled:
        yield
        return
    matmul, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    before = matmul.allow_tf32, cudnn.allow_tf32
    matmul.allow_tf32 = cudnn.allow_tf32 = True
    try:
        yield
    finally:
        matmul.allow_tf32, cudnn.allow_tf32 = before


def processes():
    """The processes ``accelerate launch`` started (or this one alone), as an ``Accelerator`` sets them up."""
    # ACCELERATE_USE_CPU (--cpu): without it a bare PartialState() on a machine without a GPU ignores the others
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env
    return PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))


def reset_accelerate_state() -> None:
    """Forget the precision and accumulation settings of the last ``Accelerator`` (not the processes)."""
    from accelerate.state import AcceleratorState, GradientState
    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()


@contextlib.contextmanager
def accelerator_for(precision: str = "no", grad_accum: int = 1, log_with: str = "none", project_dir=None):
    """A new ``Accelerator`` (``split_batches``: ``batch_size`` is the total over all processes) logging to
    ``log_with`` below ``project_dir``; on exit its trackers finish and accelerate's state is cleared (``release``)."""
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration
    reset_accelerate_state()    # a second Accelerator with another precision would raise otherwise
    accelerator = Accelerator(mixed_precision=resolve_precision(precision), gradient_accumulation_steps=grad_accum,
                              # non_blocking: pinned batches are copied to the device without waiting
                              dataloader_config=DataLoaderConfiguration(split_batches=True, non_blocking=True),
                              log_with=None if log_with == "none" else log_with,
                              project_dir=None if project_dir is None else str(project_dir))
    with quiet_writer_threads():
        try:
            yield accelerator
        except BaseException:
            release(accelerator, project_dir, quietly=True)
            raise
        release(accelerator, project_dir)


def release(accelerator, project_dir=None, quietly: bool = False) -> None:
    """Finish the trackers (not ``end_training``: later calls need the process group) and clear
    accelerate's state; a refused tracker write is an ``OSError`` naming its folder, unless ``quietly``."""
    try:
        for tracker in accelerator.trackers:
            with refused_as(getattr(tracker, "logging_dir", None) or project_dir or "."):
                tracker.finish()
    except Exception:
        if not quietly:
            raise
    finally:
        accelerator.free_memory()
        reset_accelerate_state()


@contextlib.contextmanager
def quiet_writer_threads():
    """No traceback from TensorBoard's writer thread on a failed write: the training thread meets it at its next log."""
    import threading
    previous = threading.excepthook

    def hook(args):
        if not (isinstance(args.exc_value, OSError) and type(args.thread).__module__.startswith("tensorboard")):
            previous(args)
    threading.excepthook = hook
    try:
        yield
    finally:
        threading.excepthook = previous


TRACKER_PACKAGES = {"tensorboard": ("tensorboard", "tensorboardX"), "wandb": ("wandb",)}


def check_tracker(log_with: str) -> None:
    """accelerate silently drops a tracker whose package is missing: refuse it before the run starts."""
    import importlib.util
    packages = TRACKER_PACKAGES.get(log_with, ())
    if packages and not any(importlib.util.find_spec(name) for name in packages):
        raise ValueError(f"log_with={log_with} needs the {packages[0]} package: pip install {packages[0]}")


def check_divisible(cfg, num_processes: int) -> None:
    """Each process gets an equal part of every batch, so batch sizes must divide evenly."""
    for key in ("batch_size", "eval_batch_size"):
        if getattr(cfg, key) % num_processes:
            raise ValueError(f"{key} ({getattr(cfg, key)}) must be a multiple of the number of processes "
                             f"({num_processes}): each process gets an equal part of every batch")

"""``compile=true``: the model's forward compiled in place with ``nn.Module.compile``, or run
eagerly, after one line saying why, where ``torch.compile`` cannot run."""
from __future__ import annotations

import functools

import torch

# torch.compile's keywords. dynamic: batches are padded to their longest window, so widths vary; one
# graph with symbolic sizes serves them all, in any order (a resumed run meets them in another order).
# Tests add backend="aot_eager": inductor compiles a training graph for minutes on a small CPU.
COMPILE_OPTIONS: dict = {"dynamic": True}
MIN_TORCH = "2.5"   # older: the guards of BERT's dynamic-shape graph fail, so every step compiled again


def compile_model(model: torch.nn.Module, enabled: bool = True) -> torch.nn.Module:
    """``model``, compiled in place if ``enabled`` (the same object: its ``state_dict`` keys and
    checkpoints are those of an eager run); returned for chaining. ``compile`` is a speed setting,
    never a reason for a run to stop: where ``torch.compile`` cannot run on the model's device (torch
    older than ``MIN_TORCH``, no C compiler, a GPU too old for Triton, an unsupported Python), one
    line says so and the model runs eagerly. The model's graphs compile at its first call in each
    mode; an error of the compiler on them alone is raised as torch raises it (``compile=false``)."""
    if enabled and not cannot_compile(next(model.parameters()).device):
        model.compile(**COMPILE_OPTIONS)   # again on a compiled model: dynamo reuses its graphs
    return model


@functools.cache   # once per device and process: each dev evaluation compiles the model it scores
def cannot_compile(device: torch.device) -> bool:
    """Whether ``torch.compile`` fails on a small function on ``device`` here, said in one line."""
    try:
        if torch.__version__ < MIN_TORCH:
            raise RuntimeError(f"it needs torch {MIN_TORCH} or newer, this is {torch.__version__}")
        torch.compile(lambda x: x.sin() + 1, **COMPILE_OPTIONS)(torch.ones(8, device=device))
        return False
    except Exception as error:
        while error.__cause__ or error.__context__:   # dynamo raises its own error while handling the compiler's
            error = error.__cause__ or error.__context__
        first = next((line.strip() for line in str(error).splitlines() if line.strip()), "")[:200]
        print(f"compile=true: torch.compile cannot run here ({type(error).__name__}: {first}); the model "
              f"runs uncompiled", flush=True)
        return True

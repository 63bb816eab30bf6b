"""``compile=true``: the model's forward pass compiled with ``torch.compile``, in place, falling back
to eager execution where it cannot be compiled.

In place (what ``nn.Module.compile`` does): the module stays the same object, so its ``state_dict``
keys, the checkpoints ``accelerator.save_state`` writes and the model ``save_pretrained`` writes are
those of an uncompiled run. (``torch.compile(model)`` would wrap it in an ``OptimizedModule`` whose
keys start with ``_orig_mod.``.) accelerate, DDP and ``save_model`` see a plain module. What is
compiled is ``nn.Module._call_impl`` with the module as its argument, so a copy of a compiled module
(``copy.deepcopy``) runs its own weights through it.

``dynamic=True``: batches are padded to their longest window (a multiple of 8), so one file brings
up to ``max_length / 8`` widths, and its last batch is short. A graph specialised to one shape would
be compiled again for each new one (and past dynamo's recompile limit, 8 per function, the model
would silently run eagerly); one graph with a symbolic batch size and length is compiled once per
mode (training, evaluation). It also keeps the compiled code independent of the order in which
shapes arrive: automatic dynamic shapes compile a static graph first and a dynamic one at the second
shape, and a resumed run meets its shapes in another order than the uninterrupted run did.

Compiling happens at the first call of each mode. If it fails (no C compiler for inductor's CPU
kernels, a GPU too old for Triton, a Python version ``torch.compile`` does not support), one line
says so and the model runs eagerly from then on: ``compile`` is a speed setting, never a reason for
a run to stop. So does torch before 2.5 (``MIN_TORCH``): there the guards of a dynamic-shape graph
of BERT fail to evaluate (``FloatTrueDiv`` missing from dynamo's guard interpreter), so every step
was compiled again until dynamo's recompile limit made it eager anyway (tests/test_levers.py's
compiled model and demo trainings: 14 minutes with torch 2.4.1 on a 2-core CPU, 44 s with 2.5.1).

Dynamo keeps compiled graphs between calls, so a second ``train()`` of the same architecture in one
process (the notebook's loop) reuses them rather than compiling again.

Numerics: the compiled model computes the same function with fused kernels, so results differ by
float rounding. Inductor draws dropout masks with its own kernels, seeded from torch's generator,
so a compiled training run is not bit-identical to an eager one; a resumed compiled run is to an
uninterrupted compiled one, the checkpoint restoring that generator (tested with ``aot_eager``,
whose masks are eager's; with inductor untested on a CPU, where its training graph compiles for
minutes).
"""
from __future__ import annotations

import torch

# Keyword arguments of torch.compile. Tests add backend="aot_eager": inductor's C++ compilation of a
# training graph takes minutes on a small CPU, and "aot_eager" runs the same traced graph eagerly.
COMPILE_OPTIONS: dict = {"dynamic": True}
MIN_TORCH = (2, 5)


def torch_version() -> tuple[int, ...]:
    """torch's major and minor version, e.g. (2, 13) for 2.13.0+cpu."""
    return tuple(int(part) for part in torch.__version__.split("+")[0].split(".")[:2])


def is_compiled(model: torch.nn.Module) -> bool:
    return getattr(model, "_compiled_call_impl", None) is not None


def compile_model(model: torch.nn.Module, enabled: bool = True) -> torch.nn.Module:
    """``model``, compiled in place if ``enabled`` (and not compiled already); returned for chaining."""
    if not enabled or is_compiled(model):
        return model
    if torch_version() < MIN_TORCH:
        fall_back(model, RuntimeError(f"compile needs torch {'.'.join(map(str, MIN_TORCH))} or newer, this is "
                                      f"{torch.__version__}"))
        return model
    try:
        # the function nn.Module.compile compiles, unbound: the module is an argument, not a constant
        compiled = torch.compile(torch.nn.Module._call_impl, **COMPILE_OPTIONS)
    except Exception as e:   # raised at once only where torch.compile cannot work at all
        fall_back(model, e)
        return model
    # what nn.Module.compile sets, and what __call__ runs instead of _call_impl while it is set
    model._compiled_call_impl = EagerIfCompileFails(model, compiled)
    return model


def fall_back(model: torch.nn.Module, error: BaseException) -> None:
    """Run ``model`` eagerly from now on, saying why in one line: the first line of the error that
    started it (dynamo wraps a compiler's error in its own)."""
    model._compiled_call_impl = None
    while getattr(error, "inner_exception", None) or error.__cause__:
        error = getattr(error, "inner_exception", None) or error.__cause__
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    reason = f"{type(error).__name__}: {lines[0] if lines else ''}"[:300]
    print(f"compile=true: torch.compile cannot compile {type(model).__name__} here ({reason}); it runs "
          f"uncompiled", flush=True)


class EagerIfCompileFails:
    """The compiled call of ``model``; where compiling fails (at a first call, or at a new mode or
    shape later), ``model`` falls back to eager execution and this call runs eagerly."""

    def __init__(self, model: torch.nn.Module, compiled):
        self.model, self.compiled = model, compiled

    def __call__(self, *args, **kwargs):
        try:
            return self.compiled(self.model, *args, **kwargs)
        except torch._dynamo.exc.TorchDynamoException as e:   # compile errors, inductor's included
            fall_back(self.model, e)
            return self.model._call_impl(*args, **kwargs)

"""``python -m hw7qa ...`` with a fault injected; started by ``accelerate launch`` in test_multiprocess.py.

    HW7QA_FAULT=nan:RANK:FIRST[:LAST]   process RANK's loss is NaN in optimizer steps FIRST..LAST (no LAST: to the end)
    HW7QA_FAULT=crash:STEP              every process stops (KeyboardInterrupt) right after optimizer step STEP,
                                        as a kill or a disconnect would end a run mid-epoch
    HW7QA_FAULT=full:RANK:REGEX         process RANK's first write matching REGEX (tests/writes.py) fails as on a
                                        full disk
"""
import os
import sys

import hw7qa.train as train_module
from hw7qa.__main__ import main


def nan_loss(module, args, output):
    output.loss = output.loss * float("nan")
    return output


def inject_nan(rank: int, first: int, last: float) -> None:
    real = train_module.train_step

    def train_step(run, batch):
        step = run.state.step + 1                      # the optimizer step this micro-batch belongs to
        if run.accelerator.process_index != rank or not first <= step <= last:
            return real(run, batch)
        hook = run.accelerator.unwrap_model(run.model).register_forward_hook(nan_loss)
        try:
            return real(run, batch)
        finally:
            hook.remove()
    train_module.train_step = train_step


def inject_crash(at_step: int) -> None:
    real = train_module.after_step

    def after_step(run, epoch_position):
        real(run, epoch_position)
        if run.state.step == at_step:
            raise KeyboardInterrupt
    train_module.after_step = after_step


def inject_full_disk(rank: int, pattern: str) -> None:
    if int(os.environ.get("RANK", 0)) == rank:
        import re
        import pytest
        from writes import WriteFaults
        WriteFaults(pytest.MonkeyPatch(), re.compile(pattern), "full")


if __name__ == "__main__":
    kind, *numbers = os.environ["HW7QA_FAULT"].split(":")
    if kind == "full":
        inject_full_disk(int(numbers[0]), ":".join(numbers[1:]))
    elif kind == "nan":
        rank, first, *last = map(int, numbers)
        inject_nan(rank, first, last[0] if last else float("inf"))
    else:
        inject_crash(int(numbers[0]))
    sys.exit(main(sys.argv[1:]))

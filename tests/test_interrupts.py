"""Ctrl-C (SIGINT) and SIGTERM at every stage: a run's tokenizing, training, dev evaluation,
checkpoint and model saves, test prediction and result.csv, and predict, evaluate, ensemble and ask
on their own. Each ends with one line on stderr that says what was kept and the command that
continues, exit code 130 or 143 and no traceback; that command then ends where an uninterrupted
run ends. The process sends itself the signal when the stage begins: at the event of an
uninterrupted run (a tokenizer call, a forward pass, a write of a kind) where that stage begins."""
import re
import shlex
import shutil
import signal
from pathlib import Path

import pytest
import torch
from transformers import PreTrainedTokenizerBase

from hw7qa.__main__ import main
from test_writes import KNOBS, assert_same_as_reference, commands, outcome_of
from writes import WriteFaults, kind_of

ASK = ["--question", "甲在哪裡", "--paragraph", "乙說甲在丙"]
CASE = Path("CASE")             # in the lines expected: the case's folder (RUN: its run folder)


class Events(WriteFaults):
    """The events of a command, in order: ``tokenize``, ``forward train`` / ``forward eval`` (the QA
    model's forward passes) and each write by its kind (``writes.kind_of``, the folder ``run`` as
    RUN). At event number ``at`` the process sends itself ``signal``."""

    def __init__(self, monkeypatch, run, at: int | None = None, signum: int | None = None):
        super().__init__(monkeypatch)
        self.events, self.run, self.at, self.signum = [], str(run), at, signum
        real_call = PreTrainedTokenizerBase.__call__

        def call(tokenizer, *args, **kwargs):
            self.event("tokenize")
            return real_call(tokenizer, *args, **kwargs)
        monkeypatch.setattr(PreTrainedTokenizerBase, "__call__", call)

    def hit(self, what, path) -> bool:
        self.event(kind_of(f"{what} {path}", self.run))
        return False

    def forward(self, module, args) -> None:
        if type(module).__name__.endswith("ForQuestionAnswering"):
            self.event(f"forward {'train' if module.training else 'eval'}")

    def event(self, name: str) -> None:
        self.events.append(name)
        if len(self.events) == self.at:
            # without a handler of its own SIGTERM ends the process (pytest's too) on the spot
            assert signal.getsignal(self.signum) not in (signal.SIG_DFL, signal.SIG_IGN), "no handler for the signal"
            signal.raise_signal(self.signum)           # its handler raises here


def run_with_events(monkeypatch, argv, run, at=None, signum=None) -> tuple[int, list[str]]:
    with monkeypatch.context() as patched:
        events = Events(patched, run, at, signum)
        hook = torch.nn.modules.module.register_module_forward_pre_hook(events.forward)
        try:
            code = main([str(arg) for arg in argv])
        finally:
            hook.remove()
    return code, events.events


def train_command(run) -> list[str]:
    return ["demo", "--output-dir", run, "--set", *KNOBS]      # 3 steps, checkpoints at 2 and 3, dev at 3


def standalone_command(name, case) -> list[str]:
    return ["ask", str(case / "run"), *ASK] if name == "ask" else commands(case / "run", case / "ens")[name]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, monkeypatch_module):
    """An uninterrupted run (``outcome_of``) and the events of it and of each command on their own."""
    run = tmp_path_factory.mktemp("reference") / "run"
    code, events = run_with_events(monkeypatch_module, train_command(run), run)
    assert code == 0
    found = {"train": events}
    for name in ("predict", "evaluate", "ensemble", "ask"):
        case = tmp_path_factory.mktemp(name)
        shutil.copytree(run, case / "run", ignore=shutil.ignore_patterns("logits"))
        code, found[name] = run_with_events(monkeypatch_module, standalone_command(name, case), case / "run")
        assert code == 0
    return {"events": found, **outcome_of(run)}


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


CHECKPOINT_DONE = "rename RUN/checkpoints/step-N.partial"
# stage → (command, the event that begins it, after the first (0) or last (-1) of which event, or None;
# what the line says after "interrupted (Ctrl-C): " / "stopped (SIGTERM): ", RUN the run folder)
RESUME = ". Continue: python -m hw7qa train --resume RUN"
PREDICT = "the trained model is saved in RUN/model; write its result.csv: python -m hw7qa predict RUN"
STAGES = {
    "tokenizing": ("train", "tokenize", None,
                   "nothing was written; run it again: python -m hw7qa demo --output-dir RUN --set " + " ".join(KNOBS)),
    "training": ("train", "forward train", None, "at step 0 of 3; nothing is saved yet" + RESUME),
    "training, past a checkpoint": ("train", "forward train", (CHECKPOINT_DONE, 0),
                                    "at step 2 of 3; the last checkpoint is RUN/checkpoints/step-0000002" + RESUME),
    "saving a checkpoint": ("train", "torch.save RUN/checkpoints/step-N.partial/optimizer.bin", None,
                            "at step 2 of 3; no checkpoint to continue from (save_every, keep_checkpoints). Train it "
                            "again from step 0: python -m hw7qa train --config RUN/config.json --set output_dir=RUN "
                            "--overwrite"),
    "dev evaluation": ("train", "forward eval", None,
                       "at step 3 of 3; the last checkpoint is RUN/checkpoints/step-0000002" + RESUME),
    "saving the model": ("train", "safetensors RUN/model.partial/model.safetensors", None,
                         "at step 3 of 3; the last checkpoint is RUN/checkpoints/step-0000002" + RESUME),
    "saving the last checkpoint": ("train", "open RUN/checkpoints/step-N.partial/trainer_state.json",
                                   (CHECKPOINT_DONE, 0),
                                   "at step 3 of 3; the best model so far is in RUN/model and the last checkpoint is "
                                   "RUN/checkpoints/step-0000002" + RESUME),
    "test prediction": ("train", "forward eval", (CHECKPOINT_DONE, -1), PREDICT),
    "writing result.csv": ("train", "os.open RUN/.result.csv.TMP", None, PREDICT),
    **{name: (name, "forward eval", None, "no file is left half written and the logits computed so far are kept; "
                                          "run it again: python -m hw7qa " + shlex.join(standalone_command(name, CASE)))
       for name in ("predict", "evaluate", "ensemble")},
    "ask": ("ask", "forward eval", None, "nothing was written; run it again: python -m hw7qa ask RUN "
                                         + shlex.join(ASK)),
}


# the stages whose line names a command of its own kind, run to its end: a resume that starts the run
# again, one from a checkpoint, one from a checkpoint beside a saved model, the --overwrite command,
# predict after training, and a command run again (the other stages' lines name one of these)
CONTINUED = {"training", "training, past a checkpoint", "saving the last checkpoint", "saving a checkpoint",
             "test prediction", "predict"}


def event_number(events: list[str], event: str, after) -> int:
    """The number (1-based) of the first ``event`` after ``after`` = (event, first 0 or last -1)."""
    start = 0 if after is None else [i for i, e in enumerate(events) if e == after[0]][after[1]]
    return events.index(event, start) + 1


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
@pytest.mark.parametrize("stage", STAGES)
def test_an_interrupted_stage_says_what_was_kept_and_what_continues(stage, signum, reference, tmp_path, monkeypatch,
                                                                     capsys):
    command, event, after, says = STAGES[stage]
    at = event_number(reference["events"][command], event, after)
    if command == "train":
        run, argv = tmp_path / "run", train_command(tmp_path / "run")
    else:
        run, argv = tmp_path / "run", standalone_command(command, tmp_path)
        shutil.copytree(reference["run"], run, ignore=shutil.ignore_patterns("logits"))
    capsys.readouterr()
    code, events = run_with_events(monkeypatch, argv, run, at, signum)
    err = capsys.readouterr().err
    assert events[at - 1] == event and code == 128 + signum and "Traceback" not in err
    how = "interrupted (Ctrl-C)" if signum == signal.SIGINT else "stopped (SIGTERM)"
    expected = f"{how}: {says.replace('RUN', str(run)).replace('CASE', str(tmp_path))}"
    assert err.strip().splitlines()[-1] == expected
    if signum == signal.SIGTERM and stage in CONTINUED:      # the hint is the same for both signals
        continued = shlex.split(re.search(r"python -m hw7qa (.*)$", expected).group(1))
        assert main(continued) == 0
        if command == "train":
            assert_same_as_reference(run, reference)
        elif command == "predict":
            assert (run / "result.csv").read_bytes() == reference["result"]

"""A kill at any moment of a run loses nothing.

``kill -9``, an out-of-memory kill or a Colab runtime taken away end a process between two of its
writes, with no ``except`` or ``finally`` run. For the last write of each kind that a training run
makes (its config, metrics records, three saves of a better model, two checkpoints, the logits cache
and result.csv), a child process runs the demo and is killed there (tests/writes.py, ``kill``); then
``train --resume`` either ends exactly where the uninterrupted run ends (metrics, weights and
result.csv, bit for bit) or, where the kill came before the first checkpoint but after a logged
step, refuses and touches nothing. ``predict``, ``evaluate`` and ``ensemble``, killed at each kind
of write they make, leave their file as it was or whole, and run again write the same bytes. Children are forked from a server that has imported the package
once (multiprocessing's forkserver), so each kill costs a training run, not an interpreter start.
"""
import collections
import contextlib
import multiprocessing
import shutil

import pytest

from hw7qa.__main__ import main
from test_writes import (KNOBS, assert_same_as_reference, assert_usable, commands, leftovers, outcome_of, snapshot,
                         what_a_resume_should_do)
from writes import KILLED, Kind, WriteFaults, kind_of, killed_command

# a dev evaluation at each of the 3 steps; with answers of up to 30 tokens this tiny run's dev scores rise at
# each of them, so the model is saved 3 times (set aside twice), on both version sets
RUN_KNOBS = [*KNOBS, "eval_every=1", "max_answer_length=30"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The uninterrupted run (``outcome_of``) and how many writes of each kind it makes."""
    run = tmp_path_factory.mktemp("uninterrupted") / "run"
    # torch 2.4 writes a module into a new /tmp folder when torch.distributed.nn is first imported in a process;
    # a killed child never makes that write while its writes are counted, so it is made here before they are
    # recorded (run alone, this file would otherwise expect it of the child and fail on torch 2.4)
    with contextlib.suppress(ImportError):
        import torch.distributed.nn  # noqa: F401
    with pytest.MonkeyPatch.context() as monkeypatch:
        faults = WriteFaults(monkeypatch)
        assert main(["demo", "--output-dir", str(run), "--set", *RUN_KNOBS]) == 0
    kinds = collections.Counter(kind_of(w, run) for w in faults.writes)     # kind → how many (the last is killed)
    assert sum(w.startswith("rename") and w.endswith("/model") for w in faults.writes) == 2   # a model set aside twice
    return {"kinds": kinds, **outcome_of(run)}


@pytest.fixture(scope="module")
def forked():
    """A forkserver with the package imported: a fork of it starts with no thread and no state."""
    context = multiprocessing.get_context("forkserver")
    # everything the children import, imported before any fork: an import in a forked child can wait
    # forever for a lock that another thread of the server held when it forked
    context.set_forkserver_preload(["hw7qa.__main__", "hw7qa.inference", "hw7qa.train", "hw7qa.tiny", "writes"])
    return context


def killed_at(forked, command: list[str], kind: str, count: int, folder) -> int | None:
    """Run ``command`` in a forked child killed at the ``count``-th write of ``kind`` (in ``folder``,
    what ``kind_of`` names RUN); its exit code (``KILLED`` once the kill, checked to be at a write of
    that kind, came; None if it hung)."""
    report = folder.with_name(folder.name + ".killed-at")
    report.parent.mkdir(parents=True, exist_ok=True)     # the killed child writes it, whatever it made by then
    child = forked.Process(target=killed_command, args=(command, Kind(kind, str(folder)), count, str(report)))
    child.start()
    child.join(timeout=300)                          # a hang fails the test, not the whole suite
    if child.is_alive():
        child.kill()
        child.join()
        return None
    if child.exitcode == KILLED:
        assert kind_of(report.read_text(encoding="utf-8"), folder) == kind
    return child.exitcode


def test_a_kill_at_each_kind_of_write_loses_nothing(uninterrupted, forked, tmp_path, capsys):
    problems, outcomes = [], collections.Counter()
    for number, (kind, count) in enumerate(uninterrupted["kinds"].items()):
        run = tmp_path / str(number) / "run"
        code = killed_at(forked, ["demo", "--output-dir", str(run), "--set", *RUN_KNOBS], kind, count, run)
        if code != KILLED:
            problems.append(f"{kind} #{count}: the child ended with {code}, not at the kill")
            continue
        try:
            outcomes[resume_after_a_kill(run, uninterrupted, capsys)] += 1
        except AssertionError as e:
            problems.append(f"killed at {kind} #{count}: {str(e).splitlines()[0][:300]}")
        shutil.rmtree(tmp_path / str(number), ignore_errors=True)
    assert not problems, "\n".join(problems)
    # before the run folder exists / after a logged step but before the first checkpoint / after it
    assert outcomes.keys() == {"no run", "refused", "continues"} and outcomes["continues"] >= 20, outcomes


def resume_after_a_kill(run, uninterrupted, capsys) -> str:
    """``train --resume`` of the killed run does what ``what_a_resume_should_do`` says; which it was."""
    then = what_a_resume_should_do(run)
    if then == "no run":
        return then
    before = snapshot(run)
    code = main(["train", "--resume", str(run)])
    err = capsys.readouterr().err.strip().splitlines()[-1:]
    if then == "refused":
        assert code == 2 and snapshot(run) == before, (code, err)
        return then
    assert code == 0, err
    assert_usable(run, uninterrupted)
    assert_same_as_reference(run, uninterrupted)
    return then


# what each inference command makes, under the case folder (the run is RUN/run, an ensemble's folder RUN/ens)
MADE = {"predict": "run/result.csv", "evaluate": "run/dev_predictions.jsonl", "ensemble": "ens/result.csv"}


def inference_command(command: str, case) -> list[str]:
    return commands(case / "run", case / "ens")[command]


def inference_case(uninterrupted, case, command: str):
    """A copy of the uninterrupted run without its logits cache, and a previous whole file where the
    command writes (none for an ensemble's new folder); that previous file's bytes."""
    shutil.copytree(uninterrupted["run"], case / "run", ignore=shutil.ignore_patterns("logits"))
    previous = None if command == "ensemble" else f"previous {command} output\n".encode()
    if previous:
        (case / MADE[command]).write_bytes(previous)
    return previous


@pytest.mark.parametrize("command", ["predict", "evaluate", "ensemble"])
def test_a_kill_at_each_kind_of_write_of_inference_leaves_whole_files(command, uninterrupted, forked, tmp_path):
    """Killed at the last write of each kind (logits cache, the CSV or JSONL, their renames), the
    command leaves its file as it was or whole and new; run again it writes what an uninterrupted one
    writes and leaves no temporary file behind."""
    reference = tmp_path / "reference"
    inference_case(uninterrupted, reference, command)
    with pytest.MonkeyPatch.context() as monkeypatch:
        faults = WriteFaults(monkeypatch)
        assert main(inference_command(command, reference)) == 0
    expected = (reference / MADE[command]).read_bytes()
    kinds = collections.Counter(kind_of(w, reference) for w in faults.writes)
    assert any(kind.startswith("replace") for kind in kinds), kinds        # the file is put in place by a rename
    problems = []
    for number, (kind, count) in enumerate(kinds.items()):
        case = tmp_path / str(number)
        previous = inference_case(uninterrupted, case, command)
        code = killed_at(forked, inference_command(command, case), kind, count, case)
        made = case / MADE[command]
        left = made.read_bytes() if made.exists() else None
        if code != KILLED:
            problems.append(f"{kind} #{count}: the child ended with {code}, not at the kill")
        elif left not in (previous, expected):
            problems.append(f"killed at {kind} #{count}: {MADE[command]} is neither the previous file nor the new one")
        elif main(inference_command(command, case)) != 0 or made.read_bytes() != expected or leftovers(case):
            problems.append(f"killed at {kind} #{count}: run again, it differs or leaves {leftovers(case)}")
    assert not problems, "\n".join(problems)

"""A kill at any moment of a run loses nothing.

``kill -9``, an out-of-memory kill or a Colab runtime taken away end a process between two of its
writes, with no ``except`` or ``finally`` run. For the last write of each kind that a training run
makes (its config, metrics records, three saves of a better model, two checkpoints, the logits cache
and result.csv), a child process runs the demo and is killed there (tests/writes.py, ``kill``); then
``train --resume`` either ends exactly where the uninterrupted run ends (metrics, weights and
result.csv, bit for bit) or, where the kill came before the first checkpoint but after a logged
step, refuses and touches nothing. Children are forked from a server that has imported the package
once (multiprocessing's forkserver), so each kill costs a training run, not an interpreter start.
"""
import collections
import multiprocessing
import shutil

import pytest

from hw7qa.__main__ import main
from test_writes import KNOBS, assert_same_as_reference, assert_usable, snapshot, what_a_resume_should_do
from writes import KILLED, Kind, WriteFaults, kind_of, killed_command

RUN_KNOBS = [*KNOBS, "eval_every=1"]     # a dev evaluation at each of the 3 steps: the model is saved 3 times


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The uninterrupted run, what test_writes' checks compare with, and the number of the last write
    of each kind it makes."""
    from hw7qa.report import read_metrics
    from hw7qa.runs import list_checkpoints
    from safetensors.torch import load_file
    run = tmp_path_factory.mktemp("uninterrupted") / "run"
    with pytest.MonkeyPatch.context() as monkeypatch:
        faults = WriteFaults(monkeypatch)
        assert main(["demo", "--output-dir", str(run), "--set", *RUN_KNOBS]) == 0
    kinds = collections.Counter(kind_of(w, run) for w in faults.writes)     # kind → how many (the last is killed)
    assert sum(w.startswith("rename") and w.endswith("/model") for w in faults.writes) == 2   # a model set aside twice
    return {"run": run, "kinds": kinds, "writes": faults.writes, "metrics": read_metrics(run),
            "weights": load_file(run / "model" / "model.safetensors"), "result": (run / "result.csv").read_bytes(),
            "checkpoints": {c.name: snapshot(c) for c in list_checkpoints(run)}}


@pytest.fixture(scope="module")
def forked():
    """A forkserver with the package imported: a fork of it starts with no thread and no state."""
    context = multiprocessing.get_context("forkserver")
    # everything the children import, imported before any fork: an import in a forked child can wait
    # forever for a lock that another thread of the server held when it forked
    context.set_forkserver_preload(["hw7qa.__main__", "hw7qa.run", "hw7qa.train", "hw7qa.tiny", "writes"])
    return context


def test_a_kill_at_each_kind_of_write_loses_nothing(uninterrupted, forked, tmp_path, capsys):
    problems, outcomes = [], collections.Counter()
    for number, (kind, count) in enumerate(uninterrupted["kinds"].items()):
        run, report = tmp_path / str(number) / "run", tmp_path / f"{number}.killed-at"
        command = ["demo", "--output-dir", str(run), "--set", *RUN_KNOBS]
        child = forked.Process(target=killed_command, args=(command, Kind(kind, str(run)), count, str(report)))
        child.start()
        child.join(timeout=300)                      # a hang fails here, not the whole suite
        if child.is_alive():
            child.kill()
            child.join()
        if child.exitcode != KILLED:
            problems.append(f"{kind} #{count}: the child ended with {child.exitcode}, not at the kill")
            continue
        assert kind_of(report.read_text(encoding="utf-8"), run) == kind
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

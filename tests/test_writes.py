"""Every write can meet a full disk or a read-only folder: the command ends with one line naming what
it wrote and exit code 4, leaves no partial file or folder that looks complete, and the run stays
usable — ``train --resume`` ends where an uninterrupted run ends, ``predict`` works from the kept
model. The faults are injected at the lowest-level writes (tests/writes.py), in turn."""
import errno
import hashlib
import os
import re
import shutil
import tempfile
import threading

import pytest
import torch
from safetensors.torch import load_file

from hw7qa.__main__ import main
from hw7qa.config import Config
from hw7qa.files import as_refusal, append_whole, refused_errno
from hw7qa.report import read_metrics
from hw7qa.runfolder import list_checkpoints, save_model
from hw7qa.tiny import build_tiny_model
from writes import WriteFaults

# 38 windows, batch 16: 3 steps; checkpoints at steps 2 and 3, dev evaluation (and the model) at step 3;
# then the test file's result.csv
KNOBS = ["epochs=1", "batch_size=16", "save_every=2", "log_every=2", "keep_checkpoints=2", "auto_batch=false"]

# Every write a run, predict, evaluate and ensemble make, by what they write (descriptions of
# tests/writes.py, the run folder as RUN, the temporary folder as TMP, ensemble's folder as ENS).
SITES = {
    "tiny tokenizer": r"(mkdir|open) TMP/hw7qa-tiny-tokenizer-\w+(/vocab\.txt|/tokenizer_config\.json)?",
    "run folder": r"mkdir RUN",
    "config.json": r"(os\.open|open|replace) RUN/\.config\.json\.\w+\.tmp",
    "metrics.jsonl": r"(os\.open|os\.write) RUN/metrics\.jsonl",
    "checkpoint": r"(mkdir|safetensors|torch\.save|open|rename) RUN/checkpoints(/step-\d+\.partial(/[\w.]+)?)?",
    "model": r"(mkdir|open|safetensors|os\.open|replace|rename) RUN/model\.partial(/[\w.]+)?",
    "logits": r"(mkdir|os\.open|open|replace) RUN/logits(/\.\w+\.npz\.\w+\.tmp)?",
    "result.csv": r"(os\.open|open|replace) (RUN|ENS)/\.result\.csv\.\w+\.tmp",
    "dev_predictions.jsonl": r"(os\.open|open|replace) RUN/\.dev_predictions\.jsonl\.\w+\.tmp",
    "ensemble folder": r"mkdir ENS",
    "tensorboard": r"(mkdir|open) RUN/tensorboard(/[\w.]+)*",
}


def described(write: str, run, ens=None) -> str:
    text = write.replace(str(run), "RUN").replace(str(ens), "ENS") if ens else write.replace(str(run), "RUN")
    return text.replace(tempfile.gettempdir(), "TMP")


def snapshot(folder) -> dict:
    """Every file and folder under ``folder``: a hash of each file's bytes."""
    return {str(p.relative_to(folder)): hashlib.sha1(p.read_bytes()).hexdigest() if p.is_file() else "folder"
            for p in sorted(folder.rglob("*"))}


def leftovers(folder) -> list[str]:
    """Partial saves, set-aside folders and temporaries that a failed write must not leave."""
    return [str(p) for p in folder.rglob("*") if re.search(r"\.partial$|\.old$|\.tmp$", p.name)]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted demo run (KNOBS) and the writes it makes; then predict, evaluate and an ensemble
    of it with itself, and theirs."""
    root = tmp_path_factory.mktemp("reference")
    run, ens = root / "run", root / "ens"
    with pytest.MonkeyPatch.context() as monkeypatch:
        faults = WriteFaults(monkeypatch)
        assert main(["demo", "--output-dir", str(run), "--set", *KNOBS]) == 0
        writes = {"train": list(faults.writes)}
        for name, command in commands(run, ens).items():
            shutil.rmtree(run / "logits")
            faults.writes.clear()
            assert main(command) == 0
            writes[name] = list(faults.writes)
    return {"ens": ens, "writes": writes, **outcome_of(run)}


def outcome_of(run) -> dict:
    """What an uninterrupted run leaves, as ``assert_usable`` and ``assert_same_as_reference`` compare it."""
    return {"run": run, "metrics": read_metrics(run), "weights": load_file(run / "model" / "model.safetensors"),
            "result": (run / "result.csv").read_bytes(),
            "checkpoints": {c.name: snapshot(c) for c in list_checkpoints(run)}}


def commands(run, ens) -> dict:
    return {"predict": ["predict", str(run)], "evaluate": ["evaluate", str(run)],
            "ensemble": ["ensemble", str(run), str(run), "--split", "test", "--output-dir", str(ens)]}


def failed_with_one_line(capsys, faults, run, fault) -> str:
    """The path the error line names, after checking the line: the fault's words, a path that is
    what the failed write was writing (not a temporary or partial name), no traceback."""
    err = capsys.readouterr().err
    assert "Traceback" not in err and faults.failed is not None
    words = {"full": "no space left on the disk", "read-only": "read-only file system"}[fault]
    match = re.fullmatch(rf"error: {words} \((.+)\)", err.strip().splitlines()[-1])
    assert match, err.strip().splitlines()[-1]
    named = match.group(1)
    written = re.sub(r"/\.([^/]+)\.\w+\.tmp$", r"/\1", re.sub(r"\.partial(?=/|$)", "", faults.failed.split(" ", 1)[1]))
    assert not re.search(r"\.partial|\.tmp", named) and (written + "/").startswith(named + "/"), (named, faults.failed)
    return named


def assert_usable(run, reference):
    """What a failed write leaves: no partial files, metrics.jsonl whole lines that the uninterrupted run
    also wrote, and only complete checkpoints (byte for byte the uninterrupted run's)."""
    assert leftovers(run) == []
    if (run / "metrics.jsonl").exists():
        metrics = read_metrics(run)
        assert metrics == reference["metrics"][:len(metrics)]
    for checkpoint in list_checkpoints(run):
        assert snapshot(checkpoint) == reference["checkpoints"][checkpoint.name]
    if (run / "model").exists():
        assert load_file(run / "model" / "model.safetensors").keys() == reference["weights"].keys()


def assert_same_as_reference(run, reference):
    assert read_metrics(run) == reference["metrics"]
    weights = load_file(run / "model" / "model.safetensors")
    assert all(torch.equal(weights[k], reference["weights"][k]) for k in reference["weights"])
    assert (run / "result.csv").read_bytes() == reference["result"]


def test_every_write_is_a_known_site(reference):
    """A new kind of write fails here until it is added to SITES (and so to the tests below)."""
    unknown = [w for name, writes in reference["writes"].items() for w in writes
               if not any(re.fullmatch(pattern, described(w, reference["run"], reference["ens"]))
                          for pattern in SITES.values())]
    assert unknown == []


def last_write(reference, pattern: str, command: str = "train") -> int:
    """The number of the last write of ``command`` matching ``pattern`` (a SITES-style description)."""
    writes = reference["writes"][command]
    hits = [i for i, w in enumerate(writes, 1) if re.fullmatch(pattern, described(w, reference["run"]))]
    assert hits, pattern
    return hits[-1]


# One write of each site of a run (the last of its kind), the fault, and what a resume then does:
# "continues" to the uninterrupted run's end, "refused" (exit 2, nothing touched), "no run" (nothing
# was made to resume). HW7QA_EVERY_WRITE=1 fails every write in turn, with either fault
# (test_every_write_of_a_run_in_turn).
TRAINING_FAULTS = [
    (r"open TMP/hw7qa-tiny-tokenizer-\w+/vocab\.txt", "full", "no run"),
    (r"os\.open RUN/\.config\.json\.\w+\.tmp", "read-only", "no run"),
    (r"os\.write RUN/metrics\.jsonl", "full", "continues"),            # the last record: dev scores
    (r"safetensors RUN/checkpoints/step-0000002\.partial/model\.safetensors", "full", "refused"),
    (r"torch\.save RUN/checkpoints/step-0000003\.partial/random_states_0\.pkl", "full", "continues"),
    (r"open RUN/checkpoints/step-0000003\.partial/trainer_state\.json", "read-only", "continues"),
    (r"safetensors RUN/model\.partial/model\.safetensors", "full", "continues"),
    (r"rename RUN/model\.partial", "read-only", "continues"),
    (r"open RUN/\.result\.csv\.\w+\.tmp", "full", "continues"),
]


@pytest.mark.parametrize("pattern, fault, then", TRAINING_FAULTS)
def test_a_failed_write_in_training_ends_in_one_line_and_the_run_goes_on(pattern, fault, then, reference, tmp_path,
                                                                          monkeypatch, capsys):
    run = tmp_path / "run"
    with monkeypatch.context() as patched:
        faults = WriteFaults(patched, last_write(reference, pattern), fault)
        assert main(["demo", "--output-dir", str(run), "--set", *KNOBS]) == 4
    assert re.fullmatch(pattern, described(faults.failed, run))
    failed_with_one_line(capsys, faults, run, fault)
    assert then == what_a_resume_should_do(run)
    resume_after_a_failed_write(run, then, reference, capsys)


def what_a_resume_should_do(run) -> str:
    if not (run / "config.json").exists():
        return "no run"
    if list_checkpoints(run):
        return "continues"
    logged = (run / "metrics.jsonl").exists() and any(r["step"] for r in read_metrics(run))
    return "refused" if logged else "continues"


def resume_after_a_failed_write(run, then, reference, capsys):
    """The run folder after a failed write: usable, and a resume continues it to the uninterrupted
    run's end, or refuses touching nothing, or there is no run."""
    if then == "no run":
        assert not run.exists() or not any(run.iterdir())
        return
    assert_usable(run, reference)
    before = snapshot(run)
    if then == "refused":
        assert main(["train", "--resume", str(run)]) == 2
        assert "--overwrite" in capsys.readouterr().err and snapshot(run) == before
        return
    assert main(["train", "--resume", str(run)]) == 0
    assert_same_as_reference(run, reference)


def test_tensorboard_on_a_full_disk(reference, tmp_path, monkeypatch, capsys):
    """TensorBoard writes from a thread of its own: the failure still ends in one line naming its
    folder, without the thread's traceback, and the run continues to the same end."""
    pytest.importorskip("tensorboard")
    run, printed = tmp_path / "run", []
    with monkeypatch.context() as patched:
        patched.setattr(threading, "excepthook", lambda args: printed.append(args.exc_value))
        # the run's events file (not hparams' in a subfolder) is opened again for every append: the first
        # (at the start) goes through, the writer thread meets the full disk at the next
        faults = WriteFaults(patched, re.compile(r"^open .*/tensorboard/events\.out\.tfevents\.[^/]*$"), "full",
                             nth=2)
        assert main(["demo", "--output-dir", str(run), "--set", *KNOBS, "log_with=tensorboard"]) == 4
    assert printed == []                                  # no traceback of the writer thread
    assert failed_with_one_line(capsys, faults, run, "full") == str(run / "tensorboard")
    assert all(any(re.fullmatch(p, described(w, run)) for p in SITES.values()) for w in faults.writes)
    resume_after_a_failed_write(run, what_a_resume_should_do(run), reference, capsys)


@pytest.mark.parametrize("command", ["predict", "evaluate", "ensemble"])
def test_every_write_of_inference_fails_cleanly(command, reference, tmp_path, monkeypatch, capsys):
    """Each write of predict / evaluate / ensemble in turn, on a full disk (and the first write of each
    file in a read-only folder): exit 4 naming the file, the run's files as they were but for whole
    new files, and the command works once the disk has room again."""
    files = set()
    for number, write in enumerate(reference["writes"][command], 1):
        if command != "predict" and "logits" in write:       # the same writes as predict's
            continue
        # a folder is read-only from the start: its first write fails, not a later one
        first = re.sub(r"\.\w+\.tmp$", "", write.split(" ", 1)[1]) not in files
        files.add(re.sub(r"\.\w+\.tmp$", "", write.split(" ", 1)[1]))
        for fault in ("full", "read-only") if first else ("full",):
            run, ens = tmp_path / f"{number}-{fault}" / "run", tmp_path / f"{number}-{fault}" / "ens"
            shutil.copytree(reference["run"], run, ignore=shutil.ignore_patterns("logits"))
            before = snapshot(run)
            with monkeypatch.context() as patched:
                faults = WriteFaults(patched, number, fault)
                assert main(commands(run, ens)[command]) == 4, write
            failed_with_one_line(capsys, faults, run, fault)
            assert leftovers(run) == [] and (not ens.exists() or leftovers(ens) == [])
            after = snapshot(run)
            assert {k: v for k, v in after.items() if k in before} == before          # new files only, whole
            assert main(commands(run, ens)[command]) == 0
            made = {"predict": "run/result.csv", "evaluate": "run/dev_predictions.jsonl", "ensemble": "ens/result.csv"}
            assert (run.parent / made[command]).read_bytes() == (reference["run"].parent / made[command]).read_bytes()
            capsys.readouterr()


@pytest.mark.skipif(not os.environ.get("HW7QA_EVERY_WRITE"), reason="minutes: HW7QA_EVERY_WRITE=1 fails each of "
                    "a run's writes in turn, with each fault (the tests above fail one write of each kind)")
def test_every_write_of_a_run_in_turn(reference, tmp_path, monkeypatch, capsys):
    for number, write in enumerate(reference["writes"]["train"], 1):
        for fault in ("full", "read-only"):
            run = tmp_path / f"{number}-{fault}" / "run"
            with monkeypatch.context() as patched:
                faults = WriteFaults(patched, number, fault)
                assert main(["demo", "--output-dir", str(run), "--set", *KNOBS]) == 4, (number, write, fault)
            failed_with_one_line(capsys, faults, run, fault)
            resume_after_a_failed_write(run, what_a_resume_should_do(run), reference, capsys)


@pytest.mark.parametrize("pattern, fault", [
    (r"safetensors .*/model\.partial/model\.safetensors", "full"),
    (r"open .*/model\.partial/tokenizer_config\.json", "full"),
    (r"rename .*/model", "read-only"),                    # setting the old model aside
    (r"rename .*/model\.partial", "read-only"),            # putting the new one in place
])
def test_a_failed_model_save_keeps_the_previous_model(pattern, fault, tmp_path, monkeypatch, bert_tokenizer):
    model = build_tiny_model(len(bert_tokenizer))
    save_model(model, bert_tokenizer, Config(), tmp_path / "model")
    before = snapshot(tmp_path)
    torch.nn.init.zeros_(model.qa_outputs.weight)                        # a better model, say
    with monkeypatch.context() as patched:
        faults = WriteFaults(patched, re.compile(f"^{pattern}$"), fault)
        with pytest.raises(OSError) as failed:
            save_model(model, bert_tokenizer, Config(), tmp_path / "model")
    assert faults.failed and failed.value.filename == str(tmp_path / "model")
    assert snapshot(tmp_path) == before                                  # the old model, nothing else
    save_model(model, bert_tokenizer, Config(), tmp_path / "model")
    assert not load_file(tmp_path / "model" / "model.safetensors")["qa_outputs.weight"].any()


# ---------------------------------------------------------------- how libraries report a refused write

@pytest.mark.parametrize("error, disk, expected", [
    (OSError(errno.ENOSPC, "No space left on device"), None, errno.ENOSPC),
    (OSError(errno.EDQUOT, "Disk quota exceeded", "/r/model.partial/config.json"), None, errno.EDQUOT),
    (Exception("No space left on device (os error 28)"), None, errno.ENOSPC),                     # tokenizers
    ("safetensors", None, errno.EROFS),
    (RuntimeError("[enforce fail at inline_container.cc:747] . open file failed with strerror: "
                  "Permission denied"), None, errno.EACCES),
    (RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534"), "full", errno.ENOSPC),
    (RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed"), "read-only", errno.EROFS),
    (RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534"), "roomy", errno.EIO),
])
def test_library_errors_of_a_refused_write_become_one_os_error(error, disk, expected, monkeypatch):
    if error == "safetensors":
        from safetensors import SafetensorError
        error = SafetensorError('Error while serializing: I/O error: Read-only file system (os error 30) at path '
                                '"/r/model.partial/.tmpWLi2eV"')
    real = os.statvfs

    def statvfs(path):
        values = list(real(path))
        if disk == "full":
            values[3] = values[4] = 0
        if disk == "read-only":
            values[8] |= os.ST_RDONLY
        return os.statvfs_result(values)
    monkeypatch.setattr(os, "statvfs", statvfs)
    refused = as_refusal(error, "/r/model", "/r/model.partial")
    assert (refused.errno, refused.filename) == (expected, "/r/model")


def test_the_libraries_report_a_refused_write_in_words_only(tmp_path):
    """Why ``refused_errno`` reads error text: safetensors and tokenizers quote the errno, torch's writer raises a
    RuntimeError; none raises or chains an ``OSError`` (in both version sets CI runs)."""
    from safetensors.torch import save_file
    from tokenizers import Tokenizer, models
    missing = tmp_path / "no such folder" / "file"
    tokenizer = Tokenizer(models.WordLevel({"[UNK]": 0}, unk_token="[UNK]"))
    for save in (lambda: save_file({"a": torch.ones(1)}, str(missing)), lambda: tokenizer.save(str(missing)),
                 lambda: torch.save({}, str(missing))):
        with pytest.raises(Exception) as raised:
            save()
        error = raised.value
        assert not isinstance(error, OSError) and not isinstance(error.__cause__ or error.__context__, OSError)
        if not isinstance(error, RuntimeError):             # Rust's: the errno is in the words only
            assert refused_errno(error, missing) == errno.ENOENT


def test_errors_that_are_not_a_refused_write_pass_as_they_are(tmp_path):
    assert as_refusal(ValueError("bad value"), tmp_path) is None
    assert as_refusal(RuntimeError("CUDA error: device-side assert triggered"), tmp_path) is None
    assert as_refusal(OSError("Writer is closed"), tmp_path) is None                   # no errno: its own sentence
    own = OSError(errno.EACCES, "Permission denied", "/elsewhere")                      # names a file of its own
    assert as_refusal(own, tmp_path / "model") is None


def test_an_append_cut_short_is_taken_back(tmp_path, monkeypatch):
    path = tmp_path / "metrics.jsonl"
    append_whole(path, '{"step": 1}\n')
    with monkeypatch.context() as patched:
        WriteFaults(patched, 2, "full")                    # os.open, then the write: half of it lands
        with pytest.raises(OSError) as failed:
            append_whole(path, '{"step": 2, "loss": 1.5}\n')
    assert (failed.value.errno, failed.value.filename) == (errno.ENOSPC, str(path))
    assert path.read_text() == '{"step": 1}\n'

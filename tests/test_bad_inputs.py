"""Bad inputs end in one line that names the real cause, and the README's exit code.

A damaged run folder is named, never used: every file of a real demo run folder, missing, empty,
cut short or overwritten, makes each command that reads it (predict, evaluate, ensemble,
train --resume, ask) exit with 2 and a line naming that file, leaving every file as it was; a damaged
cached logits file is computed again instead. Files a command never reads are shown to be
harmless: with them damaged, the command writes what it writes with the whole folder.
"""
import json
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from conftest import SAMPLE, shared_path
from hw7qa.__main__ import main
from hw7qa.runfolder import list_checkpoints
from hw7qa.tiny import build_tiny_tokenizer

KINDS = ("missing", "empty", "truncated", "garbage")
GARBAGE = random.Random(0).randbytes(4096)
# the files save_model writes; other transformers versions write more (vocab.txt, special_tokens_map.json)
MODEL_FILES = {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "hw7qa_config.json"}
# damage a command may accept: no metrics record yet (a run killed before its first); the copy of
# config.json saved with the model, which nothing reads
ACCEPTED = {("metrics.jsonl", "missing"), ("metrics.jsonl", "empty"), ("model/hw7qa_config.json", "missing")}


def damage(path: Path, kind: str) -> None:
    if kind == "missing":
        path.unlink()
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "truncated":
        path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])
    else:
        path.write_bytes(GARBAGE)


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@dataclass
class Pristine:
    """A finished demo run (2 checkpoints, result.csv, dev_predictions.jsonl, test and dev logits),
    kept whole in ``copy``; each case restores it to ``run`` (the path its config.json names)."""
    base: Path
    files: dict
    test_logits: str
    dev_logits: str
    newest: str
    ensemble_csv: bytes

    run = property(lambda self: self.base / "run")
    copy = property(lambda self: self.base / "pristine")
    other = property(lambda self: self.base / "other")       # the second member of ensembles

    def restore(self) -> None:
        shutil.rmtree(self.run, ignore_errors=True)
        shutil.copytree(self.copy, self.run)                # copy2 keeps mtimes: the logits cache stays valid
        shutil.rmtree(self.base / "ensemble", ignore_errors=True)


def logits_files(run: Path) -> set[str]:
    return {f"logits/{p.name}" for p in (run / "logits").glob("*.npz")}


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    base = tmp_path_factory.mktemp("bad-inputs")
    run = base / "run"
    assert main(["demo", "--output-dir", str(run), "--set", "epochs=1", "save_every=2", "keep_checkpoints=2"]) == 0
    [test_logits] = logits_files(run)
    assert main(["evaluate", str(run)]) == 0
    [dev_logits] = logits_files(run) - {test_logits}
    shutil.copytree(run, base / "pristine")
    shutil.copytree(run, base / "other")
    files = snapshot(run)
    ensemble = ["ensemble", str(run), str(base / "other"), "--split", "test", "--output-dir", str(base / "ensemble")]
    assert main(ensemble) == 0
    assert snapshot(run) == files
    newest = list_checkpoints(run)[-1].relative_to(run).as_posix()
    assert newest == "checkpoints/step-0000005" and (run / "checkpoints" / "step-0000004").is_dir()
    swept = {"config.json", "metrics.jsonl", "result.csv", "dev_predictions.jsonl", "model/model.safetensors",
             "model/tokenizer.json", "model/config.json", f"{newest}/optimizer.bin", f"{newest}/random_states_0.pkl",
             f"{newest}/trainer_state.json"}
    assert swept <= set(files), swept - set(files)
    return Pristine(base, files, test_logits, dev_logits, newest, (base / "ensemble" / "result.csv").read_bytes())


def command_line(command: str, p: Pristine) -> list[str]:
    return {"predict": ["predict", str(p.run)], "evaluate": ["evaluate", str(p.run)],
            "ensemble": ["ensemble", str(p.run), str(p.other), "--split", "test", "--output-dir",
                         str(p.base / "ensemble")],
            "resume": ["train", "--resume", str(p.run)],
            "ask": ["ask", str(p.run), "--question", "甲在哪裡", "--paragraph", "乙說甲在丙"]}[command]


def reads(command: str, rel: str, p: Pristine) -> bool:
    """Whether ``command`` reads the run folder's file ``rel`` (resume ends with a predict)."""
    if rel == "config.json" or rel.startswith("model/"):
        return True
    if command == "ask":                                  # the model and settings only, no cache
        return False
    if command == "resume" and (rel == "metrics.jsonl" or rel.startswith(p.newest + "/")):
        return True
    return rel == (p.dev_logits if command == "evaluate" else p.test_logits)


def expected_exit(command: str, rel: str, kind: str, p: Pristine) -> int | None:
    """2: refused, naming ``rel``; 0: harmless (or a cache computed again); None: either, for files
    only other library versions write."""
    if not reads(command, rel, p) or rel.startswith("logits/") or (rel, kind) in ACCEPTED:
        return 0
    if rel.startswith("model/") and rel.split("/", 1)[1] not in MODEL_FILES:
        return None
    return 2


def harmless_problems(command: str, damaged: dict, before: dict, after: dict, p: Pristine) -> list[str]:
    """What differs from a run of ``command`` on the whole folder: every file as there (what it writes,
    result.csv, dev_predictions.jsonl, the same bytes), a damaged file as it was or as there, a
    damaged logits file it reads computed again, no new file."""
    problems = [f"new file {rel}" for rel in set(after) - set(p.files) - set(before)]
    for rel, original in p.files.items():
        now = after.get(rel)
        if rel in damaged and rel.startswith("logits/") and reads(command, rel, p):
            with np.load(p.run / rel) as new, np.load(p.copy / rel) as old:
                for key in ("starts", "ends", "lengths"):
                    np.testing.assert_allclose(new[key], old[key], rtol=1e-5, atol=1e-6, err_msg=rel)
        elif rel in damaged:
            if now not in (before.get(rel), original):
                problems.append(f"{rel} changed")
        elif now != original:
            problems.append(f"{rel} differs from the whole folder's")
    if command == "ensemble" and (p.base / "ensemble" / "result.csv").read_bytes() != p.ensemble_csv:
        problems.append("the ensemble's result.csv differs")
    return problems


def run_case(command: str, damaged: dict, expected: int | None, p: Pristine, capsys) -> list[str]:
    """Damage ``damaged`` ({rel: kind}) in a fresh copy of the run, run ``command``; what went wrong."""
    p.restore()
    for rel, kind in damaged.items():
        damage(p.run / rel, kind)
    before = snapshot(p.run)
    capsys.readouterr()
    code = main(command_line(command, p))
    err = capsys.readouterr().err
    case = f"{command} with {damaged}: exit {code}"
    if "Traceback" in err:
        return [f"{case}: a traceback"]
    if code == 2 and expected in (2, None):
        named = [rel for rel in damaged if str(p.run / rel) in (err.splitlines() or [""])[-1]]
        unchanged = snapshot(p.run) == before and not (p.base / "ensemble").exists()
        return [] if named and unchanged else [f"{case}: {'files changed' if named else 'not named'}: {err[-300:]}"]
    if code == 0 and expected in (0, None):
        return [f"{case}: {problem}" for problem in harmless_problems(command, damaged, before, snapshot(p.run), p)]
    return [f"{case}, expected {expected}: {err.strip().splitlines()[-1:]}"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("command", ["predict", "evaluate", "ensemble", "resume", "ask"])
def test_every_file_of_a_run_folder_damaged(pristine, command, kind, capsys):
    """Each file the command reads, damaged alone; all the files it never reads, damaged together."""
    problems = []
    unread = {rel: kind for rel in pristine.files if not reads(command, rel, pristine)}
    for rel in pristine.files:
        if reads(command, rel, pristine):
            problems += run_case(command, {rel: kind}, expected_exit(command, rel, kind, pristine), pristine, capsys)
    problems += run_case(command, unread, 0, pristine, capsys)
    assert not problems, "\n".join(problems)


# ---------------------------------------------------------------- the message names the real cause

def open_quote_csv(path: Path, ids: list, line: int) -> None:
    """A result.csv for ``ids`` whose answer on ``line`` starts a quote that is never closed."""
    rows = ["ID,Answer"] + [f"{qid},{'甲乙丙丁' * 10}" for qid in ids]
    rows[line - 1] = rows[line - 1].replace(",", ',"', 1)
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")


@pytest.fixture(scope="module")
def inputs(pristine, tmp_path_factory):
    """Bad inputs, made once: folders where files belong, a model folder without a model, run
    folders whose model and tokenizer do not belong together, CSVs with a quote left open (at the
    sample's size and at the 2021 test file's, 3,493 questions, where csv hits its field size limit)."""
    base = tmp_path_factory.mktemp("inputs")
    (base / "folder").mkdir()
    shutil.copy(SAMPLE / "hw7_test.json", base / "folder" / "hw7_test.json")
    build_tiny_tokenizer(["甲乙"]).save_pretrained(base / "tokenizer-only")
    (base / "no-weights").mkdir()
    shutil.copy(pristine.copy / "model" / "config.json", base / "no-weights" / "config.json")
    for name in ("no-model", "small-embedding", "other-tokenizer", "old-checkpoint"):
        shutil.copytree(pristine.copy, base / name)
    shutil.rmtree(base / "no-model" / "model")
    config = json.loads((pristine.copy / "model" / "config.json").read_text(encoding="utf-8"))
    (base / "small-embedding" / "model" / "config.json").write_text(json.dumps({**config, "vocab_size": 100}))
    build_tiny_tokenizer(["甲"]).save_pretrained(base / "other-tokenizer" / "model")
    checkpoint = base / "old-checkpoint" / pristine.newest       # as written before checkpoints listed their files
    state = json.loads((checkpoint / "trainer_state.json").read_text(encoding="utf-8"))
    (checkpoint / "trainer_state.json").write_text(json.dumps({k: v for k, v in state.items() if k != "files"}))
    damage(checkpoint / "optimizer.bin", "truncated")
    test = json.loads((SAMPLE / "hw7_test.json").read_text(encoding="utf-8"))
    open_quote_csv(base / "open-quote.csv", [q["id"] for q in test["questions"]], line=4)
    many = [{**test["questions"][0], "id": i} for i in range(3493)]
    (base / "big.json").write_text(json.dumps({**test, "questions": many}, ensure_ascii=False), encoding="utf-8")
    open_quote_csv(base / "open-quote-big.csv", list(range(3493)), line=5)
    return base


TRAIN = ["train", "--config", "demo", "--set", "output_dir={base}/out"]
CASES = [  # command line, exit code, the words of the message
    (TRAIN + ["train_file="], 2, "error: train_file is empty; give the path of an HW7 or DRCD JSON file"),
    (TRAIN + ["train_file={base}/folder"], 2, "error: train_file='{base}/folder' is a folder; give a JSON file in it "
                                              "(hw7_test.json)"),
    (TRAIN + ["dev_file=nope.json"], 2, "error: dev_file='nope.json': no such file (a relative path, read from the "
                                        "current folder {cwd})"),
    (TRAIN + ["epochs=0", "--set", "lr=1"], 2, "error: epochs must be at least 1, got 0"),   # both --set groups
    (TRAIN + ["lr=1", "--set", "lr=2"], 2, "error: lr is set twice ('1' and '2'); give each setting once"),
    (["train", "--config", "{base}/folder"], 2, "error: --config {base}/folder is a folder; give a JSON file or a "
                                                "preset's name"),
    (TRAIN + ["model_name={base}/tokenizer-only"], 2, "error: model_name='{base}/tokenizer-only': the folder has no "
                                                      "config.json and no weights (model.safetensors or"),
    (TRAIN + ["model_name={base}/no-weights"], 2, "error: model_name='{base}/no-weights': the folder has no weights "
                                                  "(model.safetensors or"),
    (["train", "--resume", "{run}", "--overwrite"], 2, "error: --resume continues the run and --overwrite deletes it"),
    (["train", "--resume", "{run}/result.csv"], 2, "error: {run}/result.csv: a file, not a run folder"),
    (["train", "--resume", "{base}/no-model"], 2, "error: {base}/no-model/model is missing, but step-0000005 says the "
                                                  "best model so far was saved there"),
    (["train", "--resume", "{base}/old-checkpoint"], 2, "error: {base}/old-checkpoint/checkpoints/step-0000005/"
                                                        "optimizer.bin is damaged: not a whole torch file"),
    (["predict", "{base}/nope"], 2, "error: {base}/nope: no such folder; give a run folder made by 'train'"),
    (["predict", "{base}/no-model"], 2, "error: {base}/no-model/model is missing; is this a run folder made by"),
    (["predict", "{base}/small-embedding"], 2, "error: {base}/small-embedding/model/tokenizer.json does not belong "
                                               "to the model beside it: 834 tokens, but config.json gives the model "
                                               "100 embedding rows"),
    (["predict", "{base}/other-tokenizer"], 2, "error: {base}/other-tokenizer/model/tokenizer.json does not belong "
                                               "to the model beside it: 78 tokens"),
    (["predict", "{run}", "--file", "{base}/folder"], 2, "error: --file='{base}/folder' is a folder; give a JSON file"),
    (["evaluate", "{run}", "--file", "{sample}/hw7_test.json"], 2, "no answer in any of its 13 questions (a test "
                                                                   "file?)"),
    (["check", "{base}/folder", "{sample}/hw7_test.json"], 2, "error: {base}/folder is a folder; give a CSV file"),
    (["check", "{run}/result.csv", "{base}/folder"], 2, "error: {base}/folder is a folder; give a JSON file"),
    (["check", "{base}/nope.csv", "{sample}/hw7_test.json"], 2, "error: {base}/nope.csv: no such file"),
    (["check", "{base}/open-quote.csv", "{sample}/hw7_test.json"], 1, 'line 4: a quote (") opened here runs on to '
                                                                      'line 14, making those lines one row'),
    (["check", "{base}/open-quote-big.csv", "{base}/big.json"], 1, 'line 5: a quote (") opened here is never closed'),
    (["submit", "{base}/nope"], 2, "error: {base}/nope: no such run folder or CSV file"),
]


def test_bad_inputs_name_their_cause(pristine, inputs, monkeypatch, capsys):
    """Each bad input of CASES: its exit code, its words, no traceback, and no file written."""
    monkeypatch.chdir(Path(__file__).resolve().parent.parent)     # where the demo preset's data paths lead
    names = {"base": inputs, "run": pristine.copy, "sample": SAMPLE, "cwd": Path.cwd()}
    problems = []
    for argv, code, words in CASES:
        before = snapshot(inputs), snapshot(pristine.copy)
        capsys.readouterr()
        try:
            got = main([arg.format(**names) for arg in argv])
        except Exception as e:              # reported with the other cases
            got = f"{type(e).__name__}: {e}"
        out, err = capsys.readouterr()
        changed = (snapshot(inputs), snapshot(pristine.copy)) != before
        if got != code or words.format(**names) not in out + err or "Traceback" in err or changed:
            problems.append(f"{argv}: exit {got} (expected {code}){', files changed' * changed}: "
                            f"{(out + err).strip()[-300:]}")
    assert not problems, "\n".join(problems)


def test_an_open_quote_in_a_result_csv_for_the_2021_test_file(tmp_path, capsys):
    """At real size the quote takes more than csv's field size limit (a traceback before)."""
    test_file = shared_path("data/hw7-2021/hw7_test.json")
    ids = [q["id"] for q in json.loads(test_file.read_text(encoding="utf-8"))["questions"]]
    open_quote_csv(tmp_path / "result.csv", ids, line=5)
    assert main(["check", str(tmp_path / "result.csv"), str(test_file)]) == 1
    out = capsys.readouterr().out
    assert out.startswith(f'{tmp_path / "result.csv"}: line 5: a quote (") opened here is never closed, and takes '
                          'the rest of the file into one field (field larger than field limit (131072))')

"""A run folder as a whole: train then predict; predict, evaluate or ensemble saved runs.

Used by the command line and the notebook alike. Under ``accelerate launch`` with several
processes, inference is shared between them and only the main process writes files or prints.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import shlex
import time
import zipfile
from pathlib import Path

import numpy as np
import torch

from .compiling import compile_model
from .config import apply_overrides, check_resume, load_config
from .data import QAData, load_qa_file
from .decode import Prediction, decode_predictions, window_logits
from .devices import accelerator_for, check_divisible, processes, resolve_precision, tf32_matmuls
from .ensemble import ensemble_predictions, vote_predictions
from .files import atomic_write
from .metrics import score
from .integrity import check_file
from .models import check_max_length, load_run_model, run_tokenizer
from .pipeline import pipelined_predictions
from .report import unknown_characters, write_dev_predictions
from .submission import SubmissionError, check_result_csv, write_result_csv
from .windows import Encoded, encode, eval_windows, with_stride

PACKAGE = Path(__file__).resolve().parent
# The presets and the demo's sample data: hw7qa/presets and hw7qa/sample in an installed package
# (pyproject.toml maps them there), configs/ and data/sample/ in a checkout of the repository.
PRESETS = PACKAGE / "presets" if (PACKAGE / "presets").is_dir() else PACKAGE.parent / "configs"
SAMPLE = PACKAGE / "sample" if (PACKAGE / "sample").is_dir() else PACKAGE.parent / "data" / "sample"


@contextlib.contextmanager
def inference_processes(cfg):
    """An ``Accelerator`` when started by ``accelerate launch`` with several processes (each then
    runs an equal part of every batch of ``eval_batch_size`` windows), else None: inference runs in
    this process alone. TF32 matmuls while it lasts if ``cfg.tf32``."""
    with tf32_matmuls(cfg.tf32):
        if processes().num_processes == 1:
            yield None
            return
        with accelerator_for(cfg.mixed_precision) as accelerator:
            check_divisible(cfg, accelerator.num_processes)
            yield accelerator


def is_main(accelerator) -> bool:
    return accelerator is None or accelerator.is_main_process


def logits_key(run_dir: Path, data: QAData, cfg) -> str:
    """What the window logits of a run depend on: the questions and paragraphs, the window settings,
    the precision of the forward passes and the saved model file (its size and modification time)."""
    content = hashlib.sha1(json.dumps([[(q.id, q.question_text, q.paragraph_id) for q in data.questions],
                                       data.paragraphs], ensure_ascii=False, default=str).encode()).hexdigest()
    model_files = sorted((f.name, f.stat().st_size, f.stat().st_mtime_ns)
                         for f in (run_dir / "model").glob("*") if f.suffix in (".safetensors", ".bin"))
    # "float32 head": logits cached before the QA head's logits were computed in float32 are not reused
    settings = [*dataclasses.astuple(cfg.windows), resolve_precision(cfg.mixed_precision), "float32 head"]
    return hashlib.sha1(json.dumps([content, model_files, settings]).encode()).hexdigest()[:16]


def split_logits(starts: np.ndarray, ends: np.ndarray, lengths: list[int]) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per window ``(starts[a:b], ends[a:b])``, window ``i`` being the next ``lengths[i]`` positions
    of the concatenated arrays; views, so all windows together hold the two arrays once."""
    cuts = np.cumsum([0] + lengths)
    return [(starts[a:b], ends[a:b]) for a, b in zip(cuts, cuts[1:])]


def logits_path(run_dir: str | Path, data: QAData, cfg) -> Path:
    """Where the window logits of the run's model on ``data`` with ``cfg``'s windows are cached."""
    return Path(run_dir) / "logits" / f"{logits_key(Path(run_dir), data, cfg)}.npz"


def save_logits(path: Path, logits: list[tuple[np.ndarray, np.ndarray]]) -> None:
    """The window logits concatenated, with each window's length, written whole or not at all."""
    with atomic_write(path, "wb") as f:
        np.savez(f, starts=np.concatenate([s for s, _ in logits]), ends=np.concatenate([e for _, e in logits]),
                 lengths=np.array([len(s) for s, _ in logits]))


def run_model(run_dir: Path, cfg, accelerator=None):
    """The run's saved model on the inference device, compiled if ``cfg.compile``."""
    model = load_run_model(run_dir)
    check_max_length(model.config, cfg.max_length)
    model.to(accelerator.device if accelerator else "cuda" if torch.cuda.is_available() else "cpu")
    return compile_model(model, cfg.compile)


def run_logits(run_dir: str | Path, cfg, data: QAData, accelerator=None, desc: str = "inference", tokenizer=None,
               enc: Encoded | None = None):
    """``(enc, windows, logits)`` of the run's model on ``data`` with ``cfg``'s windows.

    The logits are saved in ``<run>/logits/<key>.npz`` and read back the next time the same model
    meets the same questions with the same window settings (``logits_key``), so evaluating,
    predicting and ensembling a run again does not run the model again; a cached file that cannot
    be read is computed again and replaced. ``tokenizer``: the run's, if the caller has loaded it
    already; ``enc``: ``data`` already tokenized with it at ``cfg``'s windows.
    """
    run_dir = Path(run_dir)
    tokenizer = tokenizer or run_tokenizer(run_dir, cfg)
    enc = enc or encode(data, tokenizer, cfg.windows)
    windows = eval_windows(enc)
    path = logits_path(run_dir, data, cfg)
    cached = read_cached_logits(path, windows.length.tolist())
    if cached is not None:
        return enc, windows, cached
    model = run_model(run_dir, cfg, accelerator)
    logits = window_logits(model, tokenizer, windows, cfg.eval_batch_size, cfg.mixed_precision, desc, accelerator)
    if is_main(accelerator):
        save_logits(path, logits)
    return enc, windows, logits


def read_cached_logits(path: Path, lengths: list[int]) -> list[tuple[np.ndarray, np.ndarray]] | None:
    """The windows' logits saved at ``path`` for windows of these ``lengths``; None if there are none,
    or if the file was written for other windows or cannot be read whole (a cache: it is computed again)."""
    if not path.exists():
        return None
    try:
        with np.load(path) as saved:
            # each access of an NpzFile key reads the whole array again: read once, hand out views
            starts, ends, saved_lengths = saved["starts"], saved["ends"], saved["lengths"].tolist()
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile):   # numpy's errors for a damaged file
        return None
    if saved_lengths != lengths or not starts.shape == ends.shape == (sum(lengths),):
        return None
    return split_logits(starts, ends, lengths)


def stride_logits(run_dir: str | Path, cfg, data: QAData, accelerator=None, desc: str = "inference", tokenizer=None
                  ) -> list[tuple]:
    """``run_logits`` once per ``cfg.inference_strides`` (``doc_stride``, then ``tta_strides``), each
    cached on its own; ``vote_predictions`` turns them into answers. The file is tokenized once."""
    tokenizer = tokenizer or run_tokenizer(run_dir, cfg)
    enc = encode(data, tokenizer, cfg.windows)
    return [run_logits(run_dir, dataclasses.replace(cfg, doc_stride=stride), data, accelerator,
                       desc=desc if stride == cfg.doc_stride else f"{desc} (stride {stride})", tokenizer=tokenizer,
                       enc=with_stride(enc, stride))
            for stride in cfg.inference_strides]


def stride_predictions(run_dir: str | Path, cfg, data: QAData, accelerator=None, desc: str = "inference",
                       tokenizer=None) -> list[Prediction]:
    """The run's answers on ``data`` at each of ``cfg.inference_strides``, voted
    (``vote_predictions``). With ``inference_chunk`` set and no stride's logits cached yet, the
    file goes through the pipeline by chunks (``pipeline.py``) and each stride's logits are cached
    as ``run_logits`` caches them; else through ``stride_logits``."""
    run_dir = Path(run_dir)
    tokenizer = tokenizer or run_tokenizer(run_dir, cfg)
    strides = cfg.inference_strides
    paths = [logits_path(run_dir, data, dataclasses.replace(cfg, doc_stride=stride)) for stride in strides]
    if not cfg.inference_chunk or any(path.exists() for path in paths):
        return vote_predictions(stride_logits(run_dir, cfg, data, accelerator, desc, tokenizer), cfg.decoding)
    model = run_model(run_dir, cfg, accelerator)
    predictions, logits = pipelined_predictions(model, tokenizer, data, cfg, strides, accelerator, desc)
    if is_main(accelerator):
        for path, member in zip(paths, logits):
            save_logits(path, member)
    return predictions


def predict_test(run_dir: str | Path, test_file: str = "", out: str = "", overrides: list[str] | None = None) -> Path:
    """Answer ``test_file`` (default: the run's) with the run's model (at each of the config's
    ``inference_strides``, voted); write and check the CSV.

    The CSV goes to ``out`` if given, else to ``output_path``: answering another file never
    replaces the run's own ``result.csv``. Raises ``SubmissionError`` if the CSV fails its check.
    """
    cfg = run_config(run_dir, overrides)
    data = load_data_of(cfg, "test", test_file, run_dir)
    with inference_processes(cfg) as accelerator:
        predictions = stride_predictions(run_dir, cfg, data, accelerator, desc="test")
        path = out or output_path(run_dir, "result.csv", cfg.test_file, test_file)
        return write_and_check(data, predictions, path, accelerator)


def output_path(run_dir: str | Path, name: str, own_file: str, given_file: str = "") -> Path:
    """Where predict (``result.csv``) and evaluate (``dev_predictions.jsonl``) write without ``--out``:
    ``<run>/<name>`` for the run's own file (``given_file`` empty or the same file, paths resolved),
    ``<run>/<name's stem>-<file stem><suffix>`` for any other, so it never replaces the run's own."""
    if not given_file or (own_file and Path(given_file).resolve() == Path(own_file).resolve()):
        return Path(run_dir) / name
    return Path(run_dir) / f"{Path(name).stem}-{Path(given_file).stem}{Path(name).suffix}"


def write_and_check(data: QAData, predictions: list[Prediction], path: str | Path, accelerator=None) -> Path:
    """Write the answers as a result.csv at ``path`` and check it (main process only); raises
    ``SubmissionError`` with every problem if the written file is not a valid submission."""
    if is_main(accelerator):
        path = write_result_csv(data, [p.answer for p in predictions], path)
        print(f"wrote {path} ({len(predictions)} answers)")
        problems = check_result_csv(path, data)
        if problems:
            raise SubmissionError(path, problems)
    return Path(path)


def evaluate_run(run_dir: str | Path, dev_file: str = "", overrides: list[str] | None = None
                 ) -> tuple[dict, list[Prediction]]:
    """Dev EM and F1 of the run's model on ``dev_file`` (default: the run's), and its predictions.

    Also writes ``<run>/dev_predictions.jsonl`` (``dev_predictions-<file stem>.jsonl`` for another file,
    see ``output_path``) and prints how the wrong answers are wrong.
    """
    cfg = run_config(run_dir, overrides)
    data = load_data_of(cfg, "dev", dev_file, run_dir, need_answers=True)
    tokenizer = run_tokenizer(run_dir, cfg)
    with inference_processes(cfg) as accelerator:
        predictions = stride_predictions(run_dir, cfg, data, accelerator, desc="dev", tokenizer=tokenizer)
        path = output_path(run_dir, "dev_predictions.jsonl", cfg.dev_file, dev_file)
        scores = report_dev(data, predictions, tokenizer, path, accelerator)
    return scores, predictions


def report_dev(data: QAData, predictions: list[Prediction], tokenizer, path: Path, accelerator=None) -> dict:
    """EM and F1; on the main process also ``path`` (dev_predictions.jsonl) and a printed breakdown."""
    scores = score([p.answer for p in predictions], [q.answer_text for q in data.questions])
    if is_main(accelerator):
        unknown = unknown_characters(tokenizer, [q.answer_text for q in data.questions])
        kinds = write_dev_predictions(path, data, predictions, unknown)
        print(f"{data.path}: {len(data.questions)} questions, EM {scores['em']:.4f}, F1 {scores['f1']:.4f}")
        print("answers: " + ", ".join(f"{kind} {n}" for kind, n in sorted(kinds.items(), key=lambda kv: -kv[1]))
              + f"  (details: {path})")
    return scores


def load_data_of(cfg, split: str, given: str = "", run_dir: str | Path = "", need_answers: bool = False) -> QAData:
    """``given`` (``--file``) if set, else the run's dev_file or test_file, loaded; an error names which."""
    path = given or getattr(cfg, f"{split}_file")
    if not path:
        raise ValueError(f"no {split} file: the run {run_dir} has no {split}_file in its config; give one with --file")
    return load_qa_file(path, need_answers, setting="--file" if given else f"{split}_file")


def run_config(run_dir: str | Path, overrides: list[str] | dict | None = None):
    """The run's ``config.json`` with ``overrides`` applied, once ``run_dir`` is known to be a run
    folder and the file whole (``model/hw7qa_config.json`` holds a copy to restore it from)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        what = "a file, not a run folder" if run_dir.exists() else "no such folder"
        raise FileNotFoundError(f"{run_dir}: {what}; give a run folder made by 'train'")
    path, copy = run_dir / "config.json", run_dir / "model" / "hw7qa_config.json"
    if not path.exists() and not copy.exists():
        raise FileNotFoundError(f"{run_dir} holds no config.json: is this a run folder made by 'train'?")
    check_file(path, f"copy {copy} over it (the same settings, saved with the model)" if copy.is_file() else
               "restore it from a copy of the run")
    return load_config(path, overrides)


def ensemble_runs(run_dirs: list[str | Path], split: str = "dev", data_file: str = "", output_dir: str = "",
                  method: str = "auto") -> tuple[dict | None, list[Prediction]]:
    """Combine the models of ``run_dirs`` (see ``ensemble.py``) on the dev or test file.

    The file is ``data_file`` or the first run's dev_file/test_file; decoding settings (n_best,
    max_answer_length, balance_quotes) are the first run's. ``dev``: prints each member's EM/F1 and
    the ensemble's, writes ``<output_dir>/dev_predictions.jsonl`` and returns the ensemble's scores.
    ``test``: writes ``<output_dir>/result.csv``. Each member's logits are cached in its run folder.
    """
    if split not in ("dev", "test"):
        raise ValueError(f"split={split!r}; choose dev or test")
    if len(run_dirs) < 2:
        raise ValueError("an ensemble needs at least two run folders")
    cfgs = [run_config(run_dir) for run_dir in run_dirs]
    data = load_data_of(cfgs[0], split, data_file, run_dirs[0], need_answers=split == "dev")
    tokenizers = [run_tokenizer(run_dir, cfg) for run_dir, cfg in zip(run_dirs, cfgs)]
    output_dir = Path(output_dir or Path("outputs") / f"ensemble-{time.strftime('%Y%m%d-%H%M%S')}")
    with inference_processes(cfgs[0]) as accelerator:
        members = [run_logits(run_dir, cfg, data, accelerator, desc=f"{Path(run_dir).name}", tokenizer=tokenizer)
                   for run_dir, cfg, tokenizer in zip(run_dirs, cfgs, tokenizers)]
        predictions, how = ensemble_predictions(members, cfgs[0].decoding, method)
        if is_main(accelerator):
            output_dir.mkdir(parents=True, exist_ok=True)
            print(f"ensemble of {len(run_dirs)} runs on {data.path}: {how}")
        if split == "test":
            write_and_check(data, predictions, output_dir / "result.csv", accelerator)
            return None, predictions
        if is_main(accelerator):
            for i, (run_dir, cfg, member) in enumerate(zip(run_dirs, cfgs, members)):
                answers = [p.answer for p in decode_predictions(*member, cfg.decoding)]
                member_scores = score(answers, [q.answer_text for q in data.questions])
                print(f"  #{i + 1} {run_dir}: EM {member_scores['em']:.4f}  F1 {member_scores['f1']:.4f}")
        scores = report_dev(data, predictions, tokenizers[0], output_dir / "dev_predictions.jsonl", accelerator)
    return scores, predictions


def train_and_predict(cfg, resume: bool = False, overwrite: bool = False) -> Path:
    """Train (or, with ``resume``, continue ``cfg.output_dir``); then, if a test file is configured,
    write the run's result.csv."""
    from .train import train
    run_dir = train(cfg, resume=resume, overwrite=overwrite)
    if cfg.test_file:
        predict_test(run_dir)
    return run_dir


def resume_config(run_dir: str | Path, overrides: list[str] | dict | None = None):
    """The config an interrupted run was started with (``<run>/config.json``), pointed at that run
    folder, with ``overrides`` applied; refused (``check_resume``) if an override would change what
    the run trains, or move it to another ``output_dir``."""
    saved = dataclasses.replace(run_config(run_dir), output_dir=str(run_dir))
    cfg = check_resume(saved, apply_overrides(saved, overrides or []), run_dir)
    if Path(cfg.output_dir).resolve() != Path(run_dir).resolve():
        raise ValueError(f"a resume continues {run_dir} in its own folder, not in output_dir={cfg.output_dir}; "
                         f"leave output_dir out, or start a new run there: python -m hw7qa train --config "
                         f"{shlex.quote(str(Path(run_dir) / 'config.json'))} --set "
                         f"{shlex.quote(f'output_dir={cfg.output_dir}')}")
    return cfg


def preset_path(name_or_path: str | None) -> Path | None:
    """A JSON file as given, or the shipped preset of that name (``bert-base`` or ``bert-base.json``)."""
    if not name_or_path or Path(name_or_path).is_file():
        return Path(name_or_path) if name_or_path else None
    preset = PRESETS / Path(name_or_path).with_suffix(".json").name
    if preset.is_file() and Path(name_or_path).parent == Path("."):
        return preset
    names = ", ".join(sorted(p.stem for p in PRESETS.glob("*.json")))
    if Path(name_or_path).is_dir():
        raise ValueError(f"--config {name_or_path} is a folder; give a JSON file or a preset's name ({names})")
    raise FileNotFoundError(f"{name_or_path}: no such file, and no preset of that name ({names})")


def demo_config(output_dir: str = "", overrides: list[str] | None = None):
    """The demo preset with its data files pointed at the shipped sample, so that the demo runs
    from any folder, installed or in a checkout."""
    cfg = load_config(PRESETS / "demo.json", overrides)
    paths = {k: str(SAMPLE / Path(getattr(cfg, k)).name) for k in ("train_file", "dev_file", "test_file")
             if getattr(cfg, k)}
    return dataclasses.replace(cfg, **paths, output_dir=output_dir or cfg.output_dir)

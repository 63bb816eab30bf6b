"""A model's answers to a file of questions: the one inference path, for a saved run or a model in hand.

    reader = Reader(cfg, tokenizer, model)              # or open_run(run_dir): the model loaded when needed
    predictions = answers(reader, data)                 # encode once, each stride, window logits, vote

A run folder's ``Reader`` caches each stride's window logits in ``<run>/logits/<key>.npz``. Under
``accelerate launch`` every batch is shared between the processes; only the main process writes or prints.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from .config import Config, run_config
from .data import QAData, load_qa_file
from .decode import Prediction, decode_predictions, ensemble_predictions, vote_predictions
from .files import atomic_write
from .metrics import score
from .models import (accelerator_for, check_divisible, check_max_length, compile_model, inference_autocast,
                     load_run_model, processes, resolve_precision, run_tokenizer, tf32_matmuls)
from .report import unknown_characters, write_dev_predictions
from .submission import SubmissionError, check_result_csv, write_result_csv
from .windows import Windows, encode, eval_windows, padding_of, with_stride

Logits = list[tuple[np.ndarray, np.ndarray]]       # per window: start and end logits, float32, unpadded


# ---------------------------------------------------------------- the forward passes

def batch_rows(windows: Windows, batch_size: int, rank: int = 0, world: int = 1) -> list[np.ndarray]:
    """The windows of each batch process ``rank`` of ``world`` runs: all windows sorted by length, longest first (ties
    in window order), cut into batches of ``batch_size`` in total, each process taking an equal part of every batch."""
    order = np.argsort(-windows.length, kind="stable")
    share = -(-batch_size // world)
    batches = [order[b:b + batch_size][rank * share:(rank + 1) * share] for b in range(0, len(order), batch_size)]
    return [rows for rows in batches if len(rows)]        # the last batch may leave a process nothing


def to_device(array: np.ndarray, device: torch.device) -> torch.Tensor:
    """``array`` as a tensor on ``device``, the copy queued without waiting for it."""
    tensor = torch.from_numpy(array)
    if device.type == "cpu":
        return tensor
    return tensor.pin_memory().to(device, non_blocking=True)   # pageable memory could wait for queued GPU work


def logits_to_host(result) -> tuple[torch.Tensor, torch.Event | None]:
    """A forward pass's logits as one float32 ``(2, batch, length)`` CPU tensor, and an event to
    wait on before reading it (None on the CPU)."""
    logits = torch.stack((result.start_logits, result.end_logits)).float()
    host = logits.to("cpu", non_blocking=True)     # on a GPU only queued behind the forward pass
    if logits.device.type == "cpu":
        return host, None
    landed = torch.Event(device=logits.device)
    landed.record()
    return host, landed


def unpack_logits(rows: np.ndarray, host: torch.Tensor, landed, length: np.ndarray, pad_left: bool
                  ) -> list[tuple[int, np.ndarray, np.ndarray]]:
    """``(window, start logits, end logits)`` of each of ``rows``, cut to the window's length, once
    ``landed``; each window's arrays are views of one copy of the batch."""
    if landed is not None:
        landed.synchronize()
    batch = host.numpy().copy()        # out of the (pinned) transfer memory, which the next batch reuses
    out = []
    for row, (i, n) in enumerate(zip(rows.tolist(), length[rows].tolist())):
        first = batch.shape[2] - n if pad_left else 0
        out.append((i, batch[0, row, first:first + n], batch[1, row, first:first + n]))
    return out


def window_logits(model, tokenizer, windows: Windows, batch_size: int, precision: str = "no",
                  desc: str = "inference", accelerator=None) -> Logits:
    """Start and end logits of every window, in the order of ``windows``, autocast at ``precision``;
    ``batch_size`` windows a batch in total, shared among an ``accelerator``'s processes, which all get
    every logit back. ``model``: the unwrapped model, not a DDP wrapper."""
    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator else (0, 1)
    padding = padding_of(tokenizer)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    mine, previous = [], None
    with torch.inference_mode(), inference_autocast(precision, device):
        # leave=False, position=0: on training's bar line, cleared when done (a nested bar floods a notebook)
        for rows in tqdm(batch_rows(windows, batch_size, rank, world), desc=desc, unit="batch", leave=False,
                         position=0, disable=rank != 0):
            inputs = {k: to_device(v, device) for k, v in windows.model_inputs(rows, **padding).items()}
            # a GPU only queues the forward pass: the previous batch is unpacked while this one runs
            this = (rows, *logits_to_host(model(**inputs)))
            if previous is not None:
                mine += unpack_logits(*previous, windows.length, padding["pad_left"])
            previous = this
        if previous is not None:
            mine += unpack_logits(*previous, windows.length, padding["pad_left"])
    model.train(was_training)
    if world > 1:
        from accelerate.utils import gather_object
        mine = gather_object(mine)
    out: list = [None] * len(windows)
    for i, start, end in mine:
        out[i] = (start, end)
    return out


# ---------------------------------------------------------------- a reader, and the one inference path

@dataclass
class Reader:
    """What answers questions: settings, tokenizer and model. With ``run_dir`` the model is the run's,
    loaded at first use (a run whose logits are all cached never loads it), and window logits are
    cached in ``<run>/logits`` unless ``cache`` is off."""
    cfg: Config
    tokenizer: Any
    model: Any = None
    run_dir: Path | None = None
    accelerator: Any = None
    cache: bool = True

    def loaded_model(self):
        if self.model is None:
            self.model = load_run_model(self.run_dir)
            check_max_length(self.model.config, self.cfg.max_length)
            device = self.accelerator.device if self.accelerator else "cuda" if torch.cuda.is_available() else "cpu"
            self.model = compile_model(self.model.to(device), self.cfg.compile)
        return self.model


def open_run(run_dir: str | Path, cfg: Config, accelerator=None, cache: bool = True) -> Reader:
    """A ``Reader`` of the run's saved model and tokenizer, with ``cfg`` (the run's, ``run_config``)."""
    return Reader(cfg, run_tokenizer(run_dir, cfg), run_dir=Path(run_dir), accelerator=accelerator, cache=cache)


def stride_logits(reader: Reader, data: QAData, strides: list[int] | None = None, enc=None,
                  desc: str = "inference") -> list[tuple]:
    """``(enc, windows, logits)`` of ``data`` at each of ``strides`` (default: the config's
    ``inference_strides``). ``enc``: ``data`` already tokenized with the reader's tokenizer."""
    cfg = reader.cfg
    enc = enc or encode(data, reader.tokenizer, cfg.windows)
    members = []
    for stride in strides or cfg.inference_strides:
        at_stride = with_stride(enc, stride)     # tokenizing does not depend on the stride
        windows = eval_windows(at_stride)
        path = logits_path(reader.run_dir, data, cfg, stride) if reader.run_dir and reader.cache else None
        logits = read_cached_logits(path, windows.length.tolist()) if path else None
        if logits is None:
            named = desc if stride == cfg.doc_stride else f"{desc} (stride {stride})"
            logits = window_logits(reader.loaded_model(), reader.tokenizer, windows, cfg.eval_batch_size,
                                   cfg.mixed_precision, named, reader.accelerator)
            if path and is_main(reader.accelerator):
                save_logits(path, logits)
        members.append((at_stride, windows, logits))
    return members


def answers(reader: Reader, data: QAData, strides: list[int] | None = None, enc=None,
            desc: str = "inference") -> list[Prediction]:
    """One ``Prediction`` per question of ``data``: ``stride_logits`` voted (``vote_predictions``)."""
    return vote_predictions(stride_logits(reader, data, strides, enc, desc), reader.cfg.decoding)


# ---------------------------------------------------------------- the logits cache

def logits_path(run_dir: Path, data: QAData, cfg: Config, stride: int) -> Path:
    """``<run>/logits/<key>.npz``, the key a hash of what window logits depend on: the questions and paragraphs,
    the window settings at ``stride``, the precision and the saved model file (its size and modification time)."""
    content = hashlib.sha1(json.dumps([[(q.id, q.question_text, q.paragraph_id) for q in data.questions],
                                       data.paragraphs], ensure_ascii=False, default=str).encode()).hexdigest()
    model_files = sorted((f.name, f.stat().st_size, f.stat().st_mtime_ns)
                         for f in (run_dir / "model").glob("*") if f.suffix in (".safetensors", ".bin"))
    # "float32 head": logits cached before the QA head computed in float32 are not reused
    settings = [*dataclasses.astuple(dataclasses.replace(cfg.windows, doc_stride=stride)),
                resolve_precision(cfg.mixed_precision), "float32 head"]
    key = hashlib.sha1(json.dumps([content, model_files, settings]).encode()).hexdigest()[:16]
    return run_dir / "logits" / f"{key}.npz"


def save_logits(path: Path, logits: Logits) -> None:
    """The logits concatenated, with each window's length, written whole or not at all."""
    with atomic_write(path, "wb") as f:
        np.savez(f, starts=np.concatenate([s for s, _ in logits]), ends=np.concatenate([e for _, e in logits]),
                 lengths=np.array([len(s) for s, _ in logits]))


def read_cached_logits(path: Path, lengths: list[int]) -> Logits | None:
    """The logits saved at ``path`` for windows of these ``lengths``; None if there are none, or they
    were written for other windows, or the file cannot be read whole (then they are computed again)."""
    if not path.exists():
        return None
    try:
        with np.load(path) as saved:      # each key access reads the array again: read once
            starts, ends, saved_lengths = saved["starts"], saved["ends"], saved["lengths"].tolist()
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile):   # numpy's errors for a damaged file
        return None
    if saved_lengths != lengths or not starts.shape == ends.shape == (sum(lengths),):
        return None
    cuts = np.cumsum([0] + lengths)
    return [(starts[a:b], ends[a:b]) for a, b in zip(cuts, cuts[1:])]


# ---------------------------------------------------------------- predict, evaluate, ensemble

@contextlib.contextmanager
def inference_processes(cfg: Config):
    """An ``Accelerator`` when ``accelerate launch`` started several processes, else None; TF32
    matmuls while it lasts if ``cfg.tf32``."""
    with tf32_matmuls(cfg.tf32):
        if processes().num_processes == 1:
            yield None
            return
        with accelerator_for(cfg.mixed_precision) as accelerator:
            check_divisible(cfg, accelerator.num_processes)
            yield accelerator


def is_main(accelerator) -> bool:
    return accelerator is None or accelerator.is_main_process


def predict_test(run_dir: str | Path, test_file: str = "", out: str = "", overrides: list[str] | None = None) -> Path:
    """Answer ``test_file`` (default: the run's) with the run's model; write the CSV to ``out`` or
    ``output_path`` and check it (``SubmissionError`` if it is not a valid submission)."""
    cfg = run_config(run_dir, overrides)
    data = load_data_of(cfg, "test", test_file, run_dir)
    with inference_processes(cfg) as accelerator:
        predictions = answers(open_run(run_dir, cfg, accelerator), data, desc="test")
        return write_and_check(data, predictions, out or output_path(run_dir, "result.csv", cfg.test_file, test_file),
                               accelerator)


def output_path(run_dir: str | Path, name: str, own_file: str, given_file: str = "") -> Path:
    """``<run>/<name>`` for the run's own file, ``<run>/<stem>-<file stem><suffix>`` for any other,
    so that answering another file never replaces the run's own result."""
    if not given_file or (own_file and Path(given_file).resolve() == Path(own_file).resolve()):
        return Path(run_dir) / name
    return Path(run_dir) / f"{Path(name).stem}-{Path(given_file).stem}{Path(name).suffix}"


def write_and_check(data: QAData, predictions: list[Prediction], path: str | Path, accelerator=None) -> Path:
    """Write the answers as a result.csv at ``path`` and check it (main process only)."""
    if is_main(accelerator):
        path = write_result_csv(data, [p.answer for p in predictions], path)
        print(f"wrote {path} ({len(predictions)} answers)")
        problems = check_result_csv(path, data)
        if problems:
            raise SubmissionError(path, problems)
    return Path(path)


def evaluate_run(run_dir: str | Path, dev_file: str = "", overrides: list[str] | None = None
                 ) -> tuple[dict, list[Prediction]]:
    """Dev EM and F1 of the run's model on ``dev_file`` (default: the run's) and its predictions;
    writes ``dev_predictions.jsonl`` (``output_path``) and prints how the wrong answers are wrong."""
    cfg = run_config(run_dir, overrides)
    data = load_data_of(cfg, "dev", dev_file, run_dir, need_answers=True)
    with inference_processes(cfg) as accelerator:
        reader = open_run(run_dir, cfg, accelerator)
        predictions = answers(reader, data, desc="dev")
        path = output_path(run_dir, "dev_predictions.jsonl", cfg.dev_file, dev_file)
        scores = report_dev(data, predictions, reader.tokenizer, path, accelerator)
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


def load_data_of(cfg: Config, split: str, given: str = "", run_dir: str | Path = "", need_answers: bool = False
                 ) -> QAData:
    """``given`` (``--file``) if set, else the run's dev_file or test_file, loaded."""
    path = given or getattr(cfg, f"{split}_file")
    if not path:
        raise ValueError(f"no {split} file: the run {run_dir} has no {split}_file in its config; give one with --file")
    return load_qa_file(path, need_answers, setting="--file" if given else f"{split}_file")


def ensemble_runs(run_dirs: list[str | Path], split: str = "dev", data_file: str = "", output_dir: str = "",
                  method: str = "auto") -> tuple[dict | None, list[Prediction]]:
    """Combine ``run_dirs``' models (each at its ``doc_stride``, decoded with the first run's settings) on
    ``data_file`` or the first run's dev/test file; ``dev``: print each member's and the ensemble's EM/F1,
    write ``dev_predictions.jsonl``; ``test``: write ``result.csv``; both into ``output_dir``."""
    if split not in ("dev", "test"):
        raise ValueError(f"split={split!r}; choose dev or test")
    if len(run_dirs) < 2:
        raise ValueError("an ensemble needs at least two run folders")
    cfgs = [run_config(run_dir) for run_dir in run_dirs]
    data = load_data_of(cfgs[0], split, data_file, run_dirs[0], need_answers=split == "dev")
    output_dir = Path(output_dir or Path("outputs") / f"ensemble-{time.strftime('%Y%m%d-%H%M%S')}")
    with inference_processes(cfgs[0]) as accelerator:
        readers = [open_run(run_dir, cfg, accelerator) for run_dir, cfg in zip(run_dirs, cfgs)]
        members = [stride_logits(reader, data, [reader.cfg.doc_stride], desc=Path(reader.run_dir).name)[0]
                   for reader in readers]
        predictions, how = ensemble_predictions(members, cfgs[0].decoding, method)
        if is_main(accelerator):
            output_dir.mkdir(parents=True, exist_ok=True)
            print(f"ensemble of {len(run_dirs)} runs on {data.path}: {how}")
        if split == "test":
            write_and_check(data, predictions, output_dir / "result.csv", accelerator)
            return None, predictions
        if is_main(accelerator):
            for i, (reader, member) in enumerate(zip(readers, members)):
                scores = score([p.answer for p in decode_predictions(*member, reader.cfg.decoding)],
                               [q.answer_text for q in data.questions])
                print(f"  #{i + 1} {reader.run_dir}: EM {scores['em']:.4f}  F1 {scores['f1']:.4f}")
        scores = report_dev(data, predictions, readers[0].tokenizer, output_dir / "dev_predictions.jsonl", accelerator)
    return scores, predictions

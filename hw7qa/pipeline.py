"""Inference pipelined by chunks of questions (``inference_chunk``): the CPU work of one chunk runs
beside the forward passes of another.

Without it, ``predict`` tokenises the whole file, cuts all its windows, runs all forward passes,
then decodes everything: tokenising and decoding happen while the GPU waits. With it, the file's
questions are cut into chunks of ``inference_chunk`` and three workers hand chunks on::

    thread "prepare":   tokenise chunk k+1 (only its own paragraphs) and cut its windows
    main thread:        the forward passes of chunk k (``decode.window_logits``, which itself
                        collates batch b+1 while batch b runs)
    thread "decode":    decode chunk k-1 into answers (``ensemble.vote_predictions``)

Threads suffice: the Rust tokenizer, numpy's array operations and torch's operators release the
GIL. What still holds it (the tokenizer output's conversion to Python lists, decoding's loop over
questions) can delay the main thread's kernel launches by at most that long, while the GPU still
has the queued batch to run.

Answers are those of the whole-file path, with two differences of float rounding only: each
question's windows are the same and in the same order, and each question is decoded on its own,
but batches are sorted by length within a chunk rather than over the file, so a window may share
its batch with other windows, as with another ``eval_batch_size`` (CPU logits then move by
~1e-7; answers are identical on the sample and the first 600 questions of the 2021 dev file in
``tests/test_pipeline.py``). ``Prediction.window`` is the window's index in the whole file.

Why a knob, off by default, and not always on: on a CPU it gains nothing (the forward passes are
the work; docs/benchmarks.md), its batches differ from the whole-file path's at the float rounding
level, and whether it reaches its purpose (end to end ≥ 0.9 of the forward passes alone on a GPU,
``forward_seconds``) is for a GPU to measure. ``inference_chunk=256`` is a starting point: a chunk
short enough that the first chunk's tokenising and the last chunk's decoding (not overlapped) are
small, long enough that the short last batch of each chunk costs little.
"""
from __future__ import annotations

import dataclasses
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from .compiling import compile_model
from .data import QAData
from .decode import Prediction, batch_rows, predict as predict_whole_file, window_logits
from .devices import inference_autocast, tf32_matmuls
from .ensemble import vote_predictions
from .windows import Encoded, Windows, encode, eval_windows, padding_of, tokenize_paragraphs, with_stride


@dataclass(frozen=True)
class Chunk:
    """Questions ``questions`` of a file (a range of their indices), tokenized, with their windows
    at each stride: ``members[i]`` is ``(enc, windows)`` at the i-th stride."""
    questions: range
    members: list[tuple[Encoded, Windows]]


def chunk_ranges(n_questions: int, chunk: int) -> list[range]:
    """Questions 0..n-1 in consecutive ranges of ``chunk`` (0: one range of all)."""
    chunk = chunk or max(n_questions, 1)
    return [range(start, min(start + chunk, n_questions)) for start in range(0, n_questions, chunk)]


def chunk_data(data: QAData, questions: range) -> tuple[QAData, list[int]]:
    """Questions ``questions`` of ``data`` with only their paragraphs, numbered in order of first
    use; and the ids those paragraphs have in ``data``."""
    picked = data.questions[questions.start:questions.stop]
    paragraph_ids = list(dict.fromkeys(q.paragraph_id for q in picked))
    renumbered = {old: new for new, old in enumerate(paragraph_ids)}
    return QAData(data.path, [dataclasses.replace(q, paragraph_id=renumbered[q.paragraph_id]) for q in picked],
                  [data.paragraphs[i] for i in paragraph_ids]), paragraph_ids


class Preparer:
    """Chunks of ``data``, each tokenized and cut into windows at each of ``strides``, in any order.

    Each paragraph is tokenized once, by the first chunk that needs it, and kept for later ones:
    the questions of one paragraph are spread over a file (those of the 2021 HW7 dev file over
    three chunks of 256 questions on average), and tokenizing paragraphs is most of the work.
    One thread at a time: the tokenizer is not to be called from two threads at once.
    """

    def __init__(self, data: QAData, tokenizer, cfg, strides: list[int]):
        self.data, self.tokenizer, self.cfg, self.strides = data, tokenizer, cfg, strides
        self.paragraphs: dict[int, tuple[list[int], list[tuple[int, int]]]] = {}

    def __call__(self, questions: range) -> Chunk:
        data, paragraph_ids = chunk_data(self.data, questions)
        new = [i for i in paragraph_ids if i not in self.paragraphs]
        self.paragraphs.update(zip(new, zip(*tokenize_paragraphs([self.data.paragraphs[i] for i in new],
                                                                 self.tokenizer))))
        tokenized = ([self.paragraphs[i][0] for i in paragraph_ids], [self.paragraphs[i][1] for i in paragraph_ids])
        enc = encode(data, self.tokenizer, self.cfg.windows, tokenized)
        return Chunk(questions, [(e, eval_windows(e)) for e in (with_stride(enc, s) for s in self.strides)])


def answers(chunk: Chunk, logits: list[list], spec, first_window: int) -> list[Prediction]:
    """The answers of ``chunk``'s questions from its windows' ``logits`` (one list per stride, voted
    as ``run.stride_logits``'s are); window indices shifted by ``first_window``, the file's index of
    the chunk's first window at the first stride."""
    members = [(enc, windows, member_logits) for (enc, windows), member_logits in zip(chunk.members, logits)]
    return [dataclasses.replace(p, window=p.window + first_window) if p.window >= 0 else p
            for p in vote_predictions(members, spec)]


def pipelined_predictions(model, tokenizer, data: QAData, cfg, strides: list[int] | None = None, accelerator=None,
                          desc: str = "inference") -> tuple[list[Prediction], list[list]]:
    """Answers for every question of ``data``, by chunks of ``cfg.inference_chunk`` questions (see
    the module's docstring), and per stride (``strides``, default ``[cfg.doc_stride]``) the logits of
    every window of the file in ``eval_windows`` order: what ``run.run_logits`` caches.

    ``model`` is on its device already (and compiled, if wanted); with an ``accelerator`` of
    several processes each runs its part of every batch and every process gets all answers.
    """
    strides = strides or [cfg.doc_stride]
    ranges = chunk_ranges(len(data.questions), cfg.inference_chunk)
    logits = [[] for _ in strides]
    decoded, first_window = [], 0
    show = accelerator is None or accelerator.is_main_process
    prepare = Preparer(data, tokenizer, cfg, strides)
    preparing, decoding = ThreadPoolExecutor(1, "hw7qa-prepare"), ThreadPoolExecutor(1, "hw7qa-decode")
    try:
        with tqdm(total=len(data.questions), desc=desc, unit="question", leave=False, disable=not show) as bar:
            coming = preparing.submit(prepare, ranges[0]) if ranges else None
            for k in range(len(ranges)):
                chunk = coming.result()
                if k + 1 < len(ranges):
                    coming = preparing.submit(prepare, ranges[k + 1])
                chunk_logits = [window_logits(model, tokenizer, windows, cfg.eval_batch_size, cfg.mixed_precision,
                                              desc, accelerator, progress=False) for _, windows in chunk.members]
                decoded.append(decoding.submit(answers, chunk, chunk_logits, cfg.decoding, first_window))
                first_window += len(chunk.members[0][1])
                for kept, new in zip(logits, chunk_logits):
                    kept += new
                bar.update(len(chunk.questions))
            predictions = [p for future in decoded for p in future.result()]
    finally:   # after an error or Ctrl-C: chunks not started are dropped, the running ones end
        preparing.shutdown(cancel_futures=True)
        decoding.shutdown(cancel_futures=True)
    return predictions, logits


def predict(model, tokenizer, data: QAData, cfg, accelerator=None, desc: str = "inference") -> list[Prediction]:
    """``decode.predict`` (answers for every question of ``data`` with ``cfg``'s windows and
    decoding, ``model`` in hand), pipelined by chunks when ``cfg.inference_chunk`` is set, compiled
    with ``compile``, under ``tf32``. What a benchmark times end to end beside ``forward_seconds``."""
    with tf32_matmuls(cfg.tf32):
        compile_model(model, cfg.compile)
        if not cfg.inference_chunk:
            return predict_whole_file(model, tokenizer, data, cfg, accelerator, desc)
        return pipelined_predictions(model, tokenizer, data, cfg, None, accelerator, desc)[0]


def forward_seconds(model, tokenizer, data: QAData, cfg) -> float:
    """Seconds of the forward passes alone that ``predict(model, tokenizer, data, cfg)`` runs (one
    process): every batch tokenised, cut, collated as that call batches it (by chunk when
    ``inference_chunk`` is set) and copied to the model's device beforehand; then only the forward
    passes, at ``cfg``'s precision, timed until the device has finished them. ``predict``'s time
    over this is what the pipeline loses. The first call of a compiled model compiles: time a
    second call. Holds every batch on the device at once (e.g. 180 MB for the 2021 dev file at
    doc_stride 32)."""
    device = next(model.parameters()).device
    padding = padding_of(tokenizer)
    batches, prepare = [], Preparer(data, tokenizer, cfg, [cfg.doc_stride])
    for questions in chunk_ranges(len(data.questions), cfg.inference_chunk):
        windows = prepare(questions).members[0][1]
        batches += [{key: torch.from_numpy(value).to(device)
                     for key, value in windows.model_inputs(rows, **padding).items()}
                    for rows in batch_rows(windows, cfg.eval_batch_size)]
    was_training = model.training
    model.eval()
    with tf32_matmuls(cfg.tf32), torch.inference_mode(), inference_autocast(cfg.mixed_precision, device):
        compile_model(model, cfg.compile)
        synchronize(device)
        started = time.perf_counter()
        for batch in batches:
            model(**batch)
        synchronize(device)
        seconds = time.perf_counter() - started
    model.train(was_training)
    return seconds


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)

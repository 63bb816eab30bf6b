"""Will a config's run fit here, and how long will it take? ``hw7qa estimate``, before training.

``estimate(cfg)`` times the trainer's own ``start_run``/``train_step`` and ``inference.answers`` on a model
of the config's shape with random weights (``SHAPES``: nothing downloaded) and adds up the whole run.
FLOPs per window of T real tokens: 6·N·T + 12·L·h·T² (inference a third); MFU: FLOPs / (s × GPU peak).
"""
from __future__ import annotations

import contextlib
import io
import math
import os
import random
import re
import resource
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .config import TINY_MODEL, Config, TrainingError
from .data import QAData, Question, load_qa_file
from .inference import Reader, answers
from .models import accelerator_for, cannot_compile, check_max_length, from_pretrained, load_tokenizer_for, tf32_matmuls
from .tiny import build_tiny_model, build_tiny_tokenizer
from .train import Inputs, evaluate_due, start_run, train_step
from .windows import encode, eval_windows, paragraph_lengths, question_budgets, train_windows, window_grid

HW7 = {"train": 31_690, "dev": 4_131, "test": 4_957}      # ML2022 HW7's questions (course slides)
# for a missing file: paragraph tokens per question at the 5th, 15th, ... 95th percentile, and question
# tokens (median), of the 2021 HW7 dev file with the bert-base-chinese tokenizer
TYPICAL_PARAGRAPH, TYPICAL_QUESTION = (268, 309, 342, 372, 404, 440, 478, 533, 604, 740), 21
COURSE_T4 = {"sample-recipe": ("simple", 8), "bert-base": ("medium", 8), "macbert-base": ("strong", 25),
             "macbert-large": ("boss", 150)}             # the course's minutes on a T4 with fp16 (slides)
BASE = dict(num_hidden_layers=12, hidden_size=768, num_attention_heads=12, intermediate_size=3072)  # config.json
LARGE = dict(num_hidden_layers=24, hidden_size=1024, num_attention_heads=16, intermediate_size=4096)
SHAPES = {"bert-base-chinese": BASE, "hfl/chinese-macbert-base": BASE, "hfl/chinese-macbert-large": LARGE,
          "luhua/chinese_pretrain_mrc_macbert_large": LARGE}
# GPU name pattern, dense fp16/bf16 tensor-core TFLOP/s without sparsity (NVIDIA's datasheets); first match wins
PEAKS = ((r"H100.*PCIe", 756.0), (r"H100.*NVL", 835.0), (r"H100|H200", 989.0), (r"A100", 312.0),
         (r"\bA10\b", 125.0), (r"\bL4\b", 121.0), (r"\bT4\b", 65.0), (r"V100", 125.0))
SESSION_MIN = 180   # "a few hours" of a free Colab session (not published); longer runs resume from checkpoints
KIND = {"training": "train", "dev evaluations": "infer", "test prediction": "infer"}   # part → speed it runs at


def peak_tflops(gpu_name: str | None) -> float | None:
    return next((peak for pattern, peak in PEAKS if gpu_name and re.search(pattern, gpu_name)), None)


def matmul_parameters(config) -> int:
    """N of a ``BertForQuestionAnswering`` but its embeddings: per layer 4h² + 4h (attention), 2hi + i + h
    (feed-forward), 4h (two LayerNorms); the QA head 2h + 2."""
    h, i = config.hidden_size, config.intermediate_size
    return config.num_hidden_layers * (4 * h * h + 2 * h * i + i + 9 * h) + 2 * h + 2


def model_flops(config, lengths, training: bool = True) -> float:
    """Σ 2·N·T + 4·L·h·T² over windows of ``lengths`` real tokens (forward); training: 3× (backward 2×)."""
    t = np.asarray(lengths, dtype=np.float64)
    forward = 2 * matmul_parameters(config) * t + 4 * config.num_hidden_layers * config.hidden_size * t * t
    return float(forward.sum()) * (3 if training else 1)


def model_config(name: str):
    """``SHAPES``'s config for the presets' models, else a folder's or the hub's config.json."""
    from transformers import AutoConfig, BertConfig
    if name not in SHAPES:
        return from_pretrained("config", AutoConfig.from_pretrained, name)
    return BertConfig(vocab_size=21128, **SHAPES[name])


def model_and_tokenizer(cfg: Config, train: QAData):
    """A model of ``cfg``'s shape with random weights, and the run's tokenizer (for ``SHAPES``' models,
    whose tokenizers cut Chinese into characters, one token per character of ``train``)."""
    from transformers import AutoModelForQuestionAnswering
    tokenizer = build_tiny_tokenizer(train.paragraphs + [q.question_text for q in train.questions],
                                     cfg.isolate_digits) if cfg.model_name in SHAPES else load_tokenizer_for(cfg, train)
    torch.manual_seed(cfg.seed)
    if cfg.model_name == TINY_MODEL:
        return build_tiny_model(len(tokenizer), seed=cfg.seed), tokenizer
    shape = model_config(cfg.model_name)
    shape.vocab_size = max(shape.vocab_size, len(tokenizer))
    return AutoModelForQuestionAnswering.from_config(shape), tokenizer


def typical_data() -> QAData:
    """A question of ``TYPICAL_QUESTION`` characters per ``TYPICAL_PARAGRAPH`` length, answered mid-paragraph."""
    text = "的是不了在人有我他這中大來上國個到說們為子和你地出道也時年" * 30
    return QAData("HW7-typical", [Question(i, text[i:i + TYPICAL_QUESTION], i, text[n // 2:n // 2 + 4], n // 2,
                                           n // 2 + 3) for i, n in enumerate(TYPICAL_PARAGRAPH)],
                  [text[:n] for n in TYPICAL_PARAGRAPH])


def run_data(cfg: Config, data: str = "") -> tuple[dict, list[str]]:
    """Per split of the run, (QAData, its questions in the run): the config's file, else ``data`` or
    ``typical_data`` standing for HW7's size; and notes saying what stood in."""
    splits, missing = {}, []
    for split in ["train"] + ["dev"] * bool(cfg.dev_file and not cfg.final_fit) + ["test"] * bool(cfg.test_file):
        path = data or getattr(cfg, f"{split}_file")
        qa = load_qa_file(path, need_answers=split == "train" or bool(data)) if Path(path).is_file() else None
        splits[split] = (qa, HW7[split] if data else len(qa.questions)) if qa else (typical_data(), HW7[split])
        missing += [path or f"{split}_file"] * (qa is None)
    if cfg.final_fit:      # train + dev, at the training file's windows per question
        dev = len(load_qa_file(cfg.dev_file).questions) if Path(cfg.dev_file).is_file() and not data else HW7["dev"]
        splits["train"] = (splits["train"][0], splits["train"][1] + dev)
    return splits, [f"window lengths of {data}, scaled to HW7's size"] * bool(data) + [
        f"HW7-typical window lengths (hw7qa/estimate.py) for {', '.join(missing)}: not found"] * bool(missing)


def measure(cfg: Config, model, tokenizer, train_enc, infer: QAData, per_question: float, steps=None,
            windows=None) -> dict:
    """Windows/s and MFU of training over ``steps`` = (micro-batches let pass, timed; default 2 and 8 optimizer
    steps' worth, CPU 1 and 1) and of inference over ``windows`` = (let pass, timed) of ``infer``'s at
    ``per_question`` a question (default ``eval_batch_size`` and 4×, CPU 2 and 6); the peak memory."""
    with tempfile.TemporaryDirectory() as run_dir, tf32_matmuls(cfg.tf32), \
            accelerator_for(cfg.mixed_precision, cfg.grad_accum) as accelerator:
        device = accelerator.device
        gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
        clock = lambda: (torch.cuda.synchronize() if gpu else None, time.perf_counter())[1]   # noqa: E731
        if gpu:
            torch.cuda.reset_peak_memory_stats()
        with contextlib.redirect_stdout(io.StringIO()):     # start_run's lines are about a run folder
            run = start_run(cfg, accelerator, Inputs(cfg, train_enc.data, train_enc, None, None, model, tokenizer),
                            Path(run_dir), None)
        warmup, timed = steps or ((2 * run.state.grad_accum, 8 * run.state.grad_accum) if gpu else (1, 1))
        lengths = []
        run.model.train()
        with contextlib.closing(iter(run.loader)) as batches:
            for _ in range(warmup):
                train_step(run, next(batches))
            started = clock()
            for _ in range(timed):
                lengths.append((batch := next(batches))["attention_mask"].sum(1))   # on the device: no wait here
                train_step(run, batch)
            train_s = clock() - started
        ends = np.cumsum([math.ceil(n / per_question) for n in windows or (
            (cfg.eval_batch_size, 4 * cfg.eval_batch_size) if gpu else (2, 6))])
        questions = infer.questions * math.ceil(ends[1] / len(infer.questions))    # a small file, repeated
        first, then = (encode(QAData(infer.path, questions[a:b], infer.paragraphs), tokenizer, cfg.windows)
                       for a, b in ((0, ends[0]), (ends[0], ends[1])))
        reader = Reader(cfg, tokenizer, run.kept_model(), accelerator=accelerator)
        for enc in (first, then):       # the first call lets compiling and allocation pass
            started = clock()
            answers(reader, enc.data, [cfg.doc_stride], enc, desc="estimate")
        infer_s, peak = clock() - started, peak_tflops(gpu)
        timed_lengths = {"train": torch.cat(lengths).tolist(), "infer": eval_windows(then).length}
        speeds = {part: (len(timed_lengths[part]) / s, model_flops(model.config, timed_lengths[part], part == "train")
                         / s / (peak * 1e12) if peak else None) for part, s in (("train", train_s), ("infer", infer_s))}
        memory = ((torch.cuda.max_memory_reserved(), torch.cuda.get_device_properties(device).total_memory) if gpu
                  else (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                        os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")))
        return dict(gpu=gpu, precision=accelerator.mixed_precision, batch_size=cfg.batch_size, steps=(warmup, timed),
                    micro_batch=run.state.micro_batch, grad_accum=run.state.grad_accum, speeds=speeds,
                    timed_windows={part: len(x) for part, x in timed_lengths.items()},
                    compiled=cfg.compile and not cannot_compile(next(model.parameters()).device),
                    checkpointing=next(getattr(model, name) for name in ("is_activation_checkpointing",
                                       "is_gradient_checkpointing") if hasattr(type(model), name)),
                    peak_gib=memory[0] / 2 ** 30, total_gib=memory[1] / 2 ** 30)


@dataclass
class Estimate:
    """``measure``'s dict (None where the run does not fit in memory: ``error``) and the windows of the run;
    ``str()`` is ``hw7qa estimate``'s table, ``verdict()`` one line for the notebook."""
    measured: dict | None
    windows: dict                    # part of the run (``KIND``'s keys) → (its windows, how they add up)
    course: str = ""
    notes: list[str] = field(default_factory=list)
    error: str = ""

    def minutes(self) -> dict:
        """Minutes of each part of the run at the measured speeds, and of the whole run."""
        parts = {part: n / self.measured["speeds"][KIND[part]][0] / 60 for part, (n, _) in self.windows.items()}
        return {**parts, "whole run": sum(parts.values())}

    def __str__(self) -> str:
        m = self.measured
        if m is None:
            return "\n".join([*self.notes, self.verdict()])
        mins, cpu = self.minutes(), f"the CPU ({os.cpu_count()} cores; slow: a CPU's numbers, not a GPU's)"
        rows = [f"| {part}: {how} | {wps:.3g} | {'—' if mfu is None else f'{mfu:.1%}'} | {n:,} | {mins[part]:,.1f} |"
                for part, (n, how) in self.windows.items() for wps, mfu in [m["speeds"][KIND[part]]]]
        return "\n".join([
            f"on {m['gpu'] or cpu}: precision {m['precision']}, micro-batch {m['micro_batch']} × grad_accum "
            f"{m['grad_accum']}" + f" (auto_batch shrank {m['batch_size']})" * (m["micro_batch"] < m["batch_size"])
            + ", compiled" * m["compiled"] + ", gradient checkpointing" * m["checkpointing"], *self.notes,
            f"timed: {m['steps'][1]} training micro-batch(es) after {m['steps'][0]}; {m['timed_windows']['infer']} "
            f"inference windows after a first call", "",
            "| part of the run | windows/s | MFU | windows | minutes here |", "| --- | --- | --- | --- | --- |", *rows,
            f"| whole run{f' (the course: {self.course})' if self.course else ''} | | | | "
            f"{mins['whole run']:,.1f} |", "",
            f"peak memory: {m['peak_gib']:.1f} GiB of {m['total_gib']:.1f} GiB "
            + ("(GPU, reserved)" if m["gpu"] else "(the process's peak RSS: not this run's alone)")])

    def verdict(self) -> str:
        """Whether the run fits in memory and how long it takes here, with what to change where not."""
        if self.measured is None:
            return (f"Does not fit in this GPU's memory ({self.error}). Try auto_batch=True, a smaller batch_size "
                    f"with grad_accum raised by the same factor, gradient_checkpointing=True, or a smaller preset.")
        m, total = self.measured, self.minutes()["whole run"]
        shrunk = f"; auto_batch: {m['micro_batch']} × grad_accum {m['grad_accum']}"
        return ((f"Fits in this GPU's memory (peak {m['peak_gib']:.1f} of {m['total_gib']:.1f} GiB"
                 + shrunk * (m["micro_batch"] < m["batch_size"]) + ")" if m["gpu"] else "On the CPU")
                + f"; the whole run takes about {total:,.0f} min here."
                + (" That is longer than a free Colab session may last: fewer epochs or a smaller preset, or continue "
                   "from its checkpoint (save_every) in a new session." if total > SESSION_MIN else ""))


def estimate(cfg: Config, data: str = "", preset: str = "", steps=None, windows=None) -> Estimate:
    """Time ``cfg``'s training and inference here (``measure``, with its ``steps`` and ``windows``) and add
    up its whole run. ``data``: a QA file with answers whose windows stand for every split, scaled to HW7's
    size; ``preset``: the config's preset, for the course's estimate of its tier."""
    splits, notes = run_data(cfg, data)
    train = splits["train"][0]
    model, tokenizer = model_and_tokenizer(cfg, train)
    check_max_length(model.config, cfg.max_length)
    encoded = {split: encode(qa, tokenizer, cfg.windows) for split, (qa, _) in splits.items()}
    windows_of = {"train": lambda enc: len(train_windows(enc, cfg.train_windows, random.Random(0))),
                  "dev": lambda enc: len(eval_windows(enc)),     # training evaluates at doc_stride alone
                  "test": lambda enc: sum(len(window_grid(paragraph_lengths(enc), question_budgets(enc), stride)[0])
                                          for stride in cfg.inference_strides)}
    per_question = {split: windows_of[split](enc) / len(enc.data.questions) for split, enc in encoded.items()}
    epoch, dev, test = (round(per_question.get(split, 0) * splits.get(split, (0, 0))[1]) for split in HW7)
    steps_per_epoch = math.ceil(math.ceil(epoch / cfg.batch_size) / cfg.grad_accum)
    total = steps_per_epoch * cfg.epochs
    evaluations = sum(evaluate_due(step, steps_per_epoch, total, cfg) for step in range(1, total + 1) if dev)
    tier = COURSE_T4.get(preset)
    result = Estimate(None, {"training": (cfg.epochs * epoch, f"{cfg.epochs} epochs × {epoch:,}"),
                             "dev evaluations": (evaluations * dev, f"{evaluations} × {dev:,}"),
                             "test prediction": (test, f"at {', '.join(map(str, cfg.inference_strides))}")},
                      f"{tier[0]}, {tier[1]} min on a T4 with fp16" if tier else "",
                      [f"model: {cfg.model_name}'s shape ({model.config.num_hidden_layers} layers, hidden "
                       f"{model.config.hidden_size}), random weights"
                       + "; one token per character" * (cfg.model_name in SHAPES), *notes])
    # the training windows, repeated until they fill the micro-batches timed
    times = math.ceil((10 * cfg.grad_accum + 1 if steps is None else sum(steps) + 1) * cfg.batch_size
                      / max(1, per_question["train"] * len(train.questions)))
    train_enc = (encode(QAData(train.path, train.questions * times, train.paragraphs), tokenizer, cfg.windows)
                 if times > 1 else encoded["train"])
    infer = encoded["dev" if dev else "train"]
    try:
        result.measured = measure(cfg, model, tokenizer, train_enc, infer.data,
                                  len(eval_windows(infer)) / len(infer.data.questions), steps, windows)
    except (torch.cuda.OutOfMemoryError, TrainingError) as e:
        result.error = str(e).splitlines()[0]
    return result

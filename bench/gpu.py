"""One prepared command that turns a short GPU window into numbers.

    python bench/gpu.py --prepare                  # here, beside ../shared: fill .gpu-carry/ (≤ 64 MiB with the tree)
    python bench/gpu.py --part speed               # on the GPU machine, .gpu-carry carried: ≤ --budget-min (6.5) min
    python bench/gpu.py --part accuracy            # the same, ≤ 5 minutes
    python bench/gpu.py --t4-estimate [SPEED.json] # a T4's hours per preset: from the speed part's MFU, and a band
    python bench/gpu.py --part both --smoke        # the same code on the CPU, tiny shapes, a few steps (the tests)

``--part speed`` measures, through ``hw7qa.train.train`` and ``hw7qa.decode.predict`` themselves, the
presets' model shapes with random weights (a model folder built on the fly: ``BertConfig`` of the
shape and the bert-base-chinese tokenizer saved beside it; docs/benchmarks.md lists the
measurements): training windows/s in steady state (``StepTimer``, ``train``'s ``on_step``, lets
the first steps pass, then times the next ones and stops the run) and their MFU (model FLOPs over
the chip's dense 16-bit peak: ``bench/flops.py`` has the formula, N = non-embedding parameters
incl. the QA head, and the peaks' sources), in bf16, fp16 and fp32, with each speed lever on and
off (``compile``, ``group_by_length``, ``tf32``, ``batch_size``); the GPU's busy share (NVML's
utilization, what nvidia-smi shows); inference against the course sample's loop at doc_stride 32
and 150, forward passes alone and end to end (``bench/speed.py``'s rows); the peak GPU memory of
each preset and the micro-batch ``auto_batch`` chose, also within a T4's 15 GiB. A lever whose
``Config`` field this version lacks is reported "not available".

``--part accuracy`` runs ``bench/accuracy.py`` on the bert-proxy: DRCD test → the 2021 HW7 dev
file, recipes ``sample``, ``project`` and ``project+<technique>`` for each opt-in technique, seeds
0-2, all 21 runs at once (``--jobs``), with the paired intervals against ``project`` and the
decision each allows.

**Budget.** Each measurement reserves an estimate of its seconds on an H100/H200 (``estimate_s``);
one that would end after ``--budget-min`` is not started ("not run", listed with the rest), and
timed training stops at the deadline. ``--only`` names the measurements to run (a later window
measures what an earlier one left). Results are written after every measurement, whole or not at
all, to ``--results`` (``bench/results``) and copied to ``$OUT`` if it is set: a part killed at
its time limit keeps what it measured. Each part writes one JSON and one markdown file and prints
the markdown.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import gc
import hashlib
import json
import math
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path[:0] = [str(ROOT), str(BENCH)]
os.environ.setdefault("HF_HUB_OFFLINE", "1")     # nothing can be downloaded there: never wait for the hub

import accuracy  # noqa: E402
import flops  # noqa: E402
from hw7qa.config import TINY_MODEL, Config, load_config  # noqa: E402
from hw7qa.files import atomic_write  # noqa: E402

CARRY = ROOT / ".gpu-carry"
CARRY_LIMIT = 64 * 2 ** 20           # what travels to the device machine: working tree and carried paths together
# what the GPU parts read from the carry folder, and where --prepare finds it in ../shared
CARRIED = {"tokenizer": ("bert-base-chinese-tokenizer", "models/bert-base-chinese-tokenizer"),
           "train": ("data/DRCD_test.json", "data/drcd/DRCD_test.json"),
           "dev": ("data/hw7_dev.json", "data/hw7-2021/hw7_dev.json"),
           "proxy": ("bert-proxy", "tools/bert-proxy/build")}
SAMPLE = ROOT / "data" / "sample"
BUDGET_MIN = {"speed": 6.5, "accuracy": 5.0}
TECHNIQUE_RECIPES = ("sample", "project", "project+layer_lr_decay=0.9", "project+ema_decay=0.999",
                     "project+fgm_epsilon=1.0", "project+answer_length_quantile=0.995", "project+tta_strides=64,96")
# bert-proxy runs at once on one H100/H200: all 21 (7 recipes × 3 seeds) in one wave, so that a short
# window gets every seed or none is cut; each holds 1-2 GB of the GPU and one of the 16 CPU cores
ACCURACY_JOBS = 21
ACCURACY_RUN_MIN = 3.0              # what one of them is assumed to take before the first has finished
# runs in parallel processes: one thread each (tokenizers and torch would start one per core in every process)
WORKER_ENV = {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


class Refused(Exception):
    """A request this script cannot carry out; the message says what to do (exit code 2)."""


# ---------------------------------------------------------------- what the parts read

@dataclass(frozen=True)
class Sources:
    """The files the measurements read: the tokenizer saved beside the random-weight models,
    training data, dev data, and the accuracy part's model."""
    tokenizer: str
    train: str
    dev: str
    proxy: str


def carried_sources(carry: Path | None = None) -> Sources:
    """The carry folder's files (default ``CARRY``), or ``Refused`` naming the first one missing."""
    carry = carry or CARRY
    for name, _ in CARRIED.values():
        if not (carry / name).exists():
            raise Refused(f"{carry / name} not found: run `python bench/gpu.py --prepare` beside ../shared and "
                          f"name {carry.name} in the device run's carry")
    return Sources(*(str(carry / CARRIED[key][0]) for key in ("tokenizer", "train", "dev", "proxy")))


def smoke_sources(work: Path) -> Sources:
    """The bundled sample for the CPU smoke run: its training questions eight times over (an epoch
    long enough to time steps in), a tokenizer of its characters, the demo's tiny random BERT."""
    from hw7qa.data import QAData, load_qa_file, save_hw7
    from hw7qa.tiny import build_tiny_tokenizer
    train = load_qa_file(SAMPLE / "hw7_train.json", need_answers=True)
    repeated = [dataclasses.replace(q, id=f"{q.id}-{k}") for k in range(8) for q in train.questions]
    work.mkdir(parents=True, exist_ok=True)
    save_hw7(QAData(train.path, repeated, train.paragraphs), work / "train-x8.json")
    build_tiny_tokenizer(train.paragraphs + [q.question_text for q in train.questions], work / "tokenizer")
    return Sources(str(work / "tokenizer"), str(work / "train-x8.json"), str(SAMPLE / "hw7_dev.json"), TINY_MODEL)


def tree_bytes(root: Path = ROOT) -> int:
    """Bytes of what the device tool sends besides the carry: tracked and untracked-not-ignored files."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=root,
                            capture_output=True, check=True).stdout.split(b"\0")
    return sum((root / os.fsdecode(name)).stat().st_size for name in set(listed)
               if name and (root / os.fsdecode(name)).is_file())


def prepare(shared: Path, carry: Path = CARRY, limit: int = CARRY_LIMIT) -> str:
    """Fill ``carry`` from ``shared``: the bert-base-chinese tokenizer, DRCD test, the 2021 HW7 dev
    file (whole: 4.4 MB), and the bert-proxy built in fp16 by shared's tool (38 MB; a minute the
    first time). Checks that the working tree and the carry together stay within ``limit`` (the
    device's 64 MiB); writes ``MANIFEST.json`` (sizes, sha256); returns a report."""
    for key, (name, source) in CARRIED.items():
        if not (shared / source).exists():
            raise Refused(f"{shared / source} not found: --prepare needs the shared folder (--shared or HW7QA_SHARED)")
        target = carry / name
        if key == "proxy":
            if not (target / "model.safetensors").is_file() and subprocess.run(
                    [str(shared / source), str(target), "--fp16"], stdout=subprocess.DEVNULL).returncode:
                raise Refused(f"{shared / source} failed (its messages are above); {target} is not built")
        elif (shared / source).is_dir():
            shutil.copytree(shared / source, target, dirs_exist_ok=True)
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(shared / source, target)
    files = sorted(f for f in carry.rglob("*") if f.is_file() and f.name != "MANIFEST.json")
    manifest = {str(f.relative_to(carry)): {"bytes": f.stat().st_size,
                                            "sha256": hashlib.sha256(f.read_bytes()).hexdigest()} for f in files}
    carried, tree = sum(m["bytes"] for m in manifest.values()), tree_bytes()
    if carried + tree > limit:
        raise Refused(f"{carry} ({carried / 2 ** 20:.1f} MiB) and the working tree ({tree / 2 ** 20:.1f} MiB) exceed "
                      f"the {limit / 2 ** 20:.3g} MiB a device run takes: remove what else the tree holds, or trim the "
                      f"data files")
    with atomic_write(carry / "MANIFEST.json") as f:
        json.dump({"from": str(shared), "files": manifest}, f, indent=1)
    return (f"{carry}: {len(files)} files, {carried / 2 ** 20:.1f} MiB (+ working tree {tree / 2 ** 20:.1f} MiB; "
            f"limit 64 MiB). On the device, with carry [\"{carry.name}\"] (docs/benchmarks.md, \"On a GPU\"):\n"
            f"  PYTHONUNBUFFERED=1 python3 bench/gpu.py --part speed\n"
            f"  PYTHONUNBUFFERED=1 python3 bench/gpu.py --part accuracy")


# ---------------------------------------------------------------- the machine

def machine(device) -> dict:
    """GPU (name, driver, CUDA, memory, dense 16-bit peak), CPU cores, versions, date, command."""
    import torch
    info = accuracy.environment(device.type)
    info["command"] = "python " + " ".join(sys.argv)
    info["gpu_memory_gib"] = (round(torch.cuda.get_device_properties(device).total_memory / 2 ** 30, 1)
                              if device.type == "cuda" else None)
    info["peak_tflops"] = flops.peak_tflops(info["gpu"])
    return info


def gpu_utilization():
    """A function giving the GPU's busy % now: NVML's ``utilization.gpu`` (what nvidia-smi shows),
    through ``torch.cuda.utilization`` (which needs nvidia-ml-py); an exception saying why not."""
    import torch
    if not torch.cuda.is_available():
        raise RuntimeError("no GPU")
    torch.cuda.utilization(0)          # raises here, once, where NVML cannot be read
    return lambda: torch.cuda.utilization(0)


class BusySampler:
    """The GPU's busy share, sampled every ``period`` seconds in a thread: the share of the last
    sample period (1/6 s to 1 s, by chip) in which a kernel ran. ``busy(start, end)`` is the mean
    between two ``time.time()``s. Where it cannot be read it samples nothing and ``why`` says why."""

    def __init__(self, probe=None, period: float = 0.1):
        self.probe, self.period, self.samples, self.why = probe, period, [], ""
        self.stop, self.thread = threading.Event(), None

    def __enter__(self) -> BusySampler:
        try:
            self.probe = self.probe or gpu_utilization()
        except Exception as e:     # no GPU, no nvidia-ml-py, no driver: nothing to sample
            self.why = f"GPU busy share not sampled: {type(e).__name__}: {e}"
            return self
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self) -> None:
        while not self.stop.wait(self.period):
            self.samples.append((time.time(), float(self.probe())))

    def __exit__(self, *exc) -> None:
        self.stop.set()
        if self.thread is not None:
            self.thread.join(timeout=10)

    def busy(self, start: float | None = None, end: float | None = None) -> float | None:
        values = [b for t, b in list(self.samples) if (start is None or t >= start) and (end is None or t <= end)]
        return round(sum(values) / len(values), 1) if values else None


# ---------------------------------------------------------------- the speed part: what is measured

@dataclass(frozen=True)
class Measurement:
    """One speed measurement: a preset (its model's shape, random weights), the settings it
    changes, and the seconds the budget reserves for it on an H100/H200 (setup included)."""
    name: str
    preset: str
    settings: tuple[str, ...] = ()
    baseline: str = ""              # the measurement it is compared with
    estimate_s: float = 30.0
    memory_gib: float = 0.0         # > 0: the process may use only this much GPU memory (a T4 has 15 GiB)
    kind: str = "train"             # train | inference


BF16, FP16 = "mixed_precision=bf16", "mixed_precision=fp16"
# In order of importance: a short window measures the first ones.
SPEED_PLAN = (
    Measurement("base bf16", "bert-base", (BF16,), "", 60),
    Measurement("inference base", "bert-base", (), "", 75, kind="inference"),
    Measurement("base bf16 compile", "bert-base", (BF16, "compile=true"), "base bf16", 150),
    Measurement("inference base chunked", "bert-base", ("inference_chunk=256",), "inference base", 45,
                kind="inference"),
    Measurement("large bf16", "macbert-large", (BF16,), "", 75),
    Measurement("base fp16", "bert-base", (FP16,), "base bf16", 25),
    Measurement("base bf16 group_by_length", "bert-base", (BF16, "group_by_length=true"), "base bf16", 25),
    Measurement("base bf16 again", "bert-base", (BF16,), "base bf16", 25),     # how far two runs differ
    Measurement("large fp16 in 15 GiB (T4)", "macbert-large", (FP16,), "large bf16", 45, memory_gib=15),
    Measurement("base bf16 batch 32x1", "bert-base", (BF16, "batch_size=32", "grad_accum=1"), "base bf16", 25),
    Measurement("base bf16 batch 8x4", "bert-base", (BF16, "batch_size=8", "grad_accum=4"), "base bf16", 30),
    Measurement("base fp32", "bert-base", ("mixed_precision=no",), "base bf16", 40),
    Measurement("base fp32 tf32", "bert-base", ("mixed_precision=no", "tf32=true"), "base fp32", 30),
    Measurement("large fp16", "macbert-large", (FP16,), "large bf16", 35),
    Measurement("large bf16 group_by_length", "macbert-large", (BF16, "group_by_length=true"), "large bf16", 35),
    Measurement("base fp16 in 15 GiB (T4)", "bert-base", (FP16,), "base fp16", 25, memory_gib=15),
    Measurement("large bf16 compile", "macbert-large", (BF16, "compile=true"), "large bf16", 240),
)


@dataclass(frozen=True)
class Scale:
    """How big the speed measurements are: on a GPU, or in the CPU smoke run (the same code)."""
    shapes: dict                    # preset → flops.SHAPES name
    steps: dict                     # shape → (optimizer steps let pass, steps timed)
    overrides: tuple = ()           # settings added to every training measurement
    dev_limit: int = 1000           # dev questions for inference


GPU_SCALE = Scale({"bert-base": "bert-base", "macbert-large": "large"}, {"bert-base": (20, 40), "large": (6, 14)})
SMOKE_SCALE = Scale({"bert-base": "tiny", "macbert-large": "tiny"}, {"tiny": (1, 2)},
                    ("max_length=48", "max_question_tokens=16", "log_every=1"), 13)


def unavailable(settings) -> list[str]:
    """The settings' keys that this version's ``Config`` does not have."""
    known = {f.name for f in dataclasses.fields(Config)}
    return [item.split("=", 1)[0] for item in settings if item.split("=", 1)[0] not in known]


def selected(plan, only: str):
    """The measurements of ``plan`` named in ``only`` (commas), all if empty; Refused for an unknown name."""
    names = [name.strip() for name in only.split(",") if name.strip()]
    unknown = [name for name in names if name not in {m.name for m in plan}]
    if unknown:
        raise Refused(f"--only {unknown[0]!r} is no measurement; choose from: {', '.join(m.name for m in plan)}")
    return [m for m in plan if not names or m.name in names]


# ---------------------------------------------------------------- the speed part: timing train() itself

class EnoughSteps(Exception):
    """Raised by ``StepTimer`` to end a training run once its steps are timed."""


class StepTimer:
    """``train()``'s ``on_step``: lets ``warmup`` optimizer steps pass (compilation, allocator blocks,
    kernel choice per shape), times the next ``steps``, waiting for the GPU at both ends only, and
    ends the run with ``EnoughSteps`` (earlier once ``deadline``, a ``time.time()``, has passed).
    It keeps numbers, never the run, so the model is freed when ``train`` has returned."""

    def __init__(self, warmup: int, steps: int, deadline: float, device):
        self.warmup, self.steps, self.deadline, self.device = max(1, warmup), steps, deadline, device
        self.started, self.first_step_s, self.t0, self.note = time.time(), None, None, ""
        self.result: dict = {"timed_steps": 0}

    def sync(self) -> None:
        import torch
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def __call__(self, run) -> None:
        step = run.state.step
        if self.first_step_s is None:
            self.first_step_s = time.time() - self.started
        if self.t0 is None:
            if step >= self.warmup:
                self.begin(run)
            elif time.time() > self.deadline:
                self.note = "the deadline passed before timing began"
                raise EnoughSteps
            return
        done = step - self.warmup
        if done >= self.steps or time.time() > self.deadline:
            if done < self.steps:
                self.note = f"cut to {done} timed steps by the deadline"
            self.end(run, done)
            raise EnoughSteps

    def begin(self, run) -> None:
        import torch
        # the epoch's last step saves the model: keep clear of it
        self.steps = min(self.steps, run.steps_per_epoch - 1 - run.state.step)
        if self.steps < 1:
            self.note = f"an epoch of {run.steps_per_epoch} steps is too short to time"
            raise EnoughSteps
        self.sync()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        self.t0, self.wall0 = time.perf_counter(), time.time()

    def end(self, run, done: int) -> None:
        import torch
        self.sync()
        seconds = time.perf_counter() - self.t0
        accum = run.state.grad_accum
        rows = run.batches.batches[self.warmup * accum:(self.warmup + done) * accum]
        length = run.dataset.windows.length
        lengths = [int(n) for batch in rows for n in length[batch]]
        padded = sum(len(batch) * -(-int(length[batch].max()) // 8) * 8 for batch in rows)
        cuda = self.device.type == "cuda"
        self.result = {"timed_steps": done, "seconds": seconds, "wall": (self.wall0, time.time()), "lengths": lengths,
                       "padded_tokens": padded, "micro_batch": run.state.micro_batch, "grad_accum": accum,
                       "peak_allocated_gib": torch.cuda.max_memory_allocated(self.device) / 2 ** 30 if cuda else None,
                       "peak_reserved_gib": torch.cuda.max_memory_reserved(self.device) / 2 ** 30 if cuda else None}


def training_row(timer: StepTimer, shape: flops.Shape, peak: float | None) -> dict:
    """What a ``StepTimer`` saw, as windows/s, tokens/s, padding, model TFLOP/s and MFU."""
    r = timer.result
    row = {"setup_s": round(timer.first_step_s, 1) if timer.first_step_s is not None else None,
           "warmup_steps": timer.warmup, "timed_steps": r["timed_steps"], "note": timer.note}
    if not r["timed_steps"]:
        return {**row, "status": "no steps timed"}
    tokens, work = sum(r["lengths"]), flops.train_flops(shape, r["lengths"])
    utilisation = flops.mfu(work, r["seconds"], peak)
    return {**row, "status": "ok", "seconds": round(r["seconds"], 3), "windows": len(r["lengths"]),
            "windows_per_s": round(len(r["lengths"]) / r["seconds"], 1),
            "tokens_per_s": round(tokens / r["seconds"]),
            "padding_pct": round(100 * (1 - tokens / r["padded_tokens"]), 1),
            "model_tflops_per_s": _tflops(work, r["seconds"]),
            "mfu": round(utilisation, 4) if utilisation is not None else None,
            "micro_batch": r["micro_batch"], "grad_accum": r["grad_accum"], "timed_wall": r["wall"],
            **{k: round(r[k], 2) if r[k] is not None else None for k in ("peak_allocated_gib", "peak_reserved_gib")}}


# ---------------------------------------------------------------- the speed part: running a measurement

@dataclass
class SpeedContext:
    """Everything the measurements share: sources, work folder, device, scale, deadline, peak."""
    sources: Sources
    work: Path
    device: object
    scale: Scale
    deadline: float                 # time.time() after which nothing starts and timing stops
    peak: float | None              # the chip's dense 16-bit TFLOP/s
    busy: BusySampler
    models: dict = field(default_factory=dict)

    def shape(self, preset: str) -> tuple[str, flops.Shape]:
        name = self.scale.shapes[preset]
        return name, flops.SHAPES[name]

    def model_dir(self, preset: str) -> str:
        """A folder with a ``BertForQuestionAnswering`` of the preset's shape (random weights, saved
        in fp16: half the writing; the trainer loads fp32) and the tokenizer; built once."""
        name, shape = self.shape(preset)
        if name not in self.models:
            self.models[name] = build_random_model(shape, self.sources.tokenizer, self.work / f"model-{name}",
                                                   self.device)
        return self.models[name]


def build_random_model(shape: flops.Shape, tokenizer_dir: str, folder: Path, device) -> str:
    import torch
    from transformers import BertConfig, BertForQuestionAnswering
    from hw7qa.windows import load_tokenizer
    tokenizer = load_tokenizer(tokenizer_dir)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=shape.hidden, num_hidden_layers=shape.layers,
                        num_attention_heads=shape.heads, intermediate_size=shape.intermediate,
                        max_position_embeddings=512)
    torch.manual_seed(0)
    with torch.device(device):                      # initialised where it is fast
        model = BertForQuestionAnswering(config)
    model.half().save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    del model
    return str(folder)


@contextlib.contextmanager
def memory_cap(gib: float, device):
    """Within the block this process may use only ``gib`` GiB of the GPU (a T4 has 15), so that
    ``auto_batch`` chooses what it would choose there (approximately: other kernels, no context
    memory counted). Yields the cap applied, None where none is (no cap asked, or no GPU)."""
    import torch
    if not gib or device.type != "cuda":
        yield None
        return
    torch.cuda.empty_cache()
    total = torch.cuda.get_device_properties(device).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, gib * 2 ** 30 / total), device)
    try:
        yield gib
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, device)


def logged_loss(run_dir: Path) -> tuple[int, float] | None:
    """``(step, loss)`` of the run's last metrics.jsonl loss record."""
    path = run_dir / "metrics.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
    losses = [(r["step"], r["loss"]) for r in records if "loss" in r]
    return losses[-1] if losses else None


def train_measurement(m: Measurement, ctx: SpeedContext) -> dict:
    """Train the preset with the measurement's settings through ``hw7qa.train.train`` (no dev file,
    no checkpoints) until ``StepTimer`` has timed its steps."""
    from hw7qa.train import train
    name, shape = ctx.shape(m.preset)
    warmup, steps = ctx.scale.steps[name]
    timer = StepTimer(warmup, steps, ctx.deadline, ctx.device)
    with tempfile.TemporaryDirectory(dir=ctx.work) as run_dir, memory_cap(m.memory_gib, ctx.device) as cap:
        common = {"model_name": ctx.model_dir(m.preset), "train_file": ctx.sources.train, "dev_file": "",
                  "test_file": "", "epochs": 1, "keep_checkpoints": 0, "seed": 0, "output_dir": run_dir}
        cfg = load_config(ROOT / "configs" / f"{m.preset}.json",
                          [f"{k}={v}" for k, v in common.items()] + list(ctx.scale.overrides) + list(m.settings))
        with contextlib.suppress(EnoughSteps):
            train(cfg, on_step=timer)
        loss = logged_loss(Path(run_dir))
    row = training_row(timer, shape, ctx.peak)
    if "timed_wall" in row:
        row["gpu_busy_pct"] = ctx.busy.busy(*row.pop("timed_wall"))
    return {**row, "shape": name, "memory_cap_gib": cap, "loss_step": loss[0] if loss else None,
            "loss": round(loss[1], 4) if loss else None}


def inference_measurement(m: Measurement, ctx: SpeedContext) -> dict:
    """``bench/speed.py``'s rows (a) and (b) on the preset's shape: the course sample's loop against
    ``hw7qa.decode.predict`` and the forward passes alone, at doc_stride 32 and 150, with MFU."""
    import speed
    from hw7qa.data import QAData, load_qa_file
    from hw7qa.models import load_model
    from hw7qa.windows import encode, eval_windows, load_tokenizer
    name, shape = ctx.shape(m.preset)
    folder = ctx.model_dir(m.preset)
    model, tokenizer = load_model(folder).to(ctx.device).eval(), load_tokenizer(folder)
    dev = load_qa_file(ctx.sources.dev, need_answers=True)
    dev = QAData(dev.path, dev.questions[:ctx.scale.dev_limit], dev.paragraphs)
    batch = load_config(ROOT / "configs" / f"{m.preset}.json").eval_batch_size
    settings = dataclasses.asdict(load_config(None, list(m.settings)))      # typed values
    settings = {key: settings[key] for key in (item.split("=", 1)[0] for item in m.settings)}
    rows = speed.inference_rows(model, tokenizer, dev, batch, ctx.device, settings=settings)
    strides = []
    for stride, (a, b) in zip((32, 150), zip(rows[::2], rows[1::2])):
        lengths = eval_windows(encode(dev, tokenizer, Config(**speed.SAMPLE_WINDOWS, doc_stride=stride).windows)).length
        work = flops.forward_flops(shape, lengths)
        strides.append({"doc_stride": stride, "windows": a["windows"], "sample_loop_s": a["sample_loop_s"],
                        "project_s": a["project_s"], "speedup": a["speedup"], "forward_s": b["forward_s"],
                        "forward_share": b["ratio"], "forward_tflops_per_s": _tflops(work, b["forward_s"]),
                        "forward_mfu": _round(flops.mfu(work, b["forward_s"], ctx.peak)),
                        "end_to_end_mfu": _round(flops.mfu(work, a["project_s"], ctx.peak))})
    return {"status": "ok", "shape": name, "dev_questions": len(dev.questions), "eval_batch_size": batch,
            "strides": strides}


def smoke_compiling() -> None:
    """In the smoke run, ``compile=true`` traces the model with ``aot_eager``, as the package's
    tests do: inductor's C++ build of a training graph takes minutes on a small CPU."""
    from hw7qa import compiling
    compiling.COMPILE_OPTIONS = {**compiling.COMPILE_OPTIONS, "backend": "aot_eager"}


def _tflops(work: float, seconds: float) -> float | None:
    """Model TFLOP/s to 3 significant digits."""
    return float(f"{work / seconds / 1e12:.3g}") if seconds else None


def _round(x: float | None, digits: int = 4) -> float | None:
    return None if x is None else round(x, digits)


@contextlib.contextmanager
def released():
    """Frees what a measurement left on the GPU, forgets compiled code (``torch.compile``'s cache
    has a limit per function) and restores the TF32 switches a ``tf32`` lever may have turned."""
    import torch
    switches = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = switches
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        if hasattr(torch, "_dynamo"):
            torch._dynamo.reset()


def measure(m: Measurement, ctx: SpeedContext) -> dict:
    """One measurement's row: measured, "not available" (a setting this version lacks), "not run"
    (it would not end within the budget) or "error" (its first line; the others go on)."""
    row = {"name": m.name, "kind": m.kind, "preset": m.preset, "settings": list(m.settings), "baseline": m.baseline}
    missing = unavailable(m.settings)
    if missing:
        return {**row, "status": "not available", "why": f"this version's Config has no {', '.join(missing)}"}
    left = ctx.deadline - time.time()
    if m.estimate_s > left:
        return {**row, "status": "not run", "why": f"estimated {m.estimate_s:g} s, {max(0, left):.0f} s of the "
                                                    f"budget left"}
    print(f"== {m.name}", flush=True)
    started = time.time()
    try:
        with released():
            row.update(train_measurement(m, ctx) if m.kind == "train" else inference_measurement(m, ctx))
    except Exception as e:          # recorded; a GPU window is too short to lose the other measurements
        traceback.print_exc()       # into the run's log, for whoever fixes it; the markdown comes last
        row.update(status="error", error=f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}"[:500])
    row["wall_s"] = round(time.time() - started, 1)
    print(f"   {row['status']} in {row['wall_s']} s", flush=True)
    return row


def speed_part(args, sources: Sources, paths: tuple[Path, Path]) -> str:
    """Every selected measurement that fits the budget, written after each; the markdown."""
    import torch
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    info = machine(device)
    plan = selected(SPEED_PLAN, args.only)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    result = {"part": "speed", "smoke": args.smoke, "machine": info, "budget_min": args.budget_min,
              "formula": flops.FORMULA, "peak_source": flops.PEAK_SOURCE, "measurements": []}
    if args.smoke and "compile" in {f.name for f in dataclasses.fields(Config)}:
        smoke_compiling()
    with BusySampler() as busy:
        ctx = SpeedContext(sources, work, device, SMOKE_SCALE if args.smoke else GPU_SCALE,
                           args.started + 60 * args.budget_min, info["peak_tflops"], busy)
        for m in plan:
            result["measurements"].append(measure(m, ctx))
            result["gpu_busy_pct"] = busy.busy(args.started)
            markdown = speed_markdown(result)
            write_part(paths, result, markdown)
    result["gpu_busy_why"] = busy.why or None
    write_part(paths, result, speed_markdown(result))
    return speed_markdown(result)


# ---------------------------------------------------------------- the speed part: tables

def _cell(x, fmt: str = "{}") -> str:
    return "—" if x is None else fmt.format(x)


def training_table(rows: list[dict]) -> list[str]:
    by_name = {r["name"]: r for r in rows}
    lines = ["| measurement | settings | micro × accum | windows/s | vs baseline | tokens/s | padding | model TFLOP/s "
             "| MFU | GPU busy | loss (step) | peak GiB (cap) | setup s |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        if r["kind"] != "train" or r["status"] != "ok":
            continue
        base = by_name.get(r["baseline"], {})
        ratio = (f"{r['windows_per_s'] / base['windows_per_s']:.2f}× {r['baseline']}"
                 if base.get("status") == "ok" and base.get("windows_per_s") else "")
        loss = f"{r['loss']:.4f} ({r['loss_step']})" if r.get("loss") is not None else "—"
        cap = f" ({r['memory_cap_gib']:g})" if r.get("memory_cap_gib") else ""
        lines.append(f"| {r['name']} | {' '.join(r['settings'])} | {r['micro_batch']} × {r['grad_accum']} "
                     f"| {r['windows_per_s']:.1f} | {ratio} | {r['tokens_per_s']} | {r['padding_pct']}% "
                     f"| {r['model_tflops_per_s']} | {_cell(r['mfu'], '{:.1%}')} "
                     f"| {_cell(r.get('gpu_busy_pct'), '{}%')} "
                     f"| {loss} | {_cell(r['peak_allocated_gib'])}{cap} | {r['setup_s']} |")
    return lines


# the presets, and the measurement that trains each as it is (macbert-base: bert-base's shape and settings)
PRESET_ROWS = (("bert-base", "base bf16"), ("macbert-base", "base bf16"), ("macbert-large", "large bf16"),
               ("bert-base", "base fp16 in 15 GiB (T4)"), ("macbert-large", "large fp16 in 15 GiB (T4)"))


def presets_table(rows: list[dict]) -> list[str]:
    by_name = {r["name"]: r for r in rows if r["status"] == "ok"}
    lines = ["| preset | measured as | recipe batch | auto_batch chose (micro × accum) | peak allocated GiB "
             "| peak reserved GiB |", "| --- | --- | --- | --- | --- | --- |"]
    for preset, name in PRESET_ROWS:
        if name in by_name:
            r, cfg = by_name[name], load_config(ROOT / "configs" / f"{preset}.json")
            lines.append(f"| {preset} | {name} | {cfg.batch_size} × {cfg.grad_accum} | {r['micro_batch']} × "
                         f"{r['grad_accum']} | {_cell(r['peak_allocated_gib'])} | {_cell(r['peak_reserved_gib'])} |")
    return lines


def inference_table(rows: list[dict]) -> list[str]:
    lines = ["| measurement | doc_stride | windows | sample loop s | project s | speedup (goal ≥ 10× at 32) "
             "| forward alone s | forward / project (goal ≥ 0.9) | forward MFU | end-to-end MFU |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        for s in r.get("strides", []) if r["kind"] == "inference" else []:
            lines.append(f"| {r['name']} ({r['dev_questions']} questions, batch {r['eval_batch_size']}) "
                         f"| {s['doc_stride']} | {s['windows']} | {s['sample_loop_s']} | {s['project_s']} "
                         f"| {s['speedup']}× | {s['forward_s']} | {s['forward_share']} "
                         f"| {_cell(s['forward_mfu'], '{:.1%}')} | {_cell(s['end_to_end_mfu'], '{:.1%}')} |")
    return lines


def speed_markdown(result: dict) -> str:
    info, rows = result["machine"], result["measurements"]
    others = [f"- {r['name']}: {r['status']} ({r.get('why') or r.get('error') or r.get('note') or ''})"
              for r in rows if r["status"] != "ok" or r.get("note")]
    return "\n".join([
        f"# Speed on {info['gpu'] or 'CPU'}" + (" (smoke run: tiny shapes, not a measurement)" * result["smoke"]),
        "", (f"{info['gpu']} (driver {info['gpu_driver']}, CUDA {info['cuda']}, {info['gpu_memory_gib']} GiB, dense "
             f"16-bit peak {_cell(info['peak_tflops'])} TFLOP/s); " if info["gpu"] else "No GPU; ")
        + f"{info['cpu_cores']} CPU cores; torch {info['torch']}, transformers {info['transformers']}, accelerate "
          f"{info['accelerate']}; {info['date']}",
        "", f"`{info['command']}` (budget {result['budget_min']:g} min; GPU busy over the part: "
            f"{_cell(result.get('gpu_busy_pct'), '{}%')})",
        "", "MFU = model FLOPs / (seconds × peak); training FLOPs per window of T real tokens = 6·N·T + 12·L·h·T², "
            "N = non-embedding parameters incl. the QA head (bench/flops.py). Random weights of the preset's shape; "
            "steady state: the first steps of each run are not timed.",
        "", "## Training (hw7qa.train.train)", "", *training_table(rows),
        "", "## Presets: GPU memory and what auto_batch chose", "", *presets_table(rows),
        "", "## Inference (bench/speed.py rows (a) and (b), the course sample's windows)", "", *inference_table(rows),
        "", "## Not measured, or with a note", "", *(others or ["- none"]), ""])


# ---------------------------------------------------------------- the accuracy part

def verdicts(summary: dict, min_seeds: int = 3) -> list[str]:
    """What each row's paired ΔEM against the baseline allows: a technique enters a preset only
    where its interval over ≥ ``min_seeds`` seeds excludes 0 (above it)."""
    lines = []
    for row, entry in summary.get("rows", {}).items():
        vs = entry.get("vs_baseline", {}).get("em")
        if row == summary["baseline"]:
            continue
        if vs is None:
            lines.append(f"- {row}: no seed paired with {summary['baseline']} yet: no decision")
        elif vs["n_seeds"] < min_seeds:
            lines.append(f"- {row}: {vs['n_seeds']} paired seeds (needs ≥ {min_seeds}): no decision")
        else:
            interval = f"ΔEM {vs['diff']:+.4f} [{vs['low']:+.4f}, {vs['high']:+.4f}] over {vs['n_seeds']} seeds"
            verdict = ("excludes 0, above: may enter a preset" if vs["low"] > 0 else "excludes 0, below: stays off"
                       if vs["high"] < 0 else "holds 0: no effect established, stays off")
            lines.append(f"- {row}: {interval} {verdict}")
    return lines


def accuracy_part(args, sources: Sources, paths: tuple[Path, Path]) -> str:
    """``bench/accuracy.py`` with the technique recipes on the bert-proxy (the demo model in the
    smoke run), within what is left of the budget; its JSON and tables, with the GPU's busy share and
    the decisions added; the markdown."""
    left = args.budget_min - (time.time() - args.started) / 60
    argv = ["--model", sources.proxy, "--train", sources.train, "--dev", sources.dev,
            "--recipes", ",".join(TECHNIQUE_RECIPES), "--baseline", "project", "--seeds", args.seeds,
            "--jobs", str(args.jobs), "--budget-min", f"{max(left, 0.01):.2f}", "--run-estimate-min",
            str(ACCURACY_RUN_MIN), "--runs", str(Path(args.work) / "accuracy-runs"), "--out", str(paths[0]),
            "--overwrite"] + (["--device", "cpu", "--n-boot", "200", "--train-limit", "40", "--dev-limit", "8"]
                              if args.smoke else [])
    if args.jobs > 1:
        os.environ.update({k: v for k, v in WORKER_ENV.items() if k not in os.environ})
    with BusySampler() as busy:
        markdown, _ = accuracy.run_benchmark(accuracy.parser().parse_args(argv),
                                             {"gpu_bench": {"part": "accuracy", "smoke": args.smoke,
                                                            "budget_min": args.budget_min, "jobs": args.jobs}})
    saved = json.loads(paths[0].read_text(encoding="utf-8"))
    saved["setup"]["gpu_busy_pct"], saved["setup"]["gpu_busy_why"] = busy.busy(), busy.why or None
    saved["setup"]["decisions"] = verdicts(saved["summary"])
    markdown = (f"# Accuracy on {saved['setup']['environment']['gpu'] or 'CPU'}"
                + (" (smoke run: the demo model, not a measurement)" if args.smoke else "") + "\n\n" + markdown
                + f"\nGPU busy over the part: {_cell(busy.busy(), '{}%')}\n\n## Decisions (ΔEM against project)\n\n"
                + "\n".join(saved["setup"]["decisions"] or ["- no rows"]) + "\n")
    write_part(paths, saved, markdown)
    return markdown


# ---------------------------------------------------------------- the T4 estimate

HW7 = {"train": 31_690, "dev": 4_131, "test": 4_957}      # ML2022 HW7's questions (course slides; anchors.md §1)
COURSE_T4_MIN = {"sample-recipe": ("simple", 8), "bert-base": ("medium", 8), "macbert-base": ("strong", 25),
                 "macbert-large": ("boss", 150)}          # the course's T4-with-AMP estimates (slides; anchors.md §5)


def preset_work(preset: str, data, tokenizer) -> dict:
    """Model FLOPs of the preset's whole run at HW7's size: its epochs of training windows, the dev
    evaluations its policy makes during training, and predicting the test file. Windows and their
    lengths come from ``data`` (the preset's window settings and training policy), scaled from its
    question count to HW7's."""
    from hw7qa.train import evaluate_due
    from hw7qa.windows import encode, eval_windows, train_windows
    cfg = load_config(ROOT / "configs" / f"{preset}.json")
    shape = flops.SHAPES[flops.MODEL_SHAPES[cfg.model_name]]
    enc = encode(data, tokenizer, cfg.windows)
    scale = HW7["train"] / len(data.questions)
    lengths = train_windows(enc, cfg.train_windows, random.Random(0)).length
    epoch_windows = round(len(lengths) * scale)
    steps_per_epoch = math.ceil(math.ceil(epoch_windows / cfg.batch_size) / cfg.grad_accum)
    total = steps_per_epoch * cfg.epochs
    evaluations = sum(evaluate_due(step, steps_per_epoch, total, cfg) for step in range(1, total + 1))
    per_question = flops.forward_flops(shape, eval_windows(enc).length) / len(data.questions)
    training = cfg.epochs * flops.train_flops(shape, lengths) * scale
    inference = (evaluations * HW7["dev"] + HW7["test"]) * per_question
    return {"preset": preset, "shape": flops.MODEL_SHAPES[cfg.model_name], "epochs": cfg.epochs,
            "epoch_windows": epoch_windows, "dev_evaluations": evaluations, "training_pflop": training / 1e15,
            "inference_pflop": inference / 1e15, "pflop": (training + inference) / 1e15}


def measured_mfus(speed_json: str) -> tuple[dict, str]:
    """Training MFU per shape from a speed part's JSON (its fp16 row, else bf16), and where from."""
    if not speed_json:
        return {}, "pending a GPU"
    saved = json.loads(Path(speed_json).read_text(encoding="utf-8"))
    rows = {r["name"]: r for r in saved["measurements"] if r.get("status") == "ok" and r.get("mfu")}
    found = {}
    for shape, prefix in (("bert-base", "base"), ("large", "large")):
        for precision in ("fp16", "bf16"):
            if f"{prefix} {precision}" in rows and shape not in found:
                found[shape] = rows[f"{prefix} {precision}"]["mfu"]
    return found, f"measured on {saved['machine']['gpu']} ({Path(speed_json).name})"


def t4_estimate(data_file: str, tokenizer_dir: str, speed_json: str = "") -> tuple[dict, str]:
    """A T4's hours per preset (an estimate): FLOPs of the whole run over the T4's 65 TFLOP/s at a
    band of MFU from two T4 anchors, and at the MFU the speed part measured (a placeholder for a
    T4's: a big GPU is harder to keep busy)."""
    from hw7qa.data import load_qa_file
    from hw7qa.windows import load_tokenizer
    data, tokenizer = load_qa_file(data_file, need_answers=True), load_tokenizer(tokenizer_dir)
    rows = [preset_work(preset, data, tokenizer) for preset in COURSE_T4_MIN]
    course = rows[0]["pflop"] * 1e15 / (COURSE_T4_MIN["sample-recipe"][1] * 60 * flops.T4_PEAK_TFLOPS * 1e12)
    anchors = {"course: sample recipe in 8 min": course, "ELECTRA-base fp16 training (transformers docs)":
               flops.electra_t4_mfu()}
    band = (min(anchors.values()), max(anchors.values()))
    measured, where = measured_mfus(speed_json)
    for row in rows:
        tier, minutes = COURSE_T4_MIN[row["preset"]]
        work = row["pflop"] * 1e15
        row.update(course=f"{tier}: {minutes} min",
                   hours_band=[flops.hours(work, flops.T4_PEAK_TFLOPS, u) for u in band[::-1]],
                   hours_measured=flops.hours(work, flops.T4_PEAK_TFLOPS, measured.get(row["shape"])))
    result = {"part": "t4-estimate", "data": os.path.relpath(data_file, ROOT), "questions_in_data": len(data.questions),
              "hw7": HW7,
              "anchors_mfu": anchors, "band_mfu": band, "measured_mfu": measured, "measured_from": where, "rows": rows}
    return result, t4_markdown(result)


def t4_markdown(result: dict) -> str:
    low, high = result["band_mfu"]
    lines = [f"| preset | shape | course (T4 fp16) | epochs × windows | dev evaluations | PFLOP (training + inference) "
             f"| T4 at {high:.0%}–{low:.0%} MFU (band) | T4 at measured MFU |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in result["rows"]:
        fast, slow = r["hours_band"]
        measured = (f"{r['hours_measured'] * 60:.0f} min ({result['measured_mfu'][r['shape']]:.1%})"
                    if r["hours_measured"] else result["measured_from"])
        lines.append(f"| {r['preset']} | {r['shape']} | {r['course']} | {r['epochs']} × {r['epoch_windows']:,} "
                     f"| {r['dev_evaluations']} | {r['training_pflop']:.1f} + {r['inference_pflop']:.1f} "
                     f"| {fast * 60:.0f}–{slow * 60:.0f} min | {measured} |")
    anchors = "; ".join(f"{name}: {value:.1%}" for name, value in result["anchors_mfu"].items())
    return ("**Estimate, not a measurement.** Model FLOPs (bench/flops.py) of each preset's whole run at HW7's size "
            f"({result['hw7']['train']:,} training, {result['hw7']['dev']:,} dev, {result['hw7']['test']:,} test "
            f"questions), window lengths from {Path(result['data']).name} ({result['questions_in_data']:,} questions, "
            f"scaled), over a T4's 65 TFLOP/s fp16 peak. The band is two T4 anchors' MFU by the same formula "
            f"({anchors}); the measured column uses the speed part's MFU on its GPU.\n\n" + "\n".join(lines) + "\n")


# ---------------------------------------------------------------- output and command line


def result_paths(results: Path, part: str, gpu: str | None, smoke: bool) -> tuple[Path, Path]:
    """``<results>/gpu-<part>-<gpu>-<date>.json`` and ``.md`` (names $OUT takes: letters, digits, '-', '.')."""
    slug = "smoke-cpu" if smoke else re.sub(r"[^a-z0-9]+", "-", (gpu or "cpu").lower()).strip("-")
    stem = f"gpu-{part}-{slug}-{datetime.date.today().isoformat()}" if part != "t4-estimate" else "t4-estimate"
    return results / f"{stem}.json", results / f"{stem}.md"


def write_part(paths: tuple[Path, Path], result: dict, markdown: str) -> None:
    """The part's JSON and markdown, each whole or not at all, and copies in ``$OUT`` if it is set."""
    with atomic_write(paths[0], encoding="utf-8") as f:
        f.write(json.dumps(result, ensure_ascii=False, indent=1, default=str) + "\n")
    with atomic_write(paths[1], encoding="utf-8") as f:
        f.write(markdown)
    if os.environ.get("OUT"):
        for path in paths:
            shutil.copy2(path, Path(os.environ["OUT"]) / path.name)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--prepare", action="store_true", help="fill .gpu-carry/ from the shared folder")
    what.add_argument("--part", choices=("speed", "accuracy", "both"))
    what.add_argument("--t4-estimate", nargs="?", const="", metavar="SPEED_JSON", help="a T4's hours per preset")
    parser.add_argument("--smoke", action="store_true", help="the same code on the CPU: tiny shapes, a few steps")
    parser.add_argument("--budget-min", type=float, help=f"minutes for a part (default {BUDGET_MIN})")
    parser.add_argument("--only", default="", help="speed: only these measurements (names, commas)")
    parser.add_argument("--jobs", type=int, help=f"accuracy: runs at once (default {ACCURACY_JOBS}; --smoke 1)")
    parser.add_argument("--seeds", help="accuracy: seeds (default 0-2; --smoke 0,1)")
    parser.add_argument("--results", help="folder for the JSON and markdown (default bench/results; --smoke "
                                          "outputs/gpu-smoke)")
    parser.add_argument("--work", default=str(ROOT / "outputs" / "gpu-work"), help="model and run folders")
    parser.add_argument("--data", help="--t4-estimate: the QA file whose windows are counted (scaled to HW7's size)")
    parser.add_argument("--shared", default=os.environ.get("HW7QA_SHARED", str(ROOT.parent / "shared")))
    args = parser.parse_args(argv)
    args.jobs = args.jobs or (1 if args.smoke else ACCURACY_JOBS)
    args.seeds = args.seeds or ("0,1" if args.smoke else "0-2")
    args.results = Path(args.results or ROOT / ("outputs/gpu-smoke" if args.smoke else "bench/results"))
    return args


def found(key: str, shared: str) -> str:
    """A carried file, else the shared folder's; Refused if neither exists."""
    for path in (CARRY / CARRIED[key][0], Path(shared) / CARRIED[key][1]):
        if path.exists():
            return str(path)
    raise Refused(f"neither {CARRY / CARRIED[key][0]} nor {Path(shared) / CARRIED[key][1]} exists: run "
                  f"`python bench/gpu.py --prepare`, or give --shared")


def t4_part(args) -> str:
    """``--t4-estimate``: window lengths from ``--data`` (default: the real HW7 training file
    data/hw7_train.json if it is there, else the 2021 HW7 dev file), with the bert-base-chinese
    tokenizer (carried, else the shared folder's; in --smoke the sample's); written to ``--results``."""
    if args.smoke:
        sources = smoke_sources(Path(args.work) / "smoke")
        data, tokenizer = sources.dev, sources.tokenizer
    else:
        real = ROOT / "data" / "hw7_train.json"
        data = args.data or (str(real) if real.is_file() else found("dev", args.shared))
        tokenizer = found("tokenizer", args.shared)
    result, markdown = t4_estimate(data, tokenizer, args.t4_estimate)
    write_part(result_paths(args.results, "t4-estimate", None, args.smoke), result, markdown)
    return markdown


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        if args.prepare:
            print(prepare(Path(args.shared)))
            return 0
        if args.t4_estimate is not None:
            print(t4_part(args))
            return 0
        sources = smoke_sources(Path(args.work) / "smoke") if args.smoke else carried_sources()
        budget = args.budget_min
        for part in ("speed", "accuracy") if args.part == "both" else (args.part,):
            args.started, args.budget_min = time.time(), budget if budget is not None else BUDGET_MIN[part]
            paths = result_paths(args.results, part, machine_gpu(), args.smoke)
            print((speed_part if part == "speed" else accuracy_part)(args, sources, paths))
            print(f"written: {paths[0]} and {paths[1]}")
    except Refused as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def machine_gpu() -> str | None:
    import torch
    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None


if __name__ == "__main__":
    sys.exit(main())

"""The model: loaded with its tokenizer, for training (a hub name, a local folder, or the demo's tiny random
BERT) or from a run folder (``<run>/model``); run at a precision (mixed, ``tf32``), compiled or not, with a
fresh ``Accelerator`` per call of ``train``/``predict``/``evaluate``, so that a notebook can train again.

A run folder's model is loaded from its own files only: an absolute path, ``local_files_only``, every file
checked first (``run_model_dir``), and the tokenizer checked against the model (``check_pair``), so that a
damaged folder is named, never used, and never stands in for a hub name.
"""
from __future__ import annotations

import contextlib
import functools
import tempfile
from pathlib import Path

import torch

from .config import TINY_MODEL, Config, read_json
from .data import QAData
from .files import DamagedFile, check_file, check_folder, first_line, refused_as

# CJK ideographs (with extensions and compatibility forms), CJK punctuation and full-width forms
CJK_CHARACTERS = r"[\u2e80-\u2fff\u3000-\u303f\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uff00-\uffef]"


def load_tokenizer(name_or_dir, isolate_digits: bool = False, isolate_cjk: bool = False, **options):
    """A fast ``AutoTokenizer`` (``options`` go to ``from_pretrained``) in which each digit (``isolate_digits``)
    and each CJK character (``isolate_cjk``) is its own pre-token if asked, so that an answer may start or end
    at any of them. Not saved with the tokenizer: the run's config carries it and every load applies it."""
    import json
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(str(name_or_dir), use_fast=True, **options)
    # a token is the smallest thing an answer can start or end on: WordPiece keeps "1900" and "81" whole (DRCD
    # marks "8" inside "81"); sentencepiece vocabularies (XLM-R) also join Chinese characters ("人的", "1990年")
    isolate = [{"type": "Digits", "individual_digits": True}] if isolate_digits else []
    if isolate_cjk:
        isolate.append({"type": "Split", "pattern": {"Regex": CJK_CHARACTERS}, "behavior": "Isolated", "invert": False})
    if isolate:
        backend = tokenizer.backend_tokenizer
        spec = json.loads(backend.to_str())
        original = spec["pre_tokenizer"]
        steps = [] if original is None else original["pretokenizers"] if original["type"] == "Sequence" else [original]
        metaspace = [step for step in steps if step["type"] == "Metaspace"]
        if metaspace:  # "▁" only where a space was: not before every isolated character
            metaspace[0]["prepend_scheme"] = "first"
            steps = [step for step in steps if step["type"] != "WhitespaceSplit"]
        spec["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": isolate + steps}
        backend.pre_tokenizer = Tokenizer.from_str(json.dumps(spec)).pre_tokenizer
    return tokenizer


# what save_model writes besides the weights: the model's config and a fast tokenizer's two files
MODEL_FILES = ["config.json", "tokenizer_config.json", "tokenizer.json"]


def looks_like_path(name: str) -> bool:
    """Hub names are ``name`` or ``owner/name``; anything else is meant as a folder."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name


def from_pretrained(what: str, load, name_or_dir: str):
    """``load(name_or_dir)``, or a ValueError that says in one sentence why it failed."""
    folder = Path(name_or_dir).expanduser()
    if not folder.exists() and looks_like_path(name_or_dir):
        raise ValueError(f"model_name={name_or_dir!r}: no such folder")
    if what == "model" and folder.exists():
        check_model_folder(folder, name_or_dir)
    try:
        return load(str(folder) if folder.exists() else name_or_dir)
    except Exception as e:  # transformers raises OSError, ValueError or safetensors' own errors here
        where = f"the folder {folder}" if folder.exists() else f"{name_or_dir!r} (not a local folder; from the hub)"
        raise ValueError(f"cannot load the {what} of {where}: {first_line(e)}") from e


@contextlib.contextmanager
def quiet_transformers():
    """transformers' own progress bars ("Loading weights", "Writing model shards") off inside, through its
    tqdm hook: downloads from the hub and transformers calls outside (a notebook user's own) keep theirs."""
    # hw7qa loads and saves a model at every best dev score and every predict: bars between its own lines
    from transformers.utils import logging
    if not hasattr(logging, "set_tqdm_hook"):     # 4.57 has none: it draws bars only for sharded checkpoints
        yield
        return
    previous = logging.set_tqdm_hook(lambda factory, args, kwargs: logging.EmptyTqdm(*args, **kwargs))
    try:
        yield
    finally:
        logging.set_tqdm_hook(previous)


def check_model_folder(folder: Path, name: str) -> None:
    """A local folder given as ``model_name`` holds a model: its config.json and weights (transformers'
    own error for a tokenizer-only folder is about a ``model_type`` key or a repo id)."""
    if folder.is_file():
        raise ValueError(f"model_name={name!r} is a file; give the folder that holds the model's config.json and "
                         f"weights, or a hub name")
    missing = ([] if (folder / "config.json").is_file() else ["config.json"]) + (
        [] if any((folder / name).is_file() for name in weight_names()) else
        [f"weights ({' or '.join(weight_names())})"])
    if missing:
        raise ValueError(f"model_name={name!r}: the folder has no {' and no '.join(missing)}, so it holds no model "
                         f"(only a tokenizer?); give a folder written by save_pretrained, or a hub name")


def weight_names() -> list[str]:
    """The file names transformers loads weights from: safetensors first, then PyTorch's, each whole or sharded."""
    from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME, WEIGHTS_INDEX_NAME, WEIGHTS_NAME
    return [SAFE_WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME, WEIGHTS_NAME, WEIGHTS_INDEX_NAME]


class Float32Head(torch.nn.Linear):
    """A QA head that computes its start and end logits in float32 also under float16 autocast, where
    they would keep 3 significant digits (scores near 8 on steps of 1/256: close spans reorder and
    tie). Its weights and state-dict keys stay a ``Linear``'s."""
    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        with torch.autocast(hidden.device.type, enabled=False):
            return super().forward(hidden.float())


def with_float32_head(model):
    """``model`` with its QA head (``qa_outputs``, a ``Linear``) a ``Float32Head``, changed in place."""
    if type(getattr(model, "qa_outputs", None)) is torch.nn.Linear:
        model.qa_outputs.__class__ = Float32Head
    return model


def load_model(name_or_dir: str, local_files_only: bool = False):
    """``AutoModelForQuestionAnswering`` in float32 whatever dtype its files hold, its head a ``Float32Head``."""
    # transformers 5 loads the checkpoint's dtype: a model stored in fp16 would be trained in fp16 (AdamW on fp16
    # weights moves the loss in steps of 1/256 and stalls); mixed precision casts per operation instead
    import transformers
    # ``dtype`` since transformers 4.56; ``torch_dtype`` before (and deprecated after)
    new = tuple(int(part) for part in transformers.__version__.split(".")[:2]) >= (4, 56)
    dtype = {"dtype" if new else "torch_dtype": torch.float32}
    with quiet_transformers():
        return with_float32_head(from_pretrained("model", lambda name: transformers.AutoModelForQuestionAnswering
                                                 .from_pretrained(name, local_files_only=local_files_only, **dtype),
                                                 name_or_dir))


def load_tokenizer_for(cfg: Config, train_data: QAData | None = None):
    """The run's tokenizer: ``cfg.model_name``'s, or for ``tiny-random-bert`` one built from the characters of the
    training file (``train_data``) in a temporary folder (a write the system refuses there names that folder)."""
    from . import tiny
    if cfg.model_name == TINY_MODEL:
        texts = train_data.paragraphs + [q.question_text for q in train_data.questions]
        with refused_as(tempfile.gettempdir()):
            return tiny.build_tiny_tokenizer(texts, isolate_digits=cfg.isolate_digits)
    return from_pretrained("tokenizer", lambda name: load_tokenizer(name, cfg.isolate_digits, cfg.isolate_cjk),
                           cfg.model_name)


def load_model_and_tokenizer(cfg: Config, train_data: QAData | None = None):
    """Model and fast tokenizer from a hub name or a local folder; ``tiny-random-bert`` builds a tiny
    random BERT whose vocabulary is the characters of the training file (demo and tests)."""
    from . import tiny
    if cfg.model_name == TINY_MODEL:
        tokenizer = load_tokenizer_for(cfg, train_data)
        return with_float32_head(tiny.build_tiny_model(len(tokenizer), seed=cfg.seed)), tokenizer
    return load_model(cfg.model_name), load_tokenizer_for(cfg, train_data)


def check_max_length(model_config, max_length: int) -> None:
    """Refuse windows longer than the model's position embeddings (RoBERTa-style models lose two
    positions to their padding offset) with a clear message, not an index error deep in the model."""
    limit = getattr(model_config, "max_position_embeddings", None)
    if limit is None:
        return
    if "roberta" in getattr(model_config, "model_type", ""):
        limit -= 2
    if max_length > limit:
        raise ValueError(f"max_length={max_length} but this model has only {limit} positions; set max_length={limit} "
                         f"or less")


def run_model_dir(run_dir: str | Path) -> Path:
    """``<run>/model`` as an absolute path (never taken for a hub name), once its files are checked:
    config.json, the weights (with every shard an index names), tokenizer.json and
    tokenizer_config.json are there, and every file in it is whole (``check_folder``)."""
    folder = (Path(run_dir) / "model").resolve()
    if not folder.is_dir() and folder.with_name("model.old").is_dir():
        raise DamagedFile(Path(run_dir) / "model", "is missing: a save of a better model was cut off (the last "
                          "one is model.old)", "resume the run, which puts model.old back first, or rename it to model")
    if not folder.is_dir():
        raise DamagedFile(Path(run_dir) / "model", "is missing", "is this a run folder made by 'train'? (a run "
                          "stopped before its first dev evaluation has no model yet: resume it)")
    fix = f"restore {Path(run_dir) / 'model'} from a copy of the run, or train the run again"
    present = [name for name in weight_names() if (folder / name).is_file()]
    weights = present[:1] or weight_names()[:1]           # none there: name the one save_model writes
    if weights[0].endswith(".index.json"):
        check_file(folder / weights[0], fix)
        weights += sorted(set(read_json(folder / weights[0]).get("weight_map", {}).values()))
    check_folder(folder, MODEL_FILES + weights, fix)
    return folder


def run_tokenizer(run_dir: str | Path, cfg: Config):
    """The tokenizer saved with the run's model (its files checked, ``run_model_dir``), with the run's
    ``isolate_*`` knobs applied, checked against the model (``check_pair``)."""
    folder = run_model_dir(run_dir)
    tokenizer = from_pretrained("tokenizer", lambda name: load_tokenizer(
        name, cfg.isolate_digits, cfg.isolate_cjk, local_files_only=True), str(folder))
    check_pair(Path(run_dir) / "model", tokenizer)
    return tokenizer


def check_pair(folder: Path, tokenizer) -> None:
    """The tokenizer belongs to the model saved beside it in ``folder``: every token id has an
    embedding row, and it has most of the model's vocabulary (models pad their embedding by a few
    rows at most; a tokenizer that lost its vocabulary keeps only its special tokens)."""
    rows = read_json(folder / "config.json").get("vocab_size")
    if isinstance(rows, int) and not rows // 2 < len(tokenizer) <= rows:
        raise DamagedFile(folder / "tokenizer.json", f"does not belong to the model beside it: {len(tokenizer):,} "
                          f"tokens, but config.json gives the model {rows:,} embedding rows", f"restore {folder} "
                          f"from a copy of the run, or train the run again")


def load_run_model(run_dir: str | Path):
    """The run's saved model (``load_model``) from its own checked files only (``run_model_dir``)."""
    return load_model(str(run_model_dir(run_dir)), local_files_only=True)


# ---------------------------------------------------------------- precision and processes

def resolve_precision(requested: str) -> str:
    """``auto`` → bf16 on GPUs that support it, fp16 on other GPUs (T4), no on CPU."""
    if requested != "auto":
        return requested
    if not torch.cuda.is_available():
        return "no"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def inference_autocast(precision: str, device: torch.device):
    """The autocast context for a forward pass at ``precision`` (a ``Config.mixed_precision`` value)."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(resolve_precision(precision))
    return contextlib.nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)


@contextlib.contextmanager
def tf32_matmuls(enabled: bool):
    """TF32 for CUDA float32 matmuls and convolutions inside the block if ``enabled``; old settings restored."""
    # CUDA flags only: set_float32_matmul_precision also changes CPU (oneDNN) results and breaks inductor (torch 2.9)
    matmul, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    before = matmul.allow_tf32, cudnn.allow_tf32
    if enabled:
        matmul.allow_tf32 = cudnn.allow_tf32 = True
    try:
        yield
    finally:
        matmul.allow_tf32, cudnn.allow_tf32 = before


def processes():
    """The processes ``accelerate launch`` started (or this one alone), as an ``Accelerator`` sets them up."""
    # ACCELERATE_USE_CPU (--cpu): without it a bare PartialState() on a machine without a GPU ignores the others
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env
    return PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))


def reset_accelerate_state() -> None:
    """Forget the precision and accumulation settings of the last ``Accelerator`` (not the processes)."""
    from accelerate.state import AcceleratorState, GradientState
    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()


@contextlib.contextmanager
def accelerator_for(precision: str = "no", grad_accum: int = 1, log_with: str = "none", project_dir=None):
    """A new ``Accelerator`` (``split_batches``: ``batch_size`` is the total over all processes) logging to
    ``log_with`` below ``project_dir``. On exit its trackers finish (a refused write is an ``OSError`` naming
    its folder, unless the block failed) and accelerate's state is cleared."""
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration
    reset_accelerate_state()    # a second Accelerator with another precision would raise otherwise
    accelerator = Accelerator(mixed_precision=resolve_precision(precision), gradient_accumulation_steps=grad_accum,
                              # non_blocking: pinned batches are copied to the device without waiting
                              dataloader_config=DataLoaderConfiguration(split_batches=True, non_blocking=True),
                              log_with=None if log_with == "none" else log_with,
                              project_dir=None if project_dir is None else str(project_dir))
    failed = True
    with quiet_writer_threads():
        try:
            yield accelerator
            failed = False
        finally:
            try:
                for tracker in accelerator.trackers:    # not end_training: later calls need the process group
                    with refused_as(getattr(tracker, "logging_dir", None) or project_dir or "."):
                        tracker.finish()
            except Exception:
                if not failed:      # the block's own error is the one to report
                    raise
            finally:
                accelerator.free_memory()
                reset_accelerate_state()


@contextlib.contextmanager
def quiet_writer_threads():
    """No traceback from TensorBoard's writer thread on a failed write: the training thread meets it at its next log."""
    import threading
    previous = threading.excepthook

    def hook(args):
        if not (isinstance(args.exc_value, OSError) and type(args.thread).__module__.startswith("tensorboard")):
            previous(args)
    threading.excepthook = hook
    try:
        yield
    finally:
        threading.excepthook = previous


TRACKER_PACKAGES = {"tensorboard": ("tensorboard", "tensorboardX"), "wandb": ("wandb",)}


def check_tracker(log_with: str) -> None:
    """accelerate silently drops a tracker whose package is missing: refuse it before the run starts."""
    import importlib.util
    packages = TRACKER_PACKAGES.get(log_with, ())
    if packages and not any(importlib.util.find_spec(name) for name in packages):
        raise ValueError(f"log_with={log_with} needs the {packages[0]} package: pip install {packages[0]}")


def check_divisible(cfg, num_processes: int) -> None:
    """Each process gets an equal part of every batch, so batch sizes must divide evenly."""
    for key in ("batch_size", "eval_batch_size"):
        if getattr(cfg, key) % num_processes:
            raise ValueError(f"{key} ({getattr(cfg, key)}) must be a multiple of the number of processes "
                             f"({num_processes}): each process gets an equal part of every batch")


# ---------------------------------------------------------------- compile=true

# torch.compile's keywords. dynamic: batches are padded to their longest window, so widths vary; one
# graph with symbolic sizes serves them all, in any order (a resumed run meets them in another order).
# Tests add backend="aot_eager": inductor compiles a training graph for minutes on a small CPU.
COMPILE_OPTIONS: dict = {"dynamic": True}
MIN_TORCH = "2.5"   # older: the guards of BERT's dynamic-shape graph fail, so every step compiled again


def compile_model(model: torch.nn.Module, enabled: bool = True) -> torch.nn.Module:
    """``model``, compiled in place if ``enabled`` (the same object: its ``state_dict`` keys and checkpoints
    are an eager run's). A speed setting, never a reason to stop: where ``cannot_compile``, the model runs
    eagerly. Its graphs compile at its first call in each mode; a compiler error on them is raised as is."""
    if enabled and not cannot_compile(next(model.parameters()).device):
        model.compile(**COMPILE_OPTIONS)   # again on a compiled model: dynamo reuses its graphs
    return model


@functools.cache   # once per device and process: each dev evaluation compiles the model it scores
def cannot_compile(device: torch.device) -> bool:
    """Whether ``torch.compile`` fails on a small function on ``device`` here (torch older than ``MIN_TORCH``,
    no C compiler, a GPU too old for Triton, an unsupported Python), said in one line."""
    try:
        if torch.__version__ < MIN_TORCH:
            raise RuntimeError(f"it needs torch {MIN_TORCH} or newer, this is {torch.__version__}")
        torch.compile(lambda x: x.sin() + 1, **COMPILE_OPTIONS)(torch.ones(8, device=device))
        return False
    except Exception as error:
        while error.__cause__ or error.__context__:   # dynamo raises its own error while handling the compiler's
            error = error.__cause__ or error.__context__
        first = next((line.strip() for line in str(error).splitlines() if line.strip()), "")[:200]
        print(f"compile=true: torch.compile cannot run here ({type(error).__name__}: {first}); the model "
              f"runs uncompiled", flush=True)
        return True

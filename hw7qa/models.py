"""Loading a model and its tokenizer: for training (a hub name, a local folder, or the demo's tiny
random BERT) and from a run folder (``<run>/model``, for predict, evaluate, ensemble and the notebook).

Used by the trainer and by inference alike; nothing here imports the trainer.
"""
from __future__ import annotations

import contextlib
import tempfile
from pathlib import Path

import torch

from . import tiny
from .config import TINY_MODEL, Config
from .data import QAData
from .files import refused_as
from .windows import load_tokenizer


def looks_like_path(name: str) -> bool:
    """Hub names are ``name`` or ``owner/name``; anything else is meant as a folder."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name


def from_pretrained(what: str, load, name_or_dir: str):
    """``load(name_or_dir)``, or a ValueError that says in one sentence why it failed."""
    folder = Path(name_or_dir).expanduser()
    if not folder.exists() and looks_like_path(name_or_dir):
        raise ValueError(f"model_name={name_or_dir!r}: no such folder")
    try:
        return load(str(folder) if folder.exists() else name_or_dir)
    except Exception as e:  # transformers raises OSError, ValueError or safetensors' own errors here
        where = f"the folder {folder}" if folder.exists() else f"{name_or_dir!r} (not a local folder; from the hub)"
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ValueError(f"cannot load the {what} of {where}: {reason}") from e


@contextlib.contextmanager
def quiet_transformers():
    """transformers' own progress bars ("Loading weights", "Writing model shards") off inside.

    hw7qa loads and saves a model many times in a run (every best dev score, every predict); each
    drew its bars between hw7qa's own lines. Through transformers' tqdm hook, so downloads from the
    hub keep their bars, and transformers calls outside (a notebook user's own) keep theirs.
    A transformers without the hook (4.57 has none) draws bars only for sharded checkpoints: unchanged.
    """
    from transformers.utils import logging
    if not hasattr(logging, "set_tqdm_hook"):
        yield
        return
    previous = logging.set_tqdm_hook(lambda factory, args, kwargs: logging.EmptyTqdm(*args, **kwargs))
    try:
        yield
    finally:
        logging.set_tqdm_hook(previous)


def load_model(name_or_dir: str):
    """``AutoModelForQuestionAnswering`` in float32 whatever dtype its files hold.

    transformers 5 loads weights in the checkpoint's dtype; a model stored in fp16 would then be
    trained in fp16 (AdamW on fp16 weights: the loss moves in steps of 1/256 and stalls). Mixed
    precision casts per operation; the weights the optimizer updates stay fp32.
    """
    import transformers
    # ``dtype`` since transformers 4.56; ``torch_dtype`` before (and deprecated after)
    new = tuple(int(part) for part in transformers.__version__.split(".")[:2]) >= (4, 56)
    dtype = {"dtype" if new else "torch_dtype": torch.float32}
    with quiet_transformers():
        return from_pretrained("model", lambda name: transformers.AutoModelForQuestionAnswering.from_pretrained(
            name, **dtype), name_or_dir)


def load_tokenizer_for(cfg: Config, train_data: QAData | None = None):
    """The run's tokenizer: ``cfg.model_name``'s, or for ``tiny-random-bert`` one built from the
    characters of the training file (``train_data``) in a temporary folder (a write the system
    refuses there names that folder)."""
    if cfg.model_name == TINY_MODEL:
        texts = train_data.paragraphs + [q.question_text for q in train_data.questions]
        with refused_as(tempfile.gettempdir()):
            return tiny.build_tiny_tokenizer(texts, isolate_digits=cfg.isolate_digits)
    return from_pretrained("tokenizer", lambda name: load_tokenizer(name, cfg.isolate_digits, cfg.isolate_cjk),
                           cfg.model_name)


def load_model_and_tokenizer(cfg: Config, train_data: QAData | None = None):
    """Model and fast tokenizer from a hub name or a local folder; ``tiny-random-bert`` builds a tiny
    random BERT whose vocabulary is the characters of the training file (demo and tests)."""
    if cfg.model_name == TINY_MODEL:
        tokenizer = load_tokenizer_for(cfg, train_data)
        return tiny.build_tiny_model(len(tokenizer), seed=cfg.seed), tokenizer
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


def run_tokenizer(run_dir: str | Path, cfg: Config):
    """The tokenizer saved with the run's model, with the run's ``isolate_*`` knobs applied."""
    return load_tokenizer(Path(run_dir) / "model", cfg.isolate_digits, cfg.isolate_cjk)

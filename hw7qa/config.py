"""Every knob of a run, as one flat dataclass.

A config is plain values: it is written to ``config.json`` in the run folder, read back by
``predict``/``evaluate``, and changed from the command line with ``key=value`` overrides::

    cfg = load_config("configs/bert-base.json", ["lr=3e-5", "epochs=2"])
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

TINY_MODEL = "tiny-random-bert"  # model_name that builds a small random BERT offline (demo, tests)


@dataclass
class Config:
    # --- data: HW7 JSON or DRCD/SQuAD JSON; an empty path means "not used" ---
    train_file: str = "data/hw7_train.json"
    dev_file: str = "data/hw7_dev.json"
    test_file: str = "data/hw7_test.json"
    # --- model: a hub name or a local directory, loaded with AutoModelForQuestionAnswering ---
    model_name: str = "bert-base-chinese"
    # --- windows (see windows.py) ---
    max_length: int = 384            # tokens per window, special tokens included
    max_question_tokens: int = 64    # longer questions are cut (the sample code used 40)
    doc_stride: int = 128            # tokens a window advances; smaller = more overlap
    max_paragraph_tokens: int = 0    # cap on paragraph tokens per window (0: fill max_length; sample code: 150)
    train_windows: str = "random"    # random | center (the sample code) | all
    isolate_digits: bool = False     # split numbers into digits, so an answer may end inside "1900"
    isolate_cjk: bool = False        # one token per CJK character (sentencepiece models; BERT does it already)
    # --- training ---
    epochs: int = 2
    lr: float = 3e-5
    weight_decay: float = 0.01       # not applied to biases and LayerNorm weights
    warmup_ratio: float = 0.1        # fraction of optimizer steps spent warming up
    lr_schedule: str = "linear"      # linear (warmup then linear decay to 0) | constant (the sample)
    batch_size: int = 16             # windows per forward pass
    grad_accum: int = 1              # forward passes per optimizer step
    group_by_length: bool = False    # batches of windows of similar length: less padding, faster
    max_grad_norm: float = 1.0       # 0 turns clipping off
    mixed_precision: str = "auto"    # auto (bf16 if supported, else fp16 on GPU, no on CPU) | fp16 | bf16 | no
    gradient_checkpointing: bool = False  # recompute activations in backward: less memory, ~20% slower
    max_skipped_steps: int = 20      # stop after this many optimizer steps in a row with a non-finite loss/gradients
    eval_every: int = 0              # evaluate on dev every N optimizer steps (0: at epoch ends only)
    log_every: int = 20              # append loss and lr to metrics.jsonl every N optimizer steps
    save_every: int = 500            # checkpoint every N optimizer steps (0: at epoch ends only); see --resume
    keep_checkpoints: int = 1        # newest checkpoints kept in <run>/checkpoints (0: no checkpoints at all)
    final_fit: bool = False          # train on train_file + dev_file, no dev evaluation (the final submission)
    seed: int = 0
    # --- inference and decoding (see decode.py) ---
    eval_batch_size: int = 64        # windows per forward pass at inference
    n_best: int = 20                 # top-k starts x top-k ends considered per window
    max_answer_length: int = 30      # tokens
    balance_quotes: bool = True      # repair unpaired 「」《》“”() at the answer's edges
    # --- output ---
    output_dir: str = ""             # run folder; empty: outputs/<model>-<time>

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), ensure_ascii=False, indent=2)


def _parse_value(field: dataclasses.Field, text: str):
    kind = field.type if isinstance(field.type, str) else field.type.__name__
    if kind == "bool":
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"{field.name}: expected true/false, got {text!r}")
    return {"int": int, "float": float, "str": str}[kind](text)


def apply_overrides(cfg: Config, overrides: list[str] | dict) -> Config:
    """Return a checked copy of ``cfg`` with a dict, or ``["key=value", ...]`` strings, applied."""
    fields = {f.name: f for f in dataclasses.fields(Config)}
    if not isinstance(overrides, dict):
        pairs = [item.split("=", 1) for item in overrides]
        bad = [item for item, pair in zip(overrides, pairs) if len(pair) != 2]
        if bad:
            raise ValueError(f"override {bad[0]!r} is not key=value")
        overrides = {key: _parse_value(fields[key], text) if key in fields else text
                     for key, text in pairs}
    unknown = [key for key in overrides if key not in fields]
    if unknown:
        raise ValueError(f"unknown config key {unknown[0]!r}; known: {', '.join(fields)}")
    cfg = dataclasses.replace(cfg, **overrides)
    check_config(cfg)
    return cfg


def check_config(cfg: Config) -> None:
    """Raise ValueError for values that cannot work, before any time is spent."""
    choices = {"train_windows": ("random", "center", "all"),
               "mixed_precision": ("auto", "fp16", "bf16", "no"),
               "lr_schedule": ("linear", "constant")}
    for key, allowed in choices.items():
        if getattr(cfg, key) not in allowed:
            raise ValueError(f"{key}={getattr(cfg, key)!r}; choose one of {', '.join(allowed)}")
    for key in ("max_length", "max_question_tokens", "doc_stride", "epochs", "batch_size",
                "grad_accum", "eval_batch_size", "n_best", "max_answer_length"):
        if getattr(cfg, key) < 1:
            raise ValueError(f"{key} must be at least 1, got {getattr(cfg, key)}")
    if cfg.max_question_tokens >= cfg.max_length - 8:
        raise ValueError(f"max_question_tokens ({cfg.max_question_tokens}) leaves no room for the "
                         f"paragraph in max_length ({cfg.max_length})")
    for key in ("save_every", "keep_checkpoints", "eval_every", "max_paragraph_tokens"):
        if getattr(cfg, key) < 0:
            raise ValueError(f"{key} must be 0 or more, got {getattr(cfg, key)}")
    if cfg.final_fit and not cfg.dev_file:
        raise ValueError("final_fit=true trains on train_file + dev_file, but dev_file is empty")
    if not 0 <= cfg.warmup_ratio < 1:
        raise ValueError(f"warmup_ratio must be in [0, 1), got {cfg.warmup_ratio}")


def load_config(path: str | Path | None = None, overrides: list[str] | dict | None = None) -> Config:
    """Defaults, then the JSON file at ``path`` (keys starting with '_' are comments), then overrides
    (``["key=value", ...]`` or a dict)."""
    values = {}
    if path:
        with open(path, encoding="utf-8") as f:
            values = {k: v for k, v in json.load(f).items() if not k.startswith("_")}
    cfg = apply_overrides(Config(), values)
    return apply_overrides(cfg, overrides or [])


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(cfg.to_json() + "\n", encoding="utf-8")

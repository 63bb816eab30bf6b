"""Every knob of a run, as one flat frozen dataclass that checks itself; presets, ``key=value`` overrides and a
run folder's saved config (``run_config``).

    cfg = load_config(preset_path("bert-base"), ["lr=3e-5", "epochs=2"])

Stages read it grouped (``cfg.windows``, ``cfg.decoding``); a bad type, range or choice is a ValueError naming it.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path

from .files import atomic_write, check_file

class TrainingError(RuntimeError):   # here, not in train.py: the command line catches it without torch
    """Training cannot go on; the message says which knobs to change."""


TINY_MODEL = "tiny-random-bert"  # model_name that builds a small random BERT offline (demo, tests)

# transformers.get_scheduler's names that need nothing but the warmup and total steps. "constant"
# here also warms up (warmup_ratio=0 gives the sample code's flat lr), as every other schedule does.
LR_SCHEDULES = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
                "inverse_sqrt")
CHOICES = {"train_windows": ("random", "center", "all"),
           "mixed_precision": ("auto", "fp16", "bf16", "no"),
           "lr_schedule": LR_SCHEDULES,
           "log_with": ("none", "tensorboard", "wandb")}
AT_LEAST_1 = ("max_length", "max_question_tokens", "doc_stride", "epochs", "batch_size", "grad_accum",
              "max_skipped_steps", "log_every", "eval_batch_size", "n_best", "max_answer_length")
AT_LEAST_0 = ("max_paragraph_tokens", "eval_every", "save_every", "keep_checkpoints", "seed",
              "weight_decay", "max_grad_norm", "fgm_epsilon")
# (setting, whether a value is in its range, the range in words), checked in this order
RANGES = [*((key, lambda v: v >= 1, "at least 1") for key in AT_LEAST_1),
          *((key, lambda v: v >= 0, "0 or more") for key in AT_LEAST_0),
          ("seed", lambda v: v < 2 ** 32, "below 2**32"), ("lr", lambda v: v > 0, "above 0"),
          ("warmup_ratio", lambda v: 0 <= v < 1, "in [0, 1)"),
          ("layer_lr_decay", lambda v: 0 < v <= 1, "in (0, 1] (1: off)"),
          ("ema_decay", lambda v: 0 <= v < 1, "in [0, 1) (0: off)"),
          ("answer_length_quantile", lambda v: 0 <= v <= 1, "in [0, 1] (0: off)")]

# Settings a resume may change (``check_resume``): they do not shape the model. ``compile`` changes how, not what,
# is computed (such a resume is not bit-identical, as on another GPU); ``tf32`` is frozen with ``mixed_precision``.
FREE_ON_RESUME = ("eval_batch_size", "save_every", "keep_checkpoints", "log_every", "log_with",
                  "max_skipped_steps", "test_file", "output_dir", "compile")


@dataclass(frozen=True)
class WindowSpec:
    """How a question and its paragraph become token windows (``windows.py``)."""
    max_length: int = 384
    max_question_tokens: int = 64
    doc_stride: int = 128
    max_paragraph_tokens: int = 0
    isolate_digits: bool = False
    isolate_cjk: bool = False


@dataclass(frozen=True)
class DecodeSpec:
    """How window logits become an answer (``decode.py``); ``Config``'s defaults too."""
    n_best: int = 20
    # 20: on 3 trained runs, 20 gained dev EM over 30 and makes 0.8 % of training answers unreachable
    # (docs/benchmarks.md, "Decoding defaults"); a tighter limit gains more on a weak model but cuts off more
    max_answer_length: int = 20
    balance_quotes: bool = True


@dataclass(frozen=True)
class Config:
    # --- data: HW7 JSON or DRCD/SQuAD JSON; an empty path means "not used" ---
    train_file: str = "data/hw7_train.json"
    dev_file: str = "data/hw7_dev.json"
    test_file: str = "data/hw7_test.json"
    # --- model: a hub name or a local directory, loaded with AutoModelForQuestionAnswering ---
    model_name: str = "bert-base-chinese"
    # --- windows (see windows.py; cfg.windows) ---
    max_length: int = 384            # tokens per window, special tokens included
    max_question_tokens: int = 64    # longer questions are cut (the sample code used 40)
    doc_stride: int = 128            # paragraph tokens a window advances (not HF's stride, which is the overlap)
    max_paragraph_tokens: int = 0    # cap on paragraph tokens per window (0: fill max_length; sample code: 150)
    train_windows: str = "random"    # random | center (the sample code) | all
    isolate_digits: bool = False     # split numbers into digits, so an answer may end inside "1900"
    isolate_cjk: bool = False        # one token per CJK character (sentencepiece models; BERT does it already)
    # --- training ---
    epochs: int = 2
    lr: float = 3e-5
    weight_decay: float = 0.01       # not applied to biases and LayerNorm weights
    warmup_ratio: float = 0.1        # fraction of optimizer steps spent warming up
    lr_schedule: str = "linear"      # after warmup: linear (to 0) | cosine | constant (the sample) | ... (LR_SCHEDULES)
    batch_size: int = 16             # windows per optimizer step and forward pass, over all processes
    grad_accum: int = 1              # forward passes per optimizer step
    auto_batch: bool = True          # halve batch_size, double grad_accum until the longest windows' step fits memory
    group_by_length: bool = False    # batches of windows of similar length: less padding, faster
    max_grad_norm: float = 1.0       # 0 turns clipping off
    mixed_precision: str = "auto"    # auto (bf16 if supported, else fp16 on GPU, no on CPU) | fp16 | bf16 | no
    gradient_checkpointing: bool = False  # recompute activations in backward: less memory, ~20% slower
    # --- opt-in techniques (techniques.py): each off by default until measured over seeds ---
    layer_lr_decay: float = 1.0      # lr × this per layer below the top (QA head: lr; embeddings: lowest); 1: off
    ema_decay: float = 0.0           # evaluate and save a moving average of the weights (e.g. 0.999); 0: off
    fgm_epsilon: float = 0.0         # adversarial 2nd pass: word embeddings moved this far along the gradient; 0: off
    answer_length_quantile: float = 0.0  # max_answer_length from this quantile of train answers (e.g. 0.995); 0: off
    max_skipped_steps: int = 20      # stop after this many optimizer steps in a row with a non-finite loss/gradients
    eval_every: int = 0              # evaluate on dev every N optimizer steps (0: at epoch ends only)
    log_every: int = 20              # append loss and lr to metrics.jsonl every N optimizer steps
    log_with: str = "none"           # also to a tracker: tensorboard (<run>/tensorboard) | wandb | none
    save_every: int = 500            # checkpoint every N optimizer steps (0: at epoch ends only); see --resume
    keep_checkpoints: int = 1        # newest checkpoints kept in <run>/checkpoints (0: no checkpoints at all)
    final_fit: bool = False          # train on train_file + dev_file, no dev evaluation (the final submission)
    seed: int = 0
    # --- inference and decoding (see decode.py; cfg.decoding) ---
    eval_batch_size: int = 64        # windows per forward pass at inference, over all processes
    n_best: int = DecodeSpec.n_best                        # top-k starts x top-k ends considered per window
    max_answer_length: int = DecodeSpec.max_answer_length  # tokens of the longest answer
    balance_quotes: bool = DecodeSpec.balance_quotes       # repair unpaired 「」《》“”() at the answer's edges
    tta_strides: str = ""            # more doc_strides at inference ("64,96"): all strides vote per character span
    # --- speed levers: each off until measured on a GPU; answers change by float rounding only ---
    compile: bool = False            # torch.compile the model for training and inference (models.compile_model)
    tf32: bool = False               # TF32 for float32 matmuls on CUDA (Ampere and later), for the call only
    # --- output ---
    output_dir: str = ""             # run folder; empty: outputs/<model>-<time>

    def __post_init__(self):
        for field in dataclasses.fields(self):   # JSON and Python give 3 where 3.0 is meant
            if field.type == "float" and type(getattr(self, field.name)) is int:
                object.__setattr__(self, field.name, float(getattr(self, field.name)))
        check_config(self)

    @property
    def windows(self) -> WindowSpec:
        return WindowSpec(**{f.name: getattr(self, f.name) for f in dataclasses.fields(WindowSpec)})

    @property
    def inference_strides(self) -> list[int]:
        """``doc_stride`` and the ``tta_strides`` not equal to it: one set of windows each at inference."""
        return list(dict.fromkeys([self.doc_stride, *parse_strides(self.tta_strides)]))

    @property
    def decoding(self) -> DecodeSpec:
        return DecodeSpec(**{f.name: getattr(self, f.name) for f in dataclasses.fields(DecodeSpec)})

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), ensure_ascii=False, indent=2)


def check_config(cfg: Config) -> None:
    """Raise ValueError, naming the field, for a value of the wrong type or one that cannot work."""
    for field in dataclasses.fields(cfg):
        value, kind = getattr(cfg, field.name), field.type
        if (kind == "bool") != isinstance(value, bool) or not isinstance(value, {"int": int, "float": float,
                                                                                   "str": str, "bool": bool}[kind]):
            raise ValueError(f"{field.name}={value!r}: expected {kind}")
        if kind == "float" and not math.isfinite(value):
            raise ValueError(f"{field.name}={value!r}: expected a finite number")
    for key, allowed in CHOICES.items():
        if getattr(cfg, key) not in allowed:
            raise ValueError(f"{key}={getattr(cfg, key)!r}; choose one of {', '.join(allowed)}")
    for key, within, words in RANGES:
        if not within(getattr(cfg, key)):
            raise ValueError(f"{key} must be {words}, got {getattr(cfg, key)}")
    parse_strides(cfg.tta_strides)
    if cfg.max_question_tokens >= cfg.max_length - 8:
        raise ValueError(f"max_question_tokens ({cfg.max_question_tokens}) leaves no room for the "
                         f"paragraph in max_length ({cfg.max_length})")
    if not cfg.model_name:
        raise ValueError("model_name is empty: give a hub name or a local model folder")
    if cfg.final_fit and not cfg.dev_file:
        raise ValueError("final_fit=true trains on train_file + dev_file, but dev_file is empty")


def parse_strides(text: str) -> list[int]:
    """``"64,96"`` → [64, 96]; ``""`` → []. Anything but positive whole numbers is a ValueError."""
    items = [item.strip() for item in text.split(",")] if text.strip() else []
    if not all(item.isdigit() and int(item) > 0 for item in items):
        raise ValueError(f"tta_strides={text!r}: expected positive whole numbers separated by commas, e.g. '64,96'")
    return [int(item) for item in items]


def _parse_value(field: dataclasses.Field, text: str):
    if field.type == "bool":
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"{field.name}: expected true/false, got {text!r}")
    try:
        return {"int": int, "float": float, "str": str}[field.type](text)
    except ValueError:
        raise ValueError(f"{field.name}={text!r}: expected {field.type}") from None


def apply_overrides(cfg: Config, overrides: list[str] | dict) -> Config:
    """Return a checked copy of ``cfg`` with a dict, or ``["key=value", ...]`` strings, applied."""
    fields = {f.name: f for f in dataclasses.fields(Config)}
    if not isinstance(overrides, dict):
        pairs = [item.split("=", 1) for item in overrides]
        bad = [item for item, pair in zip(overrides, pairs) if len(pair) != 2]
        if bad:
            raise ValueError(f"override {bad[0]!r} is not key=value")
        keys = [key for key, _ in pairs]
        twice = [key for key in dict.fromkeys(keys) if keys.count(key) > 1]
        if twice:
            values = " and ".join(repr(text) for key, text in pairs if key == twice[0])
            raise ValueError(f"{twice[0]} is set twice ({values}); give each setting once")
        overrides = {key: _parse_value(fields[key], text) if key in fields else text
                     for key, text in pairs}
    unknown = [key for key in overrides if key not in fields]
    if unknown:
        raise ValueError(f"unknown config key {unknown[0]!r}; known: {', '.join(fields)}")
    return dataclasses.replace(cfg, **overrides)


def read_json(path: str | Path) -> dict:
    """A JSON object from ``path``; a damaged or missing file is a ValueError naming it."""
    try:
        with open(path, encoding="utf-8-sig") as f:
            values = json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e}); correct it, or restore it if it was damaged") from None
    if not isinstance(values, dict):
        raise ValueError(f"{path}: expected a JSON object of config keys")
    return values


RETIRED = ("inference_chunk",)       # settings of older runs' config.json that no longer do anything


def load_config(path: str | Path | None = None, overrides: list[str] | dict | None = None) -> Config:
    """Defaults, then the JSON at ``path`` ('_' keys are comments), then ``overrides`` (``["k=v", ...]`` or a dict)."""
    values = {k: v for k, v in read_json(path).items() if not k.startswith("_") and k not in RETIRED} if path else {}
    try:
        cfg = apply_overrides(Config(), values)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    return apply_overrides(cfg, overrides or [])


def run_config(run_dir: str | Path, overrides: list[str] | dict | None = None) -> Config:
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


def save_config(cfg: Config, path: str | Path) -> None:
    """Write ``cfg`` as JSON to ``path``, whole or not at all (a full disk keeps the old file)."""
    with atomic_write(path, encoding="utf-8") as f:
        f.write(cfg.to_json() + "\n")


def check_resume(saved: Config, requested: Config, run_dir: str | Path) -> Config:
    """``requested`` if it differs from ``saved`` only in ``FREE_ON_RESUME``, else a ValueError naming the change."""
    changed = [f"{f.name}={getattr(requested, f.name)!r} (the run has {getattr(saved, f.name)!r})"
               for f in dataclasses.fields(Config)
               if f.name not in FREE_ON_RESUME and getattr(saved, f.name) != getattr(requested, f.name)]
    if changed:
        raise ValueError(f"cannot resume {run_dir} with other settings: {'; '.join(changed)}. These shape the "
                         f"trained model; start a new run (another output_dir) to change them. A resume may change "
                         f"only {', '.join(FREE_ON_RESUME)}")
    return requested


# ---------------------------------------------------------------- presets and the demo

PACKAGE = Path(__file__).resolve().parent
# installed: hw7qa/presets and hw7qa/sample (mapped by pyproject.toml); a checkout: configs/ and data/sample/
PRESETS = PACKAGE / "presets" if (PACKAGE / "presets").is_dir() else PACKAGE.parent / "configs"
SAMPLE = PACKAGE / "sample" if (PACKAGE / "sample").is_dir() else PACKAGE.parent / "data" / "sample"


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESETS.glob("*.json"))


def preset_path(name_or_path: str | None) -> Path | None:
    """A JSON file as given, or the shipped preset of that name (``bert-base`` or ``bert-base.json``)."""
    if not name_or_path or Path(name_or_path).is_file():
        return Path(name_or_path) if name_or_path else None
    preset = PRESETS / Path(name_or_path).with_suffix(".json").name
    if preset.is_file() and Path(name_or_path).parent == Path("."):
        return preset
    names = ", ".join(preset_names())
    if Path(name_or_path).is_dir():
        raise ValueError(f"--config {name_or_path} is a folder; give a JSON file or a preset's name ({names})")
    raise FileNotFoundError(f"{name_or_path}: no such file, and no preset of that name ({names})")


def demo_config(output_dir: str = "", overrides: list[str] | None = None) -> Config:
    """The demo preset with its data files pointed at the shipped sample, so that it runs from any folder."""
    cfg = load_config(PRESETS / "demo.json", overrides)
    paths = {k: str(SAMPLE / Path(getattr(cfg, k)).name) for k in ("train_file", "dev_file", "test_file")
             if getattr(cfg, k)}
    return dataclasses.replace(cfg, **paths, output_dir=output_dir or cfg.output_dir)

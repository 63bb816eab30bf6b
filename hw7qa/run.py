"""A run folder as a whole: train then predict, and predict or evaluate from a saved run.

Used by the command line and the notebook alike.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from .config import load_config
from .data import load_qa_file
from .decode import Prediction, predict
from .metrics import score
from .report import unknown_characters, write_dev_predictions
from .submission import check_result_csv, write_result_csv
from .windows import load_tokenizer

ROOT = Path(__file__).resolve().parent.parent


def load_run(run_dir: str | Path, overrides: list[str] | None = None):
    """The config, model and tokenizer saved in a run folder (model on GPU if there is one)."""
    from transformers import AutoModelForQuestionAnswering
    run_dir = Path(run_dir)
    if not (run_dir / "model").is_dir():
        raise FileNotFoundError(f"{run_dir}: no model/ folder; is this a run folder made by 'train'?")
    cfg = load_config(run_dir / "config.json", overrides)
    tokenizer = load_tokenizer(run_dir / "model", cfg.isolate_digits, cfg.isolate_cjk)
    model = AutoModelForQuestionAnswering.from_pretrained(run_dir / "model")
    model.to("cuda" if torch.cuda.is_available() else "cpu")
    return cfg, model, tokenizer


def predict_test(run_dir: str | Path, test_file: str = "", out: str = "", overrides: list[str] | None = None) -> Path:
    """Answer ``test_file`` (default: the run's) with the run's model; write and check result.csv."""
    cfg, model, tokenizer = load_run(run_dir, overrides)
    data = load_qa_file(test_file or cfg.test_file)
    predictions = predict(model, tokenizer, data, cfg, desc="test")
    path = write_result_csv(data, [p.answer for p in predictions], out or Path(run_dir) / "result.csv")
    problems = check_result_csv(path, data)
    print(f"wrote {path} ({len(predictions)} answers)" + ("" if not problems else "; PROBLEMS:\n  " + "\n  ".join(problems)))
    return path


def evaluate_run(run_dir: str | Path, dev_file: str = "", overrides: list[str] | None = None
                 ) -> tuple[dict, list[Prediction]]:
    """Dev EM and F1 of the run's model on ``dev_file`` (default: the run's), and its predictions.

    Also writes ``<run>/dev_predictions.jsonl`` and prints how the wrong answers are wrong.
    """
    cfg, model, tokenizer = load_run(run_dir, overrides)
    data = load_qa_file(dev_file or cfg.dev_file, need_answers=True)
    predictions = predict(model, tokenizer, data, cfg, desc="dev")
    scores = score([p.answer for p in predictions], [q.answer_text for q in data.questions])
    unknown = unknown_characters(tokenizer, [q.answer_text for q in data.questions])
    kinds = write_dev_predictions(Path(run_dir) / "dev_predictions.jsonl", data, predictions, unknown)
    print(f"{data.path}: {len(data.questions)} questions, EM {scores['em']:.4f}, F1 {scores['f1']:.4f}")
    print("answers: " + ", ".join(f"{kind} {n}" for kind, n in sorted(kinds.items(), key=lambda kv: -kv[1]))
          + f"  (details: {Path(run_dir) / 'dev_predictions.jsonl'})")
    return scores, predictions


def train_and_predict(cfg) -> Path:
    """Train; then, if a test file is configured, write the run's result.csv."""
    from .train import train
    run_dir = train(cfg)
    if cfg.test_file:
        predict_test(run_dir)
    return run_dir


def demo_config(output_dir: str = "", overrides: list[str] | None = None):
    """configs/demo.json with its data paths made absolute, so the demo runs from any folder."""
    cfg = load_config(ROOT / "configs" / "demo.json", overrides)
    paths = {k: str(ROOT / getattr(cfg, k)) for k in ("train_file", "dev_file", "test_file") if getattr(cfg, k)}
    return dataclasses.replace(cfg, **paths, output_dir=output_dir or cfg.output_dir)

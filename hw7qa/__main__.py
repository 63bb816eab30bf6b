"""Command line: ``python -m hw7qa train|predict|evaluate|check|demo``.

    python -m hw7qa train --config configs/bert-base.json --set lr=3e-5 epochs=2
    python -m hw7qa predict outputs/RUN                 # test_file of the run → outputs/RUN/result.csv
    python -m hw7qa evaluate outputs/RUN                # dev_file of the run → EM and F1
    python -m hw7qa check outputs/RUN/result.csv data/hw7_test.json
    python -m hw7qa demo                                # the whole pipeline offline on data/sample
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import torch

from .config import apply_overrides, load_config
from .data import DataError, load_qa_file
from .decode import predict
from .metrics import score
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


def evaluate_run(run_dir: str | Path, dev_file: str = "", overrides: list[str] | None = None) -> dict:
    """Dev EM and F1 of the run's model on ``dev_file`` (default: the run's)."""
    cfg, model, tokenizer = load_run(run_dir, overrides)
    data = load_qa_file(dev_file or cfg.dev_file, need_answers=True)
    predictions = predict(model, tokenizer, data, cfg, desc="dev")
    scores = score([p.answer for p in predictions], [q.answer_text for q in data.questions])
    print(f"{data.path}: {len(data.questions)} questions, EM {scores['em']:.4f}, F1 {scores['f1']:.4f}")
    return scores


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hw7qa", description="HW7 Chinese extractive QA")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="fine-tune; predicts the test file too when one is configured")
    p.add_argument("--config", help="a JSON preset, e.g. configs/bert-base.json")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="override config values")
    for name, helptext in (("predict", "write result.csv for a test file"), ("evaluate", "dev EM and F1")):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("run", help="a run folder made by train")
        p.add_argument("--file", default="", help="HW7 or DRCD JSON (default: the run's test/dev file)")
        p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                       help="override inference settings, e.g. doc_stride=32")
        if name == "predict":
            p.add_argument("--out", default="", help="CSV path (default: RUN/result.csv)")
    p = sub.add_parser("check", help="validate a result.csv against a test JSON")
    p.add_argument("csv")
    p.add_argument("test_json")
    p = sub.add_parser("demo", help="the whole pipeline offline on data/sample with a tiny random model")
    p.add_argument("--output-dir", default="", help="run folder (default: outputs/demo-<time>)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)

    try:
        if args.command == "train":
            train_and_predict(load_config(args.config, args.set))
        elif args.command == "predict":
            predict_test(args.run, args.file, args.out, args.set)
        elif args.command == "evaluate":
            evaluate_run(args.run, args.file, args.set)
        elif args.command == "check":
            problems = check_result_csv(args.csv, load_qa_file(args.test_json))
            print("\n".join(problems) if problems else f"{args.csv}: valid ({args.test_json})")
            return 1 if problems else 0
        elif args.command == "demo":
            run_dir = train_and_predict(demo_config(args.output_dir, args.set))
            print("demo finished. The model is tiny and random: its answers are not meaningful; "
                  f"the run proves the installation works. See {run_dir}")
    except (DataError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

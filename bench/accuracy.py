"""Accuracy, side by side: the course sample recipe against the project's, same model, data and seed.

    python bench/accuracy.py                          # stand-in model, DRCD test → 2021 HW7 dev
    python bench/accuracy.py --dev-limit 1000 --recipes sample,project
    python bench/accuracy.py --model DIR_OR_HUB_NAME --train T.json --dev D.json --recipes project,bert-base
    python bench/accuracy.py --reuse                  # evaluate the models of an earlier run again

Each recipe is trained once (``hw7qa.train.train``, no dev evaluation during training) and then
decoded on the dev questions. Recipes:

- ``sample``: the course sample code — configs/sample-recipe.json (40-token questions, 150-token
  windows advancing 150, centred training window, lr 1e-4 constant, fp32) — decoded the way the
  sample's ``evaluate()`` decodes (``sample_decode`` below). Its row "sample+project-decoding"
  decodes the same model with the project's decoding and the project's inference windows.
- ``project``: the project's recipe for small models, configs/small-model.json.
- any other name: configs/<name>.json.

Every recipe gets the same model, data, seed, epochs and batch size (``--batch-size``, unless the
recipe is ``project`` or a preset that sets its own). The decoding-oracle EM puts the maximum
logit on the gold tokens and decodes: what the windows and decoding alone lose.
A table is printed and written to ``--out`` (JSON).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


from hw7qa.config import load_config  # noqa: E402
from hw7qa.data import QAData, load_qa_file  # noqa: E402
from hw7qa.decode import decode_predictions, oracle_logits, window_logits  # noqa: E402
from hw7qa.metrics import score  # noqa: E402
from hw7qa.train import load_model, train  # noqa: E402
from hw7qa.windows import encode, eval_windows, load_tokenizer, train_windows  # noqa: E402

SHARED = ROOT.parent / "shared"
STAND_IN = Path.home() / ".cache/stand-in/multilingual-e5-small"


def sample_decode(enc, windows, logits, tokenizer) -> list[str]:
    """What the course sample's ``evaluate()`` does: per window the argmax of start and the argmax of
    end over the *whole* window, independently; the window with the highest sum wins; the answer is
    ``tokenizer.decode`` of the tokens between them with spaces removed (empty if end < start)."""
    best = {}
    for w, (start, end) in zip(windows, logits):
        s, e = int(np.argmax(start)), int(np.argmax(end))
        prob = float(start[s] + end[e])
        if w.question_index not in best or prob > best[w.question_index][0]:
            best[w.question_index] = (prob, w, s, e)
    answers = []
    for qi in range(len(enc.data.questions)):
        _, w, s, e = best[qi]
        answers.append(tokenizer.decode(w.input_ids[s:e + 1]).replace(" ", ""))
    return answers


def evaluate(cfg, model_dir, dev, sample_decoding=False):
    """Dev EM/F1 and decoding-oracle EM of the model in ``model_dir`` with ``cfg``'s windows."""
    tokenizer = load_tokenizer(model_dir, cfg.isolate_digits, cfg.isolate_cjk)
    model = load_model(str(model_dir))
    enc = encode(dev, tokenizer, cfg.windows)
    windows = eval_windows(enc)
    logits = window_logits(model, tokenizer, windows, cfg.eval_batch_size, cfg.mixed_precision, desc="dev")
    gold = [q.answer_text for q in dev.questions]

    def answers(logits_):
        if sample_decoding:
            return sample_decode(enc, windows, logits_, tokenizer)
        return [p.answer for p in decode_predictions(enc, windows, logits_, cfg.decoding)]
    predicted = answers(logits)
    result = score(predicted, gold)
    result["oracle_em"] = score(answers(oracle_logits(enc, windows)), gold)["em"]
    result["empty_answers"] = sum(not a for a in predicted)
    result["eval_windows"] = len(windows)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=os.environ.get("HW7QA_STAND_IN", str(STAND_IN)))
    parser.add_argument("--train", default=str(SHARED / "data/drcd/DRCD_test.json"))
    parser.add_argument("--dev", default=str(SHARED / "data/hw7-2021/hw7_dev.json"))
    parser.add_argument("--dev-limit", type=int, default=0, help="first N dev questions only (0: all)")
    parser.add_argument("--recipes", default="sample,project")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--runs", default=str(ROOT / "outputs" / "bench-accuracy"), help="run folders")
    parser.add_argument("--out", default=str(ROOT / "bench" / "accuracy.json"))
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="overrides for every recipe")
    parser.add_argument("--reuse", action="store_true", help="evaluate models already trained in --runs")
    args = parser.parse_args()

    if not Path(args.model).exists() and args.model == str(STAND_IN):
        sys.exit(f"no model at {args.model}: build the stand-in with ../shared/tools/stand-in-model/build")
    dev = load_qa_file(args.dev, need_answers=True)
    if args.dev_limit:
        dev = QAData(dev.path, dev.questions[:args.dev_limit], dev.paragraphs)
    project_cfg = load_config(ROOT / "configs" / "small-model.json")
    rows = []
    for recipe in args.recipes.split(","):
        preset = {"sample": "sample-recipe", "project": "small-model"}.get(recipe, recipe)
        common = {"model_name": args.model, "train_file": args.train, "dev_file": "", "test_file": "",
                  "epochs": args.epochs, "seed": args.seed, "output_dir": f"{args.runs}/{recipe}"}
        if recipe == "sample":
            common["batch_size"] = args.batch_size
        cfg = load_config(ROOT / "configs" / f"{preset}.json", [f"{k}={v}" for k, v in common.items()] + args.set)
        run_dir = Path(cfg.output_dir)
        timing = run_dir / "bench_train_minutes.json"
        if args.reuse and (run_dir / "model").is_dir():
            minutes = json.loads(timing.read_text())["minutes"] if timing.exists() else float("nan")
            print(f"{recipe}: reusing the model trained in {run_dir}", flush=True)
        else:
            started = time.time()
            run_dir = train(cfg)
            minutes = (time.time() - started) / 60
            timing.write_text(json.dumps({"minutes": minutes}))
        tokenizer = load_tokenizer(run_dir / "model", cfg.isolate_digits, cfg.isolate_cjk)
        train_enc = encode(load_qa_file(args.train), tokenizer, cfg.windows)
        n_windows = len(train_windows(train_enc, cfg.train_windows, random.Random(0)))
        decodings = [(recipe, cfg, recipe == "sample")]
        if recipe == "sample":   # the same model, decoded the project's way with the project's windows
            decodings.append(("sample+project-decoding", dataclasses.replace(
                project_cfg, isolate_cjk=cfg.isolate_cjk, isolate_digits=cfg.isolate_digits), False))
        for name, eval_cfg, sample_decoding in decodings:
            started = time.time()
            result = evaluate(eval_cfg, run_dir / "model", dev, sample_decoding)
            row = {"recipe": name, "train_windows": n_windows, "train_minutes": round(minutes, 1),
                   "eval_minutes": round((time.time() - started) / 60, 1), **result,
                   "dev_questions": len(dev.questions), "config": dataclasses.asdict(eval_cfg)}
            rows.append(row)
            print(f"{name}: EM {row['em']:.4f} F1 {row['f1']:.4f} oracle EM {row['oracle_em']:.4f}", flush=True)
            Path(args.out).write_text(json.dumps(rows, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")

    print(f"\nmodel {args.model}; train {args.train}; dev {args.dev} ({len(dev.questions)} questions); "
          f"epochs {args.epochs}; seed {args.seed}\n")
    print("| recipe | training windows | training min | dev EM | dev F1 | decoding-oracle EM | empty answers |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['recipe']} | {r['train_windows']} | {r['train_minutes']} | {r['em']:.4f} | {r['f1']:.4f} "
              f"| {r['oracle_em']:.4f} | {r['empty_answers']} |")


if __name__ == "__main__":
    main()

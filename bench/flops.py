"""A T4's minutes per preset from model FLOPs: the fallback where no GPU is at hand to run
``hw7qa estimate`` on (docs/benchmarks.md, "Measure on your GPU").

    python bench/flops.py --data hw7_dev.json --tokenizer DIR    # → bench/results/t4-estimate.json and .md

Each preset's whole run at HW7's size (every epoch's training windows, the dev evaluations of its
``eval_every``, the test prediction), window lengths from ``--data`` at the preset's window settings,
scaled to HW7's questions, in model FLOPs (``hw7qa.estimate.model_flops``: the formula, N counted
from the model's config), over the T4's 65 TFLOP/s fp16 peak at a band of MFU from two T4 anchors.
"""
from __future__ import annotations

import argparse
import json
import math
import random
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from hw7qa.config import load_config  # noqa: E402
from hw7qa.estimate import COURSE_T4, HW7, model_config, model_flops, peak_tflops  # noqa: E402
from hw7qa.files import atomic_write  # noqa: E402

T4_PEAK_TFLOPS = peak_tflops("Tesla T4")


def mfu(flops: float, seconds: float, peak: float) -> float:
    """Model FLOPs utilisation: ``flops / (seconds × peak TFLOP/s)``."""
    return flops / seconds / (peak * 1e12)


def electra_t4_mfu() -> float:
    """MFU of the one measured T4 training speed of a BERT-base-sized model (transformers' ELECTRA
    docs: electra-base-discriminator, fp16, SDPA, batch 16 × 256 tokens in 0.2036 s per step, T4,
    PyTorch 2.5.1), by this formula: encoder and a 2-way head only, so a lower bound if the measured
    model also ran its vocabulary projection."""
    return mfu(16 * model_flops(model_config("bert-base-chinese"), [256]), 0.2036, T4_PEAK_TFLOPS)


def preset_work(preset: str, data, tokenizer) -> dict:
    """Model FLOPs of the preset's whole run at HW7's size: its epochs of training windows, the dev
    evaluations its policy makes during training, and predicting the test file."""
    from hw7qa.train import evaluate_due
    from hw7qa.windows import encode, eval_windows, train_windows
    cfg = load_config(ROOT / "configs" / f"{preset}.json")
    shape = model_config(cfg.model_name)
    enc = encode(data, tokenizer, cfg.windows)
    scale = HW7["train"] / len(data.questions)
    lengths = train_windows(enc, cfg.train_windows, random.Random(0)).length
    epoch_windows = round(len(lengths) * scale)
    steps_per_epoch = math.ceil(math.ceil(epoch_windows / cfg.batch_size) / cfg.grad_accum)
    total = steps_per_epoch * cfg.epochs
    evaluations = sum(evaluate_due(step, steps_per_epoch, total, cfg) for step in range(1, total + 1))
    per_question = model_flops(shape, eval_windows(enc).length, training=False) / len(data.questions)
    training = cfg.epochs * model_flops(shape, lengths) * scale
    inference = (evaluations * HW7["dev"] + HW7["test"]) * per_question
    return {"preset": preset, "layers": shape.num_hidden_layers, "hidden": shape.hidden_size, "epochs": cfg.epochs,
            "epoch_windows": epoch_windows, "dev_evaluations": evaluations, "training_pflop": training / 1e15,
            "inference_pflop": inference / 1e15, "pflop": (training + inference) / 1e15}


def t4_estimate(data_file: str, tokenizer_dir: str) -> tuple[dict, str]:
    """A T4's minutes per preset (an estimate): FLOPs of the whole run over the T4's peak at a band of
    MFU from two anchors, the course's 8 minutes for the sample recipe and ELECTRA-base's speed."""
    from hw7qa.data import load_qa_file
    from hw7qa.models import load_tokenizer
    data, tokenizer = load_qa_file(data_file, need_answers=True), load_tokenizer(tokenizer_dir)
    rows = [preset_work(preset, data, tokenizer) for preset in COURSE_T4]
    anchors = {"course: sample recipe in 8 min": mfu(rows[0]["pflop"] * 1e15, COURSE_T4["sample-recipe"][1] * 60,
                                                     T4_PEAK_TFLOPS),
               "ELECTRA-base fp16 training (transformers docs)": electra_t4_mfu()}
    band = sorted(anchors.values())
    for row in rows:
        tier, minutes = COURSE_T4[row["preset"]]
        row.update(course=f"{tier}: {minutes} min", minutes_band=[row["pflop"] * 1e15 / (T4_PEAK_TFLOPS * 1e12 * u) / 60
                                                                   for u in band[::-1]])
    result = {"part": "t4-estimate", "data": Path(data_file).name, "questions_in_data": len(data.questions),
              "hw7": HW7, "anchors_mfu": anchors, "band_mfu": band, "rows": rows}
    return result, t4_markdown(result)


def t4_markdown(result: dict) -> str:
    low, high = result["band_mfu"]
    lines = [f"| preset | layers × hidden | course (T4 fp16) | epochs × windows | dev evaluations "
             f"| PFLOP (training + inference) | T4 at {high:.0%}–{low:.0%} MFU (band) |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in result["rows"]:
        fast, slow = r["minutes_band"]
        lines.append(f"| {r['preset']} | {r['layers']} × {r['hidden']} | {r['course']} | {r['epochs']} × "
                     f"{r['epoch_windows']:,} | {r['dev_evaluations']} | {r['training_pflop']:.1f} + "
                     f"{r['inference_pflop']:.1f} | {fast:.0f}–{slow:.0f} min |")
    anchors = "; ".join(f"{name}: {value:.1%}" for name, value in result["anchors_mfu"].items())
    return ("**Estimate, not a measurement.** Model FLOPs (bench/flops.py) of each preset's whole run at HW7's size "
            f"({result['hw7']['train']:,} training, {result['hw7']['dev']:,} dev, {result['hw7']['test']:,} test "
            f"questions), window lengths from {result['data']} ({result['questions_in_data']:,} questions, "
            f"scaled), over a T4's 65 TFLOP/s fp16 peak. The band is two T4 anchors' MFU by the same formula "
            f"({anchors}).\n\n" + "\n".join(lines) + "\n")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="a QA file with answers whose windows are counted "
                        "(data/hw7_train.json, or the 2021 HW7 dev file)")
    parser.add_argument("--tokenizer", required=True, help="the bert-base-chinese tokenizer (a folder or hub name)")
    parser.add_argument("--results", default=str(ROOT / "bench" / "results"), help="where the JSON and markdown go")
    args = parser.parse_args(argv)
    result, markdown = t4_estimate(args.data, args.tokenizer)
    for suffix, text in ((".json", json.dumps(result, ensure_ascii=False, indent=1) + "\n"), (".md", markdown)):
        with atomic_write(Path(args.results) / f"t4-estimate{suffix}", encoding="utf-8") as f:
            f.write(text)
    print(markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())

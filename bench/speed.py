"""Speed, side by side: the course sample's inference loop against the project's, and padding in training.

    python bench/speed.py                                   # random bert-base-chinese shape, 2021 HW7 dev
    python bench/speed.py --shape large --dev-limit 2000    # 24 layers, hidden 1024
    python bench/speed.py --model DIR_OR_HUB_NAME           # a real checkpoint instead
    python bench/speed.py --set inference_chunk=256         # rows (a) and (b) with the project's settings changed

Speed needs no trained weights: ``--shape`` builds a randomly initialised BertForQuestionAnswering
of a real shape (bert-base-chinese: 12 layers, hidden 768, vocabulary 21,128; large: 24 / 1024),
tokenised with the bert-base-chinese vocabulary from ../shared (or ``--tokenizer``). On a GPU the
model runs in half precision (bf16 where supported, else fp16). Rows:

(a) dev-set inference at doc_stride 32 and 150 with the sample's windows (40-token questions,
    150-token paragraph windows): the sample's loop (one question per batch, all its windows,
    padded to the full 193 tokens, argmax per window) against ``hw7qa.inference.answers`` (windows of
    many questions per batch, sorted by length, padded to the batch's longest, n-best decoding);
(b) the project's end-to-end inference (tokenise, windows, forward, decode) against the forward
    passes alone on the same, already collated batches (``forward_seconds`` below);
(c) training windows per second (forward, backward, optimizer step) with every batch padded to
    max_length against dynamic padding, and dynamic padding with length-grouped batches.

(d) (with ``--overhead-only``) the trainer's host time per step outside the model: collating a
    training batch, before (per-window dicts, ``DataCollatorWithPadding``) and after (``EpochWindows.collate``).

``--overhead-only`` measures what (b) loses, on any machine and on the whole dev file: each stage of
the project's ``predict`` with a model that costs nothing (``NullQA``: zero logits), i.e.
tokenising, windows, collating, copying logits back and decoding. On a GPU, collating the next
batch and unpacking the last one's logits run while a batch's forward pass does (``window_logits``);
tokenising, cutting windows and decoding happen before and after all forward passes, so (b) is
at most forward / (forward + those three).
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from transformers import (AutoModelForQuestionAnswering, BertConfig, BertForQuestionAnswering,  # noqa: E402
                          DataCollatorWithPadding)

from hw7qa.config import Config, apply_overrides  # noqa: E402
from hw7qa.data import QAData, load_qa_file  # noqa: E402
from hw7qa.batches import length_grouped_batches  # noqa: E402
from hw7qa.decode import decode_predictions  # noqa: E402
from hw7qa.inference import Reader, answers, batch_rows, window_logits  # noqa: E402
from hw7qa.models import inference_autocast, load_tokenizer  # noqa: E402
from hw7qa.windows import encode, eval_windows, padding_of, train_windows  # noqa: E402

SHARED = ROOT.parent / "shared"
SHAPES = {"bert-base": dict(num_hidden_layers=12, hidden_size=768, num_attention_heads=12, intermediate_size=3072),
          "large": dict(num_hidden_layers=24, hidden_size=1024, num_attention_heads=16, intermediate_size=4096),
          "small": dict(num_hidden_layers=4, hidden_size=256, num_attention_heads=4, intermediate_size=1024)}
SAMPLE_WINDOWS = dict(max_length=193, max_question_tokens=40, max_paragraph_tokens=150)   # the course sample's


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def half_autocast(device):
    if device.type != "cuda":
        return torch.autocast("cpu", enabled=False)
    return torch.autocast("cuda", dtype=torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16)


def features(windows, with_labels: bool = False) -> list[dict]:
    """Each window of a ``Windows`` table as lists, the unpadded dicts ``DataCollatorWithPadding`` pads."""
    out = []
    for i, (first, n) in enumerate(zip(windows.first.tolist(), windows.length.tolist())):
        f = {"input_ids": windows.ids[first:first + n].tolist(), "attention_mask": [1] * n}
        if windows.type_ids is not None:
            f["token_type_ids"] = windows.type_ids[first:first + n].tolist()
        if with_labels:
            f["start_positions"], f["end_positions"] = int(windows.start_position[i]), int(windows.end_position[i])
        out.append(f)
    return out


def sample_loop(model, enc, windows, seq_len, device) -> float:
    """The sample's evaluation: per question one batch of all its windows padded to ``seq_len``."""
    by_question: dict[int, list] = {}
    for qi, w in zip(windows.question_index.tolist(), features(windows)):
        by_question.setdefault(qi, []).append(w)
    sync(device)
    started = time.perf_counter()
    with torch.inference_mode(), half_autocast(device):
        for group in by_question.values():
            ids = torch.zeros(len(group), seq_len, dtype=torch.long)
            types = torch.zeros_like(ids)
            mask = torch.zeros_like(ids)
            for row, w in enumerate(group):
                n = len(w["input_ids"])
                ids[row, :n] = torch.tensor(w["input_ids"])
                types[row, :n] = torch.tensor(w["token_type_ids"])
                mask[row, :n] = 1
            out = model(input_ids=ids.to(device), token_type_ids=types.to(device), attention_mask=mask.to(device))
            for k in range(len(group)):   # what the sample's evaluate() does per window
                torch.max(out.start_logits[k], dim=0)
                torch.max(out.end_logits[k], dim=0)
    sync(device)
    return time.perf_counter() - started


class NullQA(torch.nn.Module):
    """A "model" whose forward pass costs nothing: zero start and end logits of the batch's shape."""

    def __init__(self):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))   # predict() reads the device from a parameter

    def forward(self, input_ids, **_):
        zeros = torch.zeros(input_ids.shape, device=input_ids.device)
        return type("Output", (), {"start_logits": zeros, "end_logits": zeros})()


def pipeline_overhead(tokenizer, dev, strides, batch_size, device) -> list[dict]:
    """Seconds of each stage of ``predict`` with ``NullQA``: everything of inference except the
    forward passes — tokenising, cutting windows, collating batches and copying logits back
    (``window_logits``), decoding."""
    rows = []
    for stride in strides:
        cfg = Config(max_length=193, max_question_tokens=40, max_paragraph_tokens=150, doc_stride=stride,
                     eval_batch_size=batch_size)
        model = NullQA().to(device)
        seconds, started = {}, time.perf_counter()
        enc = encode(dev, tokenizer, cfg.windows)
        seconds["tokenize"], started = time.perf_counter() - started, time.perf_counter()
        windows = eval_windows(enc)
        seconds["windows"], started = time.perf_counter() - started, time.perf_counter()
        logits = window_logits(model, tokenizer, windows, cfg.eval_batch_size, cfg.mixed_precision,
                               desc=f"overhead, stride {stride}")
        seconds["batches"], started = time.perf_counter() - started, time.perf_counter()
        decode_predictions(enc, windows, logits, cfg.decoding)
        seconds["decode"] = time.perf_counter() - started
        total = sum(seconds.values())
        rows.append({"row": f"(b) pipeline overhead without forward passes, doc_stride {stride}",
                     "questions": len(dev.questions), "windows": len(windows), "overhead_s": round(total, 2),
                     "overhead_ms_per_window": round(1000 * total / len(windows), 3),
                     **{f"{stage}_ms_per_window": round(1000 * t / len(windows), 3) for stage, t in seconds.items()}})
        print(rows[-1], flush=True)
    return rows


def training_host_cost(tokenizer, dev, batch_size, max_length) -> dict:
    """Host time of the trainer's data path outside the model, on ``dev`` as training data: per
    epoch, drawing the windows; per step, collating a batch. ``before``: per-window feature dicts
    padded by ``DataCollatorWithPadding`` (the trainer until this change); ``after``: the batch
    gathered from the ``Windows`` arrays (``EpochWindows.collate``). The same tensors either way."""
    from hw7qa.batches import EpochWindows, epoch_rng, shuffled_batches
    from hw7qa.windows import padding_of
    enc = encode(dev, tokenizer, Config(max_length=max_length).windows)
    dataset = EpochWindows(enc, "random", 0, padding_of(tokenizer))
    collator = DataCollatorWithPadding(tokenizer, pad_to_multiple_of=8)
    started = time.perf_counter()
    dataset.start_epoch(0)
    draw_s = time.perf_counter() - started
    feats = features(dataset.windows, with_labels=True)
    features_s = time.perf_counter() - started - draw_s
    batches = shuffled_batches(len(dataset), batch_size, epoch_rng(0, 0, "batches"))
    started = time.perf_counter()
    for rows in batches:
        collator([feats[i] for i in rows])
    before_s = time.perf_counter() - started
    started = time.perf_counter()
    for rows in batches:
        dataset.collate(rows)
    after_s = time.perf_counter() - started
    return {"row": f"(d) trainer's host time outside the model, max_length {max_length}, batch {batch_size}",
            "windows": len(dataset), "steps": len(batches),
            "epoch_windows_ms_before": round(1000 * (draw_s + features_s), 1),
            "epoch_windows_ms_after": round(1000 * draw_s, 1),
            "collate_ms_per_step_before": round(1000 * before_s / len(batches), 3),
            "collate_ms_per_step_after": round(1000 * after_s / len(batches), 3)}


def train_rate(model, tokenizer, windows, batch_size, steps, padding, device) -> float:
    """Training windows per second over ``steps`` steps with ``padding``: max_length | dynamic | grouped."""
    collate = DataCollatorWithPadding(tokenizer, pad_to_multiple_of=8) if padding != "max_length" else \
        DataCollatorWithPadding(tokenizer, padding="max_length", max_length=int(windows.length.max()))
    feats = features(windows, with_labels=True)
    rng = random.Random(0)
    if padding == "grouped":
        batches = length_grouped_batches(windows.length.tolist(), batch_size, rng)
    else:
        order = list(range(len(windows)))
        rng.shuffle(order)
        batches = [order[b:b + batch_size] for b in range(0, len(order), batch_size)]
    batches = [b for b in batches if len(b) == batch_size][:steps]
    if not batches:
        raise SystemExit(f"(c) needs a full batch of {batch_size} windows: raise --dev-limit")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=device.type in ("cpu", "cuda"))
    scaler = torch.amp.GradScaler(enabled=device.type == "cuda" and not torch.cuda.is_bf16_supported())
    model.train()
    # Every batch runs once untimed, then again timed. The first step of each padded width pays for
    # that shape once (allocator blocks, kernel choice); timing only first steps, as length-grouped
    # batches of all different widths would be, measures start-up rather than training.
    for timed in (False, True):
        sync(device)
        started = time.perf_counter()
        for idx in batches:
            batch = {k: v.to(device) for k, v in collate([feats[j] for j in idx]).items()}
            with half_autocast(device):
                loss = model(**batch).loss
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
        sync(device)
    model.eval()
    return len(batches) * batch_size / (time.perf_counter() - started)


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="", help="a checkpoint (default: random weights of --shape)")
    parser.add_argument("--shape", default="bert-base", choices=sorted(SHAPES))
    parser.add_argument("--tokenizer", default=str(SHARED / "models/bert-base-chinese-tokenizer"))
    parser.add_argument("--dev", default=str(SHARED / "data/hw7-2021/hw7_dev.json"))
    parser.add_argument("--dev-limit", type=int, default=300)
    parser.add_argument("--eval-batch-size", type=int, default=64)
    parser.add_argument("--train-max-length", type=int, default=384)
    parser.add_argument("--train-batch-size", type=int, default=16)
    parser.add_argument("--train-steps", type=int, default=10)
    parser.add_argument("--out", default=str(ROOT / "bench" / "speed.json"))
    parser.add_argument("--overhead-only", action="store_true", help="only the pipeline overhead, see above")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="inference settings of rows (a) and (b), e.g. inference_chunk=256 compile=true")
    return parser


def predict(model, tokenizer, data: QAData, cfg: Config, desc: str = "inference"):
    return answers(Reader(cfg, tokenizer, model), data, desc=desc)


def forward_seconds(model, tokenizer, data: QAData, cfg: Config) -> float:
    """Seconds of the forward passes alone that ``predict`` runs: every batch collated and copied to
    the device beforehand, then only the forward passes, timed until the device has finished."""
    device = next(model.parameters()).device
    windows = eval_windows(encode(data, tokenizer, cfg.windows))
    batches = [{key: torch.from_numpy(value).to(device) for key, value in
                windows.model_inputs(rows, **padding_of(tokenizer)).items()}
               for rows in batch_rows(windows, cfg.eval_batch_size)]
    model.eval()
    with torch.inference_mode(), inference_autocast(cfg.mixed_precision, device):
        sync(device)
        started = time.perf_counter()
        for batch in batches:
            model(**batch)
        sync(device)
    return time.perf_counter() - started


def inference_rows(model, tokenizer, dev: QAData, eval_batch_size: int, device, strides=(32, 150),
                   settings: dict | None = None) -> list[dict]:
    """Rows (a) and (b) at each doc_stride of ``strides``, with the sample's windows (193 tokens);
    the project's inference with ``settings`` of its Config."""
    rows = []
    for stride in strides:
        cfg = Config(**SAMPLE_WINDOWS, doc_stride=stride, eval_batch_size=eval_batch_size, **(settings or {}))
        enc = encode(dev, tokenizer, cfg.windows)
        windows = eval_windows(enc)
        predict(model, tokenizer, QAData(dev.path, dev.questions[:20], dev.paragraphs), cfg)   # warm-up
        sample_s = sample_loop(model, enc, windows, 193, device)
        sync(device)
        started = time.perf_counter()
        predict(model, tokenizer, dev, cfg, desc=f"stride {stride}")
        sync(device)
        project_s = time.perf_counter() - started
        forward_s = forward_seconds(model, tokenizer, dev, cfg)
        rows.append({"row": f"(a) inference, doc_stride {stride}", "windows": len(windows),
                     "sample_loop_s": round(sample_s, 2), "project_s": round(project_s, 2),
                     "speedup": round(sample_s / project_s, 2)})
        rows.append({"row": f"(b) forward alone / project end to end, doc_stride {stride}",
                     "forward_s": round(forward_s, 2), "project_s": round(project_s, 2),
                     "ratio": round(forward_s / project_s, 3)})
        print(rows[-2], rows[-1], sep="\n", flush=True)
    return rows


def training_row(model, tokenizer, dev: QAData, batch_size: int, steps: int, max_length: int, device) -> dict:
    """Row (c): training windows/s padded to max_length, dynamic, and length-grouped."""
    cfg = Config(max_length=max_length)
    windows = train_windows(encode(dev, tokenizer, cfg.windows), "random", random.Random(0))
    lengths = windows.length
    rates = {p: train_rate(model, tokenizer, windows, batch_size, steps, p, device)
             for p in ("max_length", "dynamic", "grouped")}
    row = {"row": f"(c) training windows/s at max_length {cfg.max_length}, batch {batch_size}",
           "mean_window_tokens": round(float(lengths.mean()), 1),
           **{f"{p}_per_s": round(r, 2) for p, r in rates.items()},
           "dynamic_speedup": round(rates["dynamic"] / rates["max_length"], 2),
           "grouped_speedup": round(rates["grouped"] / rates["max_length"], 2)}
    print(row, flush=True)
    return row


def main() -> None:
    args = parser().parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer = load_tokenizer(args.model or args.tokenizer)
    if args.model:
        model = AutoModelForQuestionAnswering.from_pretrained(args.model)
    else:
        torch.manual_seed(0)
        model = BertForQuestionAnswering(BertConfig(vocab_size=len(tokenizer), **SHAPES[args.shape]))
    model.to(device).eval()
    dev = load_qa_file(args.dev, need_answers=True)
    dev = QAData(dev.path, dev.questions[:args.dev_limit], dev.paragraphs)
    machine = torch.cuda.get_device_name(0) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"model {args.model or args.shape}; {machine}; {len(dev.questions)} dev questions", flush=True)
    if args.overhead_only:
        rows = pipeline_overhead(tokenizer, dev, (32, 150), args.eval_batch_size, device)
        rows.append(training_host_cost(tokenizer, dev, args.train_batch_size, args.train_max_length))
        print(rows[-1], flush=True)
        Path(args.out).write_text(json.dumps({"machine": machine, "dev_questions": len(dev.questions),
                                              "rows": rows}, indent=1) + "\n")
        return
    typed = apply_overrides(Config(), args.set)         # checked and typed, as the CLI's --set
    settings = {item.split("=", 1)[0]: getattr(typed, item.split("=", 1)[0]) for item in args.set}
    rows = inference_rows(model, tokenizer, dev, args.eval_batch_size, device, settings=settings)
    rows.append(training_row(model, tokenizer, dev, args.train_batch_size, args.train_steps, args.train_max_length,
                             device))
    Path(args.out).write_text(json.dumps({"machine": machine, "model": args.model or args.shape,
                                          "dev_questions": len(dev.questions), "rows": rows}, indent=1) + "\n")

if __name__ == "__main__":
    main()

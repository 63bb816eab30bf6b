"""A trained run's dev answers at fp32, under float16 autocast with a float16 QA head (hw7qa before the
head was made ``models.Float32Head``), and under float16 autocast with the float32 head (now).

    python bench/fp16_head.py RUN [RUN ...] --file ../shared/data/hw7-2021/hw7_dev.json [--limit N]

Per run: EM of each, and how many answers each float16 variant changes against fp32 (right → wrong,
wrong → right). One float16 pass gives both float16 variants: the plain head's logits are computed
by a hook from the same encoder output. fp32 logits come from the run's logits cache where it has
them. On the GPU if there is one; the run folders are only read.

``--emulate-matmuls``, for CPUs without float16 arithmetic (there a float16 matmul is several times slower
than a float32 one): each float16 matmul runs as a float32 matmul of its float16 inputs, its result rounded
to float16 once, as a GPU's tensor cores (float32 accumulation) and the CPU's float16 kernel compute it up
to the order of the sum. Attention and every other operation run as autocast gives them.
"""
from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from hw7qa.data import QAData, load_qa_file  # noqa: E402
from hw7qa.decode import decode_predictions  # noqa: E402
from hw7qa.inference import batch_rows, logits_path, read_cached_logits, unpack_logits, window_logits  # noqa: E402
from hw7qa.metrics import exact_match  # noqa: E402
from hw7qa.models import load_run_model, resolve_precision, run_tokenizer  # noqa: E402
from hw7qa.config import run_config  # noqa: E402
from hw7qa.windows import encode, eval_windows, padding_of  # noqa: E402


aten = torch.ops.aten
# linear and matmul reach a dispatch mode whole under inference_mode, decomposed (addmm, mm, bmm) under no_grad
MATMULS = {aten.linear.default, aten.matmul.default, aten.addmm.default, aten.mm.default, aten.bmm.default,
           aten.baddbmm.default}


class Float16MatmulsInFloat32(TorchDispatchMode):
    """Inside: a matmul given float16 tensors (autocast's casts already made) computes in float32, one rounding."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func not in MATMULS or args[0].dtype != torch.float16:
            return func(*args, **(kwargs or {}))
        return func(*[a.float() if isinstance(a, torch.Tensor) else a for a in args], **(kwargs or {})).half()


def variants(run: str, data: QAData, emulate: bool = False) -> dict[str, list[str]]:
    """The run's answers to ``data`` at fp32, fp16 (float16 head) and fp16 with the float32 head."""
    cfg = run_config(run)
    model = load_run_model(run).to("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer = run_tokenizer(run, cfg)
    enc = encode(data, tokenizer, cfg.windows)
    windows = eval_windows(enc)
    batches, plain = iter(batch_rows(windows, cfg.eval_batch_size)), []

    def float16_head(module, inputs, _):         # runs under the pass's autocast: a plain Linear's logits
        logits = torch.nn.functional.linear(inputs[0], module.weight, module.bias).float().permute(2, 0, 1).cpu()
        plain.extend(unpack_logits(next(batches), logits, None, windows.length, padding_of(tokenizer)["pad_left"]))
    hook = model.qa_outputs.register_forward_hook(float16_head)
    with Float16MatmulsInFloat32() if emulate else contextlib.nullcontext():
        logits = {"fp16 + float32 head": window_logits(model, tokenizer, windows, cfg.eval_batch_size, "fp16", "fp16")}
    hook.remove()
    logits["fp16"] = [None] * len(windows)
    for i, start, end in plain:
        logits["fp16"][i] = (start, end)
    fp32_cache = resolve_precision(cfg.mixed_precision) == "no"        # the cache holds the run's own precision
    cached = logits_path(Path(run), data, cfg, cfg.doc_stride) if fp32_cache else None
    logits["fp32"] = (cached and read_cached_logits(cached, windows.length.tolist())
                      or window_logits(model, tokenizer, windows, cfg.eval_batch_size, "no", "fp32"))
    return {name: [p.answer for p in decode_predictions(enc, windows, logits[name], cfg.decoding)]
            for name in ("fp32", "fp16", "fp16 + float32 head")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+")
    parser.add_argument("--file", required=True, help="a dev file with answers")
    parser.add_argument("--limit", type=int, default=0, help="its first N questions only (0: all)")
    parser.add_argument("--emulate-matmuls", action="store_true", help="float16 matmuls in float32 kernels (CPU)")
    args = parser.parse_args()
    data = load_qa_file(args.file, need_answers=True)
    if args.limit:
        data = QAData(data.path, data.questions[:args.limit], data.paragraphs)
    gold = [q.answer_text for q in data.questions]
    print("| run | EM fp32 | EM fp16 | EM fp16 + float32 head | changed: fp16 | changed: fp16 + float32 head |\n"
          "|---|---|---|---|---|---|")
    for run in args.runs:
        answers = variants(run, data, args.emulate_matmuls)
        right = {name: [exact_match(a, g) for a, g in zip(given, gold)] for name, given in answers.items()}

        def changed(name: str) -> str:
            moved = [i for i, (a, b) in enumerate(zip(answers["fp32"], answers[name])) if a != b]
            lost = int(sum(right["fp32"][i] and not right[name][i] for i in moved))
            won = int(sum(right[name][i] and not right["fp32"][i] for i in moved))
            return f"{len(moved)} ({lost} right → wrong, {won} wrong → right)"
        em = {name: sum(r) / len(r) for name, r in right.items()}
        print(f"| {run} | {em['fp32']:.4f} | {em['fp16']:.4f} | {em['fp16 + float32 head']:.4f} | {changed('fp16')} "
              f"| {changed('fp16 + float32 head')} |", flush=True)


if __name__ == "__main__":
    main()

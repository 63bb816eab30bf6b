"""Batched inference over windows, and span decoding into answer strings.

Inference batches windows of many questions together (``batch_size`` counts windows), sorted by
length so that dynamic padding pads little. Decoding follows Hugging Face's ``utils_qa.py``: per
window the top ``n_best`` starts × top ``n_best`` ends *inside the paragraph part*, kept when
``start <= end`` and the span has at most ``max_answer_length`` tokens, scored
``start_logit + end_logit``; the best span over all windows of a question wins. The answer is the
original paragraph sliced by the tokens' character offsets, never ``tokenizer.decode``, so rare
characters ([UNK]), upper case and spaces come back exactly as written.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import DataCollatorWithPadding

from .config import DecodeSpec
from .devices import inference_autocast
from .windows import Encoded, Window, encode, eval_windows, features

QUOTE_PAIRS = ("「」", "『』", "《》", "“”", "()", "（）")


@dataclass(frozen=True)
class Prediction:
    answer: str
    score: float            # start logit + end logit of the chosen span
    window: int             # index of the window it came from (-1: no window had a valid span)
    char_start: int         # [char_start, char_end) in the paragraph
    char_end: int


def pad_windows(batch: list[dict], pad_token_id: int, pad_to_multiple_of: int = 8) -> dict[str, torch.Tensor]:
    """Right-pad a batch of ``features`` dicts (lists of ints, plus ints such as ``window_index``)
    into int64 tensors, the length rounded up to a multiple of ``pad_to_multiple_of``.

    What ``DataCollatorWithPadding`` does for right-padding tokenizers, faster (numpy instead of
    ``torch.tensor`` on nested lists): at inference the collator was the largest cost outside the
    forward passes (bench/speed.py --overhead-only).
    """
    longest = max(len(f["input_ids"]) for f in batch)
    length = -(-longest // pad_to_multiple_of) * pad_to_multiple_of
    out = {}
    for key, value in batch[0].items():
        if isinstance(value, list):
            array = np.full((len(batch), length), pad_token_id if key == "input_ids" else 0, dtype=np.int64)
            for row, f in enumerate(batch):
                array[row, :len(f[key])] = f[key]
        else:
            array = np.array([f[key] for f in batch], dtype=np.int64)
        out[key] = torch.from_numpy(array)
    return out


def window_logits(model, tokenizer, windows: list[Window], batch_size: int, precision: str = "no",
                  desc: str = "inference", accelerator=None) -> list[tuple[np.ndarray, np.ndarray]]:
    """Start and end logits (float32, one array per window, unpadded) in the order of ``windows``.

    Windows are sorted by length so batches are padded as little as possible; no gradients; the
    forward pass runs under autocast at ``precision`` (a ``Config.mixed_precision`` value: ``auto``
    is bf16 or fp16 on a GPU, fp32 on the CPU). ``batch_size`` windows make one batch in total:
    with an ``accelerator`` of several processes each process runs an equal part of every batch
    and every process gets all logits back (``gather_object``). No DataLoader is handed to the
    accelerator, so evaluating during training adds nothing to what it holds. ``model`` must be
    the unwrapped model (``accelerator.unwrap_model``), not the DDP wrapper.
    """
    if tokenizer.padding_side == "right":
        collate = functools.partial(pad_windows, pad_token_id=tokenizer.pad_token_id)
    else:
        collate = DataCollatorWithPadding(tokenizer, pad_to_multiple_of=8)
    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator else (0, 1)
    order = sorted(range(len(windows)), key=lambda i: len(windows[i].input_ids), reverse=True)
    share = -(-batch_size // world)
    batches = [order[b:b + batch_size][rank * share:(rank + 1) * share] for b in range(0, len(order), batch_size)]
    feats = features(windows)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    mine = []
    with torch.inference_mode(), inference_autocast(precision, device):
        for batch_ids in tqdm(batches, desc=desc, unit="batch", leave=False, disable=rank != 0):
            if not batch_ids:      # the last batch may have no windows left for this process
                continue
            batch = {k: v.to(device) for k, v in collate([feats[i] for i in batch_ids]).items()}
            result = model(**batch)
            starts, ends = result.start_logits.float().cpu().numpy(), result.end_logits.float().cpu().numpy()
            for row, i in enumerate(batch_ids):
                n = len(windows[i].input_ids)
                mine.append((i, starts[row, :n].copy(), ends[row, :n].copy()))
    model.train(was_training)
    if world > 1:
        from accelerate.utils import gather_object
        mine = gather_object(mine)
    out: list = [None] * len(windows)
    for i, start, end in mine:
        out[i] = (start, end)
    return out


def best_spans(start_logits: np.ndarray, end_logits: np.ndarray, context_start: int, n_context: int,
               n_best: int, max_answer_length: int) -> list[tuple[float, int, int]]:
    """Valid spans of one window, best first, as ``(score, start, end)`` window positions (inclusive).

    Only positions ``context_start .. context_start + n_context - 1`` (the paragraph) are considered;
    of those the ``n_best`` highest starts and ends are paired, keeping ``start <= end`` and
    ``end - start + 1 <= max_answer_length``. Returns [] if no pair is valid.
    """
    lo, hi = context_start, context_start + n_context
    k = min(n_best, n_context)
    starts = lo + np.argpartition(-start_logits[lo:hi], k - 1)[:k]
    ends = lo + np.argpartition(-end_logits[lo:hi], k - 1)[:k]
    scores = start_logits[starts][:, None] + end_logits[ends][None, :]
    length = ends[None, :] - starts[:, None] + 1
    valid = (length >= 1) & (length <= max_answer_length)
    rows, cols = np.nonzero(valid)
    score, start, end = scores[rows, cols], starts[rows], ends[cols]
    order = np.lexsort((-end, -start, -score))   # best score first; ties: later start, then later end
    return list(zip(score[order].tolist(), start[order].tolist(), end[order].tolist()))


def exhaustive_best_span(start_logits: np.ndarray, end_logits: np.ndarray, context_start: int,
                         n_context: int, max_answer_length: int) -> tuple[float, int, int]:
    """The best valid span over *all* starts and ends of the paragraph part (the top-k fallback)."""
    s = start_logits[context_start:context_start + n_context].astype(np.float64)
    e = end_logits[context_start:context_start + n_context].astype(np.float64)
    scores = s[:, None] + e[None, :]
    length = np.arange(n_context)[None, :] - np.arange(n_context)[:, None] + 1
    scores[(length < 1) | (length > max_answer_length)] = -np.inf
    r, c = np.unravel_index(np.argmax(scores), scores.shape)
    return float(scores[r, c]), context_start + int(r), context_start + int(c)


def balance_quotes(paragraph: str, start: int, end: int) -> tuple[int, int]:
    """Repair an unpaired quote or bracket at the edges of ``paragraph[start:end]``.

    For each pair in ``QUOTE_PAIRS``: an opening mark without its closing one extends the span by
    one character if the paragraph continues with the closing mark, otherwise a leading opening
    mark is dropped; a closing mark without its opening one works the same way to the left.
    The span never becomes empty.
    """
    for opening, closing in QUOTE_PAIRS:
        text = paragraph[start:end]
        surplus = text.count(opening) - text.count(closing)
        if surplus > 0:
            if paragraph[end:end + 1] == closing:
                end += 1
            elif text.startswith(opening) and end - start > 1:
                start += 1
        elif surplus < 0:
            if start > 0 and paragraph[start - 1] == opening:
                start -= 1
            elif text.endswith(closing) and end - start > 1:
                end -= 1
    return start, end


def decode_predictions(enc: Encoded, windows: list[Window], logits: list[tuple[np.ndarray, np.ndarray]],
                       spec: DecodeSpec = DecodeSpec()) -> list[Prediction]:
    """One ``Prediction`` per question of ``enc.data``: the best span over all its windows, with
    ``spec``'s ``n_best`` and ``max_answer_length`` (``best_spans``) and, if ``balance_quotes``, its
    quotes repaired (``balance_quotes``).

    A span whose text is only whitespace is skipped. If no window of a question has a valid
    top-k pair, every start/end of every window is searched, so the answer is empty only if the
    question's paragraph has no tokens at all.
    """
    by_question: list[list[int]] = [[] for _ in enc.data.questions]
    for wi, w in enumerate(windows):
        by_question[w.question_index].append(wi)
    predictions = []
    for qi, window_ids in enumerate(by_question):
        paragraph = enc.data.paragraph(enc.data.questions[qi])
        best = None  # (score, window, char_start, char_end)
        for search in ("top-k", "exhaustive"):
            for wi in window_ids:
                w, (s_logits, e_logits) = windows[wi], logits[wi]
                n_context = w.token_end - w.token_start
                if n_context == 0:
                    continue
                spans = (best_spans(s_logits, e_logits, w.context_start, n_context, spec.n_best, spec.max_answer_length)
                         if search == "top-k" else
                         [exhaustive_best_span(s_logits, e_logits, w.context_start, n_context, spec.max_answer_length)])
                for score, s, e in spans:
                    if best is not None and score <= best[0]:
                        break
                    char_start, char_end = w.char_span(enc, s, e)
                    if paragraph[char_start:char_end].strip():
                        best = (score, wi, char_start, char_end)
                        break
            if best is not None:
                break
        if best is None:
            predictions.append(Prediction("", float("-inf"), -1, 0, 0))
            continue
        score, wi, char_start, char_end = best
        if spec.balance_quotes:
            char_start, char_end = balance_quotes(paragraph, char_start, char_end)
        predictions.append(Prediction(paragraph[char_start:char_end], score, wi, char_start, char_end))
    return predictions


def oracle_logits(enc: Encoded, windows: list[Window]) -> list[tuple[np.ndarray, np.ndarray]]:
    """Logits of a perfect model: 10 on the gold start and end token of every window holding the
    whole answer, 0 elsewhere. Decoding these measures what the windows and decoding alone lose."""
    logits = []
    for w in windows:
        start, end = np.zeros(len(w.input_ids), np.float32), np.zeros(len(w.input_ids), np.float32)
        answer = enc.answer_tokens[w.question_index]
        if answer and w.token_start <= answer[0] and answer[1] < w.token_end:
            start[w.context_start + answer[0] - w.token_start] = 10
            end[w.context_start + answer[1] - w.token_start] = 10
        logits.append((start, end))
    return logits


def predict_encoded(model, tokenizer, enc: Encoded, cfg, accelerator=None, desc: str = "inference") -> list[Prediction]:
    """Answers for every question of an already tokenized file (training encodes dev once), with
    ``cfg``'s inference batch size, precision and decoding."""
    windows = eval_windows(enc)
    logits = window_logits(model, tokenizer, windows, cfg.eval_batch_size, cfg.mixed_precision, desc, accelerator)
    return decode_predictions(enc, windows, logits, cfg.decoding)


def predict(model, tokenizer, data, cfg, accelerator=None, desc: str = "inference") -> list[Prediction]:
    """Answers for every question of ``data`` (a ``QAData``), with the windows and decoding of ``cfg``."""
    return predict_encoded(model, tokenizer, encode(data, tokenizer, cfg.windows), cfg, accelerator, desc)

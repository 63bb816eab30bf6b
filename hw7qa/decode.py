"""Batched inference over windows, and span decoding into answer strings.

Inference batches windows of many questions together (``batch_size`` counts windows), sorted by
length so that dynamic padding pads little. Decoding follows Hugging Face's ``utils_qa.py``: per
window the top ``n_best`` starts × top ``n_best`` ends *inside the paragraph part*, kept when
``start <= end`` and the span has at most ``max_answer_length`` tokens, scored
``start_logit + end_logit``; the best span over all windows of a question wins. The answer is the
original paragraph sliced by the tokens' character offsets, never ``tokenizer.decode``, so rare
characters ([UNK]), upper case and spaces come back exactly as written.

Batches are gathered from the ``Windows`` table in one step each, with no list per window.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from .config import DecodeSpec
from .devices import inference_autocast
from .windows import Encoded, Window, Windows, encode, eval_windows

QUOTE_PAIRS = ("「」", "『』", "《》", "“”", "()", "（）")


@dataclass(frozen=True)
class Prediction:
    answer: str
    score: float            # start logit + end logit of the chosen span
    window: int             # index of the window it came from (-1: no window had a valid span)
    char_start: int         # [char_start, char_end) in the paragraph
    char_end: int


def to_device(array: np.ndarray, device: torch.device) -> torch.Tensor:
    """``array`` as a tensor on ``device``, the copy queued without waiting for it.

    From pinned memory the copy to a GPU is asynchronous; from ordinary (pageable) memory the
    driver may first wait for the GPU to finish its queued work, which would end the overlap in
    ``window_logits``. On the CPU the tensor shares the array's memory.
    """
    tensor = torch.from_numpy(array)
    if device.type == "cpu":
        return tensor
    return tensor.pin_memory().to(device, non_blocking=True)


def logits_to_host(result) -> tuple[torch.Tensor, torch.Event | None]:
    """A forward pass's start and end logits as one float32 ``(2, batch, length)`` CPU tensor,
    and an event to wait on before reading it (None on the CPU: nothing to wait for).

    On a GPU the copy is only queued behind the forward pass (``non_blocking``, into pinned
    memory) and the event is done once it has landed.
    """
    logits = torch.stack((result.start_logits, result.end_logits)).float()
    host = logits.to("cpu", non_blocking=True)
    if logits.device.type == "cpu":
        return host, None
    landed = torch.Event(device=logits.device)
    landed.record()
    return host, landed


def unpack_logits(rows: np.ndarray, host: torch.Tensor, landed, length: np.ndarray, pad_left: bool
                  ) -> list[tuple[int, np.ndarray, np.ndarray]]:
    """``(window, start logits, end logits)`` of each of ``rows``, cut to the window's length (from
    the right end of the row when padding is on the left), once ``landed`` (from ``logits_to_host``)
    is done. The batch is copied once out of the (pinned) transfer memory; each window's arrays are
    views of that copy."""
    if landed is not None:
        landed.synchronize()
    batch = host.numpy().copy()
    out = []
    for row, (i, n) in enumerate(zip(rows.tolist(), length[rows].tolist())):
        first = batch.shape[2] - n if pad_left else 0
        out.append((i, batch[0, row, first:first + n], batch[1, row, first:first + n]))
    return out


def window_logits(model, tokenizer, windows: Windows, batch_size: int, precision: str = "no",
                  desc: str = "inference", accelerator=None) -> list[tuple[np.ndarray, np.ndarray]]:
    """Start and end logits (float32, one array per window, unpadded) in the order of ``windows``
    (a ``Windows`` table, as ``eval_windows`` makes it).

    Windows are sorted by length so batches are padded as little as possible; no gradients; the
    forward pass runs under autocast at ``precision`` (a ``Config.mixed_precision`` value: ``auto``
    is bf16 or fp16 on a GPU, fp32 on the CPU). ``batch_size`` windows make one batch in total:
    with an ``accelerator`` of several processes each process runs an equal part of every batch
    and every process gets all logits back (``gather_object``). No DataLoader is handed to the
    accelerator, so evaluating during training adds nothing to what it holds. ``model`` must be
    the unwrapped model (``accelerator.unwrap_model``), not the DDP wrapper.

    On a GPU the CPU work overlaps the forward passes: batch k's logits are only collected after
    batch k+1 has been collated and queued (see the loop).
    """
    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator else (0, 1)
    order = np.argsort(-windows.length, kind="stable")      # longest first; equal lengths in window order
    share = -(-batch_size // world)
    batches = [order[b:b + batch_size][rank * share:(rank + 1) * share] for b in range(0, len(order), batch_size)]
    batches = [rows for rows in batches if len(rows)]        # the last batch may have no windows left for this process
    padding = dict(pad_token_id=tokenizer.pad_token_id, pad_type_id=tokenizer.pad_token_type_id,
                   pad_left=tokenizer.padding_side == "left")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    mine, previous = [], None
    with torch.inference_mode(), inference_autocast(precision, device):
        for rows in tqdm(batches, desc=desc, unit="batch", leave=False, disable=rank != 0):
            inputs = {k: to_device(v, device) for k, v in windows.model_inputs(rows, **padding).items()}
            # On a GPU, model() only queues the forward pass and returns. So the previous batch's
            # logits are unpacked, and the next batch collated, while this batch runs; waiting for
            # this batch's own logits here would leave the GPU idle during that CPU work. On the
            # CPU the forward pass is done when model() returns, and the order changes nothing.
            this = (rows, *logits_to_host(model(**inputs)))
            if previous is not None:
                mine += unpack_logits(*previous, windows.length, padding["pad_left"])
            previous = this
        if previous is not None:
            mine += unpack_logits(*previous, windows.length, padding["pad_left"])
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

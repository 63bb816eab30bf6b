"""Batched inference over windows, and span decoding into answer strings.

Inference batches windows of many questions together (``batch_size`` counts windows), sorted by
length so that dynamic padding pads little. Decoding follows Hugging Face's ``utils_qa.py``: per
window the top ``n_best`` starts × top ``n_best`` ends *inside the paragraph part*, kept when
``start <= end`` and the span has at most ``max_answer_length`` tokens, scored
``start_logit + end_logit``; the best span over all windows of a question wins. The answer is the
original paragraph sliced by the tokens' character offsets, never ``tokenizer.decode``, so rare
characters ([UNK]), upper case and spaces come back exactly as written.

Ties (equal logits or span scores) are broken by one rule everywhere, so that answers never depend
on a sort: of equal logits, the n_best taken are the leftmost (``top_positions``); of a window's
spans with equal scores, the later start wins, then the later end (``best_spans``); of a question's
windows with equal best scores, the earlier window (``best_window_per_question``).

Both sides work on whole arrays, not window by window: batches are gathered from the ``Windows``
table, and the best span of every window is found for thousands of windows at once
(``window_best_spans``); only the rare question whose best span has no content (whitespace or
commas only), or has no valid top-k pair at all, is decoded one span at a time (``walk_spans``).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from .compiling import compile_model
from .config import DecodeSpec
from .devices import inference_autocast
from .submission import has_content
from .windows import Encoded, Windows, encode, eval_windows, padding_of

QUOTE_PAIRS = ("「」", "『』", "《》", "“”", "()", "（）")
CHUNK_WINDOWS = 4096   # windows decoded at once: the n_best × n_best pair arrays of a chunk stay a few MB


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


def batch_rows(windows: Windows, batch_size: int, rank: int = 0, world: int = 1) -> list[np.ndarray]:
    """The windows of each inference batch that process ``rank`` of ``world`` runs: all windows
    sorted by length, longest first (equal lengths in window order), cut into batches of
    ``batch_size`` in total, each process taking an equal part of every batch."""
    order = np.argsort(-windows.length, kind="stable")
    share = -(-batch_size // world)
    batches = [order[b:b + batch_size][rank * share:(rank + 1) * share] for b in range(0, len(order), batch_size)]
    return [rows for rows in batches if len(rows)]        # the last batch may have no windows left for this process


def window_logits(model, tokenizer, windows: Windows, batch_size: int, precision: str = "no",
                  desc: str = "inference", accelerator=None, progress: bool = True
                  ) -> list[tuple[np.ndarray, np.ndarray]]:
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
    batch k+1 has been collated and queued (see the loop). ``progress``: a progress bar of the
    batches (on the main process).
    """
    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator else (0, 1)
    batches = batch_rows(windows, batch_size, rank, world)
    padding = padding_of(tokenizer)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    mine, previous = [], None
    with torch.inference_mode(), inference_autocast(precision, device):
        # On the line of an open bar (training's), cleared when done: a nested bar would add a line at
        # every update where the output does not move the cursor back up (a notebook without widgets).
        for rows in tqdm(batches, desc=desc, unit="batch", leave=False, position=0,
                         disable=rank != 0 or not progress):
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


def top_positions(logits: np.ndarray, n_valid: np.ndarray, k: int) -> np.ndarray:
    """Per row of ``logits``, the positions of its ``k`` highest values among the first
    ``n_valid[row]``, in ascending order of position; -1 fills a row with fewer than ``k``.

    Values tied with the k-th highest are taken from the left, so the choice never depends on the
    sorting algorithm; NaN counts as -inf. ``k`` must not exceed the row length.
    """
    logits = np.where(np.isnan(logits), -np.inf, logits)
    width = logits.shape[1]
    kth = np.partition(logits, width - k, axis=1)[:, width - k:width - k + 1]   # each row's k-th highest value
    position = np.arange(width)
    valid = position < n_valid[:, None]
    above, tied = valid & (logits > kth), valid & (logits == kth)
    room = k - np.count_nonzero(above, axis=1)[:, None]        # how many of the tied values still fit
    chosen = above | (tied & (np.cumsum(tied, axis=1) <= room))
    chosen |= ~valid & (position < k)     # a row with fewer than k valid positions: fill it up to k ...
    columns = np.nonzero(chosen)[1].reshape(len(logits), k)    # ... so every row has k, in ascending order
    return np.where(columns < n_valid[:, None], columns, -1)   # ... and mark the filling invalid


def highest(logits: np.ndarray, k: int) -> np.ndarray:
    """``top_positions`` of one row with no invalid positions, the simple way: a stable sort keeps
    tied values in position order, so the leftmost of them come first."""
    ranked = np.argsort(-np.where(np.isnan(logits), -np.inf, logits), kind="stable")
    return np.sort(ranked[:k])


def best_spans(start_logits: np.ndarray, end_logits: np.ndarray, context_start: int, n_context: int,
               n_best: int, max_answer_length: int) -> list[tuple[float, int, int]]:
    """Valid spans of one window, best first, as ``(score, start, end)`` window positions (inclusive).

    Only positions ``context_start .. context_start + n_context - 1`` (the paragraph) are considered;
    of those the ``n_best`` highest starts and ends are paired, keeping ``start <= end`` and
    ``end - start + 1 <= max_answer_length``. Returns [] if no pair is valid. Which ``n_best``
    logits are highest is decided as in ``top_positions`` (ties from the left, NaN as -inf).
    """
    lo, hi = context_start, context_start + n_context
    k = min(n_best, n_context)
    starts = lo + highest(start_logits[lo:hi], k)
    ends = lo + highest(end_logits[lo:hi], k)
    scores = start_logits[starts][:, None] + end_logits[ends][None, :]
    length = ends[None, :] - starts[:, None] + 1
    valid = (length >= 1) & (length <= max_answer_length)
    rows, cols = np.nonzero(valid)
    score, start, end = scores[rows, cols], starts[rows], ends[cols]
    order = np.lexsort((-end, -start, -score))   # best score first; ties: later start, then later end
    return list(zip(score[order].tolist(), start[order].tolist(), end[order].tolist()))


def context_logits(windows: Windows, logits: list[tuple[np.ndarray, np.ndarray]], rows: range
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Start and end logits of the paragraph part of windows ``rows``, one row each, padded with
    -inf to the longest paragraph part: column j is window position ``context_start + j``."""
    n_context = windows.token_end[rows] - windows.token_start[rows]
    column = np.arange(n_context.max(initial=0))
    inside = column < n_context[:, None]
    packed = []
    for side in (0, 1):
        arrays = [logits[i][side] for i in rows]
        lengths = np.array([len(a) for a in arrays])
        first = np.cumsum(lengths) - lengths                # where each window's logits start once concatenated
        where = np.where(inside, (first + windows.context_start[rows])[:, None] + column, 0)
        packed.append(np.where(inside, np.concatenate(arrays)[where], -np.inf))
    return packed[0], packed[1]


def window_best_spans(windows: Windows, logits: list[tuple[np.ndarray, np.ndarray]], spec: DecodeSpec
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The first span ``best_spans`` gives for each window, for all windows at once:
    ``(score, start, end, found)``, positions in the window, ``found`` False where no top-k pair
    of the window is valid (its other entries are then meaningless)."""
    n = len(windows)
    score, start, end, found = np.zeros(n, np.float64), np.zeros(n, np.int64), np.zeros(n, np.int64), np.zeros(n, bool)
    for lo in range(0, n, CHUNK_WINDOWS):
        rows = range(lo, min(lo + CHUNK_WINDOWS, n))
        start_logits, end_logits = context_logits(windows, logits, rows)
        k = min(spec.n_best, start_logits.shape[1])
        if k == 0:       # no window of the chunk has a paragraph token
            continue
        n_context = windows.token_end[rows] - windows.token_start[rows]
        starts, ends = top_positions(start_logits, n_context, k), top_positions(end_logits, n_context, k)
        pair_score = (np.take_along_axis(start_logits, np.maximum(starts, 0), 1)[:, :, None]
                      + np.take_along_axis(end_logits, np.maximum(ends, 0), 1)[:, None, :]).reshape(len(rows), k * k)
        length = (ends[:, None, :] - starts[:, :, None] + 1).reshape(len(rows), k * k)
        valid = ((starts >= 0)[:, :, None] & (ends >= 0)[:, None, :]).reshape(len(rows), k * k)
        valid &= (length >= 1) & (length <= spec.max_answer_length)
        top = np.where(valid, pair_score, -np.inf).max(axis=1, keepdims=True)
        hits = valid & (pair_score == top)
        # pairs run through starts, then ends, in ascending positions: the last hit is the best
        # pair with the later start, then the later end, as ``best_spans`` breaks ties
        pick = k * k - 1 - np.argmax(hits[:, ::-1], axis=1)
        context_start = windows.context_start[rows]
        score[rows] = top[:, 0]
        start[rows] = context_start + starts[np.arange(len(rows)), pick // k]
        end[rows] = context_start + ends[np.arange(len(rows)), pick % k]
        found[rows] = hits.any(axis=1)
    return score, start, end, found


def best_window_per_question(question_index: np.ndarray, score: np.ndarray, found: np.ndarray,
                             n_questions: int) -> np.ndarray:
    """For each question, the window whose best span scores highest (the first such window on
    ties), among the windows with ``found``; -1 for a question with none."""
    rows = np.flatnonzero(found)
    rows = rows[np.lexsort((rows, -score[rows], question_index[rows]))]   # by question, best score first
    question = question_index[rows]
    first = np.r_[True, question[1:] != question[:-1]] if len(rows) else np.zeros(0, bool)
    best = np.full(n_questions, -1, dtype=np.int64)
    best[question[first]] = rows[first]
    return best


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


def window_spans(windows: Windows, logits: list[tuple[np.ndarray, np.ndarray]], wi: int, spec: DecodeSpec,
                 search: str) -> list[tuple[float, int, int]]:
    """The spans of window ``wi``, best first: its ``best_spans`` (``search="top-k"``) or its one
    ``exhaustive_best_span`` (``"exhaustive"``); none for a window without paragraph tokens."""
    (start_logits, end_logits), context_start = logits[wi], int(windows.context_start[wi])
    n_context = int(windows.token_end[wi] - windows.token_start[wi])
    if n_context == 0:
        return []
    if search == "top-k":
        return best_spans(start_logits, end_logits, context_start, n_context, spec.n_best, spec.max_answer_length)
    return [exhaustive_best_span(start_logits, end_logits, context_start, n_context, spec.max_answer_length)]


def walk_spans(enc: Encoded, windows: Windows, logits: list[tuple[np.ndarray, np.ndarray]], qi: int,
               spec: DecodeSpec, search: str) -> tuple[float, int, int, int] | None:
    """The best span of question ``qi`` found one span at a time: ``(score, window, char_start,
    char_end)``, or None if no span has content.

    Each window's spans (``window_spans``) are walked best first, spans without content (only
    whitespace and commas: ``submission.has_content``) skipped; the
    first other span of a window replaces the best so far only if it scores higher, so ties go to
    the earlier window.
    """
    paragraph = enc.data.paragraph(enc.data.questions[qi])
    best = None
    for wi in np.flatnonzero(windows.question_index == qi).tolist():
        for score, s, e in window_spans(windows, logits, wi, spec, search):
            if best is not None and score <= best[0]:
                break
            char_start, char_end = windows.char_span(enc, wi, s, e)
            if has_content(paragraph[char_start:char_end]):
                best = (score, wi, char_start, char_end)
                break
    return best


def decode_predictions(enc: Encoded, windows: Windows, logits: list[tuple[np.ndarray, np.ndarray]],
                       spec: DecodeSpec = DecodeSpec()) -> list[Prediction]:
    """One ``Prediction`` per question of ``enc.data``: the best span over all its windows, with
    ``spec``'s ``n_best`` and ``max_answer_length`` (``best_spans``) and, if ``balance_quotes``, its
    quotes repaired (``balance_quotes``).

    A span whose text is only whitespace and commas is skipped (it would be an empty answer in
    result.csv, ``submission.has_content``). If no window of a question has a valid
    top-k pair, every start/end of every window is searched, so the answer is empty only if the
    question's paragraph has no tokens at all. Ties: the module's rule.

    The best span of every window is found for all windows at once, and the question's answer is
    the best of its windows' (``best_window_per_question``): what ``walk_spans`` would find,
    unless that span has no content. Only then is the question walked span by span.
    """
    score, start, end, found = window_best_spans(windows, logits, spec)
    best_window = best_window_per_question(windows.question_index, score, found, len(enc.data.questions))
    predictions = []
    for qi, wi in enumerate(best_window.tolist()):
        paragraph = enc.data.paragraph(enc.data.questions[qi])
        best = None
        if wi >= 0:        # some window has a valid top-k pair
            best = (float(score[wi]), wi, *windows.char_span(enc, wi, int(start[wi]), int(end[wi])))
            if not has_content(paragraph[best[2]:best[3]]):
                best = walk_spans(enc, windows, logits, qi, spec, "top-k")
        if best is None:
            best = walk_spans(enc, windows, logits, qi, spec, "exhaustive")
        if best is None:
            predictions.append(Prediction("", float("-inf"), -1, 0, 0))
            continue
        best_score, wi, char_start, char_end = best
        if spec.balance_quotes:
            char_start, char_end = balance_quotes(paragraph, char_start, char_end)
        predictions.append(Prediction(paragraph[char_start:char_end], best_score, wi, char_start, char_end))
    return predictions


def oracle_logits(enc: Encoded, windows: Windows) -> list[tuple[np.ndarray, np.ndarray]]:
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
    ``cfg``'s inference batch size, precision and decoding; ``model`` compiled first with ``compile``."""
    compile_model(model, cfg.compile)
    windows = eval_windows(enc)
    logits = window_logits(model, tokenizer, windows, cfg.eval_batch_size, cfg.mixed_precision, desc, accelerator)
    return decode_predictions(enc, windows, logits, cfg.decoding)


def predict(model, tokenizer, data, cfg, accelerator=None, desc: str = "inference") -> list[Prediction]:
    """Answers for every question of ``data`` (a ``QAData``), with the windows and decoding of ``cfg``."""
    return predict_encoded(model, tokenizer, encode(data, tokenizer, cfg.windows), cfg, accelerator, desc)

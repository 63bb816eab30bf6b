"""Accuracy, side by side and over seeds: the course sample recipe against the project's, same model and data.

    python bench/accuracy.py                          # stand-in model, DRCD test → 2021 HW7 dev, seed 0
    python bench/accuracy.py --seeds 0,1,2 --dev-limit 1000 --recipes sample,project
    python bench/accuracy.py --seeds 0-4 --model DIR_OR_HUB_NAME --train T.json --dev D.json --recipes project,bert-base
    python bench/accuracy.py --seeds 0,1,2 --reuse    # evaluate the models of an earlier run again
    python bench/accuracy.py --seeds 0-4 --jobs 4     # on a GPU: 4 runs at once, each in its own process
    python bench/accuracy.py --seeds 0-2 --jobs 12 --budget-min 6   # start no run that would end after 6 min

Every (recipe, seed) is one training run (``hw7qa.train.train``, no dev evaluation during training)
into ``--runs``/<recipe>-seed<N>, then decoded on the dev questions (on the GPU when there is one, at
the recipe's ``mixed_precision``). Before each run the global RNGs (python, numpy, torch) are seeded
with the run's seed, so the QA head's initialisation and the dropout masks depend on the seed too,
not only the training windows and their order (which ``cfg.seed`` drives). Runs go seed by seed
(every recipe of seed 0, then of seed 1, ...), so an interrupted benchmark leaves paired results.
With ``--jobs 1`` (default) they run one after the other in this process (``train()`` is
re-entrant); with ``--jobs N`` each run is a fresh process, N at a time. ``--budget-min M`` starts a
run only if it would end within M minutes of the start, taking a run to last as long as the longest
so far (``--run-estimate-min`` before the first ends); the runs left out are listed in the results.

Recipes:

- ``sample``: the course sample code — configs/sample-recipe.json (40-token questions, 150-token
  windows advancing 150, centred training window, lr 1e-4 constant, fp32) — decoded the way the
  sample's ``evaluate()`` decodes (``sample_decode`` below). Its row "sample+project-decoding"
  decodes the same models with the project's decoding and the project's inference windows.
- ``project``: the project's recipe for small models, configs/small-model.json.
- any other name: configs/<name>.json.
- ``RECIPE+key=value+key=value``: that recipe with settings changed, e.g.
  ``project+ema_decay=0.999`` or ``project+tta_strides=64,96`` (quote it in the shell); its runs
  go to their own folders, so ``--recipes project,project+fgm_epsilon=1`` pairs a knob with its
  baseline seed by seed.

Every recipe gets the same model, data, seeds, epochs and batch size (``--batch-size``, unless the
recipe is ``project`` or a preset that sets its own). The decoding-oracle EM puts the maximum
logit on the gold tokens and decodes: what the windows and decoding alone lose.

Per row: mean, standard deviation and range over seeds of EM and F1 (``spread``), and the paired
difference against ``--baseline`` (default: the first row) with a bootstrap confidence interval over
seeds × questions (``paired_bootstrap``). Written to ``--out`` (JSON: the setup, every run's scores,
settings and per-question answers, EM and F1, and the summary) and, beside it, the tables in
markdown (``--out`` with ``.md``), which are also printed.

Decoding variants (``--variants``): each ``key=value`` (several joined by ``+``) is a row
``<recipe>@<variant>``: every run of every recipe but ``sample`` decoded again with that setting, paired
seed by seed with the run's own decoding. A variant trains nothing and runs no model for windows
already seen: it decodes the logits ``hw7qa.inference.stride_logits`` cached in ``<run>/logits/`` (one forward
pass per window setting, the first time). It may change only ``DECODING`` (and ``doc_stride``, the
inference windows, where ``train_windows`` is not ``all``); ``answer_length_quantile`` takes
``max_answer_length`` from the run's training answers, as ``train`` does. A variant with more
windows (``tta_strides``, a smaller ``doc_stride``) reports the inference time they add, at the
seconds per window of the run's last evaluation that ran its model on that device (saved in the run
folder, ``RATE``, so that one whose logits are all cached still prices them; "—" where none did).

An existing run folder is never replaced silently: ``--reuse`` evaluates a finished run's model/
again (and continues an unfinished one from its last checkpoint) when the folder's settings are the
benchmark's, or differ only in decoding settings, which the benchmark's then replace; ``--overwrite``
retrains it; with neither the benchmark stops before training anything.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import json
import math
import os
import platform
import random
import re
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


from hw7qa.config import FREE_ON_RESUME, Config, DecodeSpec, apply_overrides, load_config  # noqa: E402
from hw7qa.data import QAData, load_qa_file  # noqa: E402
from hw7qa.files import atomic_write  # noqa: E402
from hw7qa.metrics import char_f1, exact_match  # noqa: E402

SHARED = ROOT.parent / "shared"
STAND_IN = Path.home() / ".cache/stand-in/multilingual-e5-small"
PRESETS = {"sample": "sample-recipe", "project": "small-model"}
FINISHED = "bench_train_minutes.json"     # written into a run folder once train() has returned
RATE = "bench_inference_rate.json"         # seconds per window of the run's last uncached evaluation, per device
# What a decoding variant may change: how logits become answers, and the extra inference windows. The
# benchmark's runs evaluate no dev file while training, so none of these took part in training.
DECODING = (*(f.name for f in dataclasses.fields(DecodeSpec)), "tta_strides", "answer_length_quantile")


# ---------------------------------------------------------------- statistics (pure)

def parse_seeds(text: str) -> list[int]:
    """``"0,1,2"`` → [0, 1, 2]; ranges are inclusive: ``"0-4"`` → [0, 1, 2, 3, 4], ``"0-2,7"`` →
    [0, 1, 2, 7]. Order is kept; a seed given twice, a negative or empty item is a ValueError."""
    seeds: list[int] = []
    for item in text.split(","):
        item = item.strip()
        try:
            if "-" in item[1:]:
                first, last = (int(part) for part in item.split("-", 1))
                if last < first:
                    raise ValueError
                seeds += range(first, last + 1)
            else:
                seeds.append(int(item))
        except ValueError:
            raise ValueError(f"--seeds: {item!r} is not a seed (N) or a range (N-M)") from None
    if any(s < 0 for s in seeds) or len(set(seeds)) != len(seeds):
        raise ValueError(f"--seeds {text!r}: seeds must be distinct and not negative")
    return seeds


def spread(values) -> dict:
    """Mean, standard deviation and range of ``values`` (one number per seed).

    Returns ``{"n", "mean", "sd", "min", "max"}``: ``mean`` = Σx / n; ``sd`` the sample standard
    deviation √(Σ(x − mean)² / (n − 1)) (Bessel's n − 1, numpy ``ddof=1``), NaN when n = 1;
    ``min`` and ``max`` the range. Raises ValueError for no values.
    """
    x = np.asarray(values, dtype=np.float64)
    if x.ndim != 1 or x.size == 0:
        raise ValueError("spread needs a non-empty list of numbers")
    return {"n": int(x.size), "mean": float(x.mean()), "sd": float(x.std(ddof=1)) if x.size > 1 else math.nan,
            "min": float(x.min()), "max": float(x.max())}


def paired_bootstrap(scores, baseline, n_boot: int = 5000, confidence: float = 0.95, seed: int = 0,
                     chunk: int = 250) -> dict:
    """The paired difference ``mean(scores) − mean(baseline)`` and its percentile bootstrap interval
    over seeds × questions.

    ``scores`` and ``baseline`` are (seeds × questions) arrays of per-question scores (EM 0/1, or F1),
    row s of both from the same seed, column q of both from the same question. With
    D = scores − baseline (k seeds × n questions) the difference is the mean of D. One bootstrap
    replicate draws k rows (seeds) with replacement and, independently, n columns (questions) with
    replacement, the same draws for both recipes (that is the pairing), and takes the mean of D over
    the drawn rows × columns, counted with multiplicity. The interval is the (1 − confidence)/2 and
    (1 + confidence)/2 quantiles of ``n_boot`` replicates (numpy's default linear interpolation).
    The seed draws and the question draws come from two generators spawned from
    ``numpy.random.SeedSequence(seed)``: the same inputs always give the same interval.
    ``chunk`` replicates are drawn at a time (memory only: any chunk gives the same draws).

    Returns ``{"diff", "low", "high", "confidence", "n_boot", "seed", "n_seeds", "n_questions"}``.
    With one seed only questions are resampled; with few seeds the interval is on the narrow side
    (a bootstrap over k values sees (k − 1)/k of their variance).
    """
    a, b = np.asarray(scores, dtype=np.float64), np.asarray(baseline, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 2 or a.size == 0:
        raise ValueError(f"paired_bootstrap needs two equal (seeds × questions) arrays, got {a.shape} and {b.shape}")
    if not 0 < confidence < 1 or n_boot < 1:
        raise ValueError("confidence must be in (0, 1) and n_boot at least 1")
    d = a - b
    k, n = d.shape
    seed_rng, question_rng = (np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(2))
    replicates = np.empty(n_boot)
    for start in range(0, n_boot, chunk):
        m = min(chunk, n_boot - start)
        seed_counts = seed_rng.multinomial(k, np.full(k, 1 / k), size=m).astype(np.float64)
        question_counts = question_rng.multinomial(n, np.full(n, 1 / n), size=m).astype(np.float64)
        replicates[start:start + m] = ((seed_counts @ d) * question_counts).sum(axis=1) / (k * n)
    low, high = np.quantile(replicates, [(1 - confidence) / 2, (1 + confidence) / 2])
    return {"diff": float(d.mean()), "low": float(low), "high": float(high), "confidence": confidence,
            "n_boot": n_boot, "seed": seed, "n_seeds": k, "n_questions": n}


def summarize_runs(runs: list[dict], baseline: str | None = None, n_boot: int = 5000, confidence: float = 0.95,
                   seed: int = 0) -> dict:
    """Per row (``run["recipe"]``, in order of first appearance): ``spread`` over its seeds of EM, F1,
    decoding-oracle EM, empty answers and training minutes, and, for EM and F1, ``paired_bootstrap``
    against the ``baseline`` row (default: the first row; a decoding variant's runs: the row in their
    ``paired_with``) over the seeds both rows have (none while that row has no run yet: a benchmark
    in progress); a variant's ``added_inference_minutes`` too. A run is a
    dict with ``recipe``, ``seed``, ``em``, ``f1``, ``oracle_em``, ``empty_answers``, ``train_minutes``
    and ``per_question`` (``{"em": [...], "f1": [...]}``, the same questions in the same order in
    every run)."""
    rows = list(dict.fromkeys(r["recipe"] for r in runs))
    if not rows:
        return {"baseline": baseline, "rows": {}}
    baseline = baseline or rows[0]
    by_row = {row: {r["seed"]: r for r in runs if r["recipe"] == row} for row in rows}
    out = {"baseline": baseline, "confidence": confidence, "n_boot": n_boot, "bootstrap_seed": seed, "rows": {}}
    for row in rows:
        seeds = sorted(by_row[row])
        mine = [by_row[row][s] for s in seeds]
        entry = {"seeds": seeds}
        for key in ("em", "f1", "oracle_em", "empty_answers", "train_minutes", "added_inference_minutes",
                    "beyond_length_limit"):
            if key in mine[0]:
                entry[key] = spread([r[key] for r in mine])
        base = mine[0].get("paired_with", baseline)
        shared = [s for s in seeds if s in by_row.get(base, {})]
        if shared:
            entry["vs_baseline"] = {metric: paired_bootstrap(
                [by_row[row][s]["per_question"][metric] for s in shared],
                [by_row[base][s]["per_question"][metric] for s in shared], n_boot, confidence, seed)
                for metric in ("em", "f1")}
            entry["vs_baseline"].update(seeds=shared, row=base)
        out["rows"][row] = entry
    return out


def _mean_sd(s: dict, digits: int = 4) -> str:
    return f"{s['mean']:.{digits}f}" + ("" if math.isnan(s["sd"]) else f" ± {s['sd']:.{digits}f}")


def _range(s: dict, digits: int = 3) -> str:
    return f"{s['min']:.{digits}f}–{s['max']:.{digits}f}"


def _diff(d: dict | None, is_baseline: bool, against: str = "") -> str:
    if is_baseline:
        return "(baseline)"
    if d is None:
        return "—"
    return f"{d['diff']:+.4f} [{d['low']:+.4f}, {d['high']:+.4f}]" + (f" vs {against}" if against else "")


def markdown_tables(summary: dict, runs: list[dict]) -> str:
    """The summary table (one line per row: mean ± sd over seeds, range, paired difference to the
    baseline with its interval) and the per-run table, in markdown."""
    conf = round(100 * summary.get("confidence", 0.95))
    lines = [f"| recipe | seeds | dev EM (mean ± sd) | EM range | dev F1 (mean ± sd) | F1 range "
             f"| ΔEM vs {summary['baseline']} [{conf}% CI] | ΔF1 [{conf}% CI] | decoding-oracle EM "
             f"| empty answers (mean) | training windows | training min (mean) | added inference min (mean) "
             f"| training answers beyond max_answer_length |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    windows = {r["recipe"]: r.get("train_windows", "") for r in runs}
    for row, e in summary["rows"].items():
        vs, base = e.get("vs_baseline", {}), row == summary["baseline"]
        against = "" if vs.get("row", summary["baseline"]) == summary["baseline"] else vs["row"]
        minutes = e.get("added_inference_minutes", {}).get("mean")
        # NaN: no evaluation of the run ever ran its model to time its windows
        added = "" if minutes is None else "—" if math.isnan(minutes) else f"{minutes:+.2f}"
        beyond = f"{e['beyond_length_limit']['mean']:.2%}" if "beyond_length_limit" in e else ""
        lines.append(f"| {row} | {len(e['seeds'])} | {_mean_sd(e['em'])} | {_range(e['em'])} | {_mean_sd(e['f1'])} "
                     f"| {_range(e['f1'])} | {_diff(vs.get('em'), base, against)} | {_diff(vs.get('f1'), base)} "
                     f"| {_mean_sd(e['oracle_em'], 3)} | {e['empty_answers']['mean']:g} | {windows[row]} "
                     f"| {e['train_minutes']['mean']:.1f} | {added} | {beyond} |")
    lines += ["", "| recipe | seed | dev EM | dev F1 | decoding-oracle EM | empty answers | training min | eval min |",
              "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in sorted(runs, key=lambda r: (list(summary["rows"]).index(r["recipe"]), r["seed"])):
        lines.append(f"| {r['recipe']} | {r['seed']} | {r['em']:.4f} | {r['f1']:.4f} | {r['oracle_em']:.4f} "
                     f"| {r['empty_answers']} | {r['train_minutes']:.1f} | {r['eval_minutes']:.1f} |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- decoding and evaluation

def sample_decode(enc, windows, logits, tokenizer) -> list[str]:
    """What the course sample's ``evaluate()`` does: per window the argmax of start and the argmax of
    end over the *whole* window, independently; the window with the highest sum wins; the answer is
    ``tokenizer.decode`` of the tokens between them with spaces removed (empty if end < start)."""
    best = {}
    for wi, (qi, (start, end)) in enumerate(zip(windows.question_index.tolist(), logits)):
        s, e = int(np.argmax(start)), int(np.argmax(end))
        prob = float(start[s] + end[e])
        if qi not in best or prob > best[qi][0]:
            best[qi] = (prob, wi, s, e)
    answers = []
    for qi in range(len(enc.data.questions)):
        _, wi, s, e = best[qi]
        input_ids = windows.ids[windows.first[wi]:windows.first[wi] + windows.length[wi]].tolist()
        answers.append(tokenizer.decode(input_ids[s:e + 1]).replace(" ", ""))
    return answers


def split_recipes(text: str) -> list[str]:
    """``--recipes``: names separated by commas, where a comma followed by a digit continues a value
    (``"project,project+tta_strides=64,96"`` → ``["project", "project+tta_strides=64,96"]``)."""
    return [item for item in re.split(r",(?=[^\d])", text) if item]


def eval_device(choice: str = "auto"):
    import torch
    if choice == "auto":
        choice = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(choice)


def evaluate(cfg, model_dir, dev, sample_decoding=False, model=None, device="auto"):
    """Dev EM/F1 (and per question), decoding-oracle EM and empty answers of the model in ``model_dir``
    with ``cfg``'s windows and decoding, through ``hw7qa.inference`` as ``hw7qa evaluate`` runs it,
    its forward passes on ``device`` (``auto``: the GPU if there is one). ``model``: the already
    loaded model of ``model_dir`` (moved to ``device`` here)."""
    from hw7qa.decode import oracle_logits
    from hw7qa.inference import Reader, stride_logits
    from hw7qa.models import load_model, load_tokenizer
    tokenizer = load_tokenizer(model_dir, cfg.isolate_digits, cfg.isolate_cjk)
    model = (model if model is not None else load_model(str(model_dir))).to(eval_device(device))
    # the run's logits cache: a variant (or --reuse) decodes these windows again without the model
    members = stride_logits(Reader(cfg, tokenizer, model, run_dir=Path(model_dir).parent), dev, desc="dev")
    if sample_decoding:
        enc, windows, _ = members[0]
        return scored(dev, sample_decode(*members[0], tokenizer),
                      sample_decode(enc, windows, oracle_logits(enc, windows), tokenizer), members)
    return decoded(dev, members, cfg.decoding)


def decoded(dev, members: list[tuple], spec) -> dict:
    """``scored`` answers of the window logits ``members`` (one ``(enc, windows, logits)`` per
    inference stride, voted) decoded with ``spec``; the oracle decodes the first member's windows."""
    from hw7qa.decode import decode_predictions, oracle_logits, vote_predictions
    enc, windows, _ = members[0]
    return scored(dev, [p.answer for p in vote_predictions(members, spec)],
                  [p.answer for p in decode_predictions(enc, windows, oracle_logits(enc, windows), spec)], members)


def scored(dev, predicted: list[str], oracle: list[str], members: list[tuple]) -> dict:
    """EM and F1 of ``predicted`` against ``dev``'s answers (mean and per question), oracle EM, empty
    answers, and the windows of ``members`` (one ``(enc, windows, logits)`` per inference stride)."""
    gold = [q.answer_text for q in dev.questions]
    em = [exact_match(p, g) for p, g in zip(predicted, gold)]
    f1 = [char_f1(p, g) for p, g in zip(predicted, gold)]
    return {"em": float(np.mean(em)), "f1": float(np.mean(f1)),
            "oracle_em": float(np.mean([exact_match(p, g) for p, g in zip(oracle, gold)])),
            "empty_answers": sum(not a for a in predicted), "eval_windows": sum(len(m[1]) for m in members),
            "per_question": {"em": [int(x) for x in em], "f1": f1, "answer": predicted}}


# ---------------------------------------------------------------- decoding variants

def variant_config(cfg: Config, variant: str) -> Config:
    """``cfg`` with a decoding variant's ``key=value`` settings (joined by ``+``) applied; a
    ValueError naming a setting that is unknown, has a bad value or is no decoding setting. A
    ``max_answer_length`` given without ``answer_length_quantile`` turns the quantile off."""
    settings = variant.split("+")
    changed, keys = apply_overrides(cfg, settings), [item.split("=", 1)[0] for item in settings]
    # random and center training windows are placed around the answer, not on the doc_stride grid
    free = DECODING + (("doc_stride",) if cfg.train_windows != "all" else ())
    for key in keys:
        if key not in free:
            effect = "changes no answer" if key in FREE_ON_RESUME else "would change training"
            raise ValueError(f"variant {variant!r}: {key} {effect}; a variant only decodes the trained runs "
                             f"again and may change {', '.join(free)}")
    if "max_answer_length" in keys and "answer_length_quantile" not in keys:
        changed = dataclasses.replace(changed, answer_length_quantile=0.0)
    return changed


def variant_results(task: dict, own: dict, dev, tokenizer, train_enc) -> list[dict]:
    """One result per ``task["variants"]`` (``(row, config)``), decoded from the run's window logits
    as ``hw7qa.inference.stride_logits`` caches them (the run's own windows first: computed once, then read
    back); paired with ``own``, the result of the run's own decoding, whose ``seconds_per_window``
    prices the windows a variant adds."""
    from hw7qa.inference import Reader, stride_logits
    from hw7qa.windows import encode
    run_dir, enc = Path(own["run_dir"]), encode(dev, tokenizer, task["cfg"].windows)   # variants keep all but doc_stride

    def logits(cfg):       # the model is loaded only for windows not cached yet
        return stride_logits(Reader(cfg, tokenizer, run_dir=run_dir), dev, enc=enc, desc="dev")
    own_windows = sum(len(windows) for _, windows, _ in logits(task["cfg"]))
    results = []
    for name, cfg in task["variants"]:
        started, cfg = time.time(), with_answer_length(cfg, train_enc)
        result = decoded(dev, logits(cfg), cfg.decoding)
        added = result["eval_windows"] - own_windows
        results.append({**own, **result, "recipe": name, "paired_with": own["recipe"], "added_windows": added,
                        "added_inference_minutes": added * own["seconds_per_window"] / 60,
                        "beyond_length_limit": beyond_length_limit(train_enc, cfg.max_answer_length),
                        "eval_minutes": (time.time() - started) / 60, "config": dataclasses.asdict(cfg)})
        print(f"{name} seed {own['seed']}: EM {result['em']:.4f} F1 {result['f1']:.4f} "
              f"(own decoding: EM {own['em']:.4f}); windows {added:+d}", flush=True)
    return results


# ---------------------------------------------------------------- runs

def logits_cached(run_dir: Path, dev, cfg: Config) -> bool:
    """Whether the run's logits cache holds ``dev``'s logits at every inference stride of ``cfg``."""
    from hw7qa.inference import logits_path
    return all(logits_path(run_dir, dev, cfg, stride).exists() for stride in cfg.inference_strides)


def inference_rate(run_dir: Path, device: str, measured: float | None) -> float:
    """Seconds per window of the run's inference on ``device``: ``measured`` (an evaluation that ran the
    model), saved into the run folder, else the one saved there by an earlier one; NaN if none was."""
    path = run_dir / RATE
    saved = json.loads(path.read_text()) if path.is_file() else {}
    if measured is not None:
        path.write_text(json.dumps({**saved, device: measured}))
        return measured
    return saved.get(device, math.nan)


def with_answer_length(cfg: Config, train_enc) -> Config:
    """``cfg`` with ``max_answer_length`` taken from the training answers (``train_enc``, the training
    file tokenized) when ``answer_length_quantile`` asks for it, as ``train`` does."""
    from hw7qa.techniques import answer_length_from
    if not cfg.answer_length_quantile:
        return cfg
    return dataclasses.replace(cfg, max_answer_length=answer_length_from(train_enc.answer_tokens,
                                                                         cfg.answer_length_quantile))


def beyond_length_limit(train_enc, max_answer_length: int) -> float:
    """The share of the training answers (``train_enc``, the training file tokenized) longer than
    ``max_answer_length`` tokens: answers that a decoding with that limit can never produce."""
    lengths = [last - first + 1 for first, last in filter(None, train_enc.answer_tokens)]
    return sum(n > max_answer_length for n in lengths) / max(len(lengths), 1)


def differing_settings(saved: Config, wanted: Config, free: tuple = ()) -> list[str]:
    """The settings (other than ``FREE_ON_RESUME`` and ``free``) in which a run folder's config differs
    from ``wanted``."""
    if wanted.answer_length_quantile:       # train() saved the max_answer_length it took from the answers
        wanted = dataclasses.replace(wanted, max_answer_length=saved.max_answer_length)
    return [f"{f.name}={getattr(saved, f.name)!r} (benchmark: {getattr(wanted, f.name)!r})"
            for f in dataclasses.fields(Config) if f.name not in FREE_ON_RESUME + free
            and getattr(saved, f.name) != getattr(wanted, f.name)]


def run_finished(run_dir: Path, cfg: Config) -> bool:
    """Whether ``train()`` finished in ``run_dir``: the benchmark's marker, or (runs of other tools)
    a model/ and a checkpoint at the end of the last epoch."""
    if (run_dir / FINISHED).is_file():
        return True
    from hw7qa.runfolder import list_checkpoints, read_trainer_state
    checkpoints = list_checkpoints(run_dir)
    return (run_dir / "model").is_dir() and bool(checkpoints) and \
        read_trainer_state(checkpoints[-1]).epoch >= cfg.epochs


def plan_run(cfg: Config, reuse: bool, overwrite: bool) -> str:
    """What to do with ``cfg.output_dir``: ``train``, ``overwrite``, ``reuse`` or ``resume``; a
    ValueError saying why neither is allowed. A finished run is reused also where only decoding settings
    (``DECODING``) differ."""
    run_dir = Path(cfg.output_dir)
    if not (run_dir / "config.json").is_file():
        if run_dir.is_dir() and any(run_dir.iterdir()):
            raise ValueError(f"{run_dir} is not empty and holds no run: empty it or choose another --runs")
        return "train"
    if reuse:
        saved, finished = load_config(run_dir / "config.json"), run_finished(run_dir, cfg)
        changed = differing_settings(saved, cfg)
        # decoding settings took no part in a benchmark run's training (it evaluates no dev file): a finished
        # run's logits are decoded with the benchmark's as well as with its own
        if finished and changed and not differing_settings(saved, cfg, free=DECODING):
            print(f"{run_dir}: reused; its logits are decoded with the benchmark's {'; '.join(changed)}", flush=True)
            return "reuse"
        if not changed:
            return "reuse" if finished else "resume"
        if not overwrite:
            raise ValueError(f"{run_dir} holds a run with other settings ({'; '.join(changed)}): --overwrite "
                             f"retrains it, or choose another --runs")
    if overwrite:
        return "overwrite"
    raise ValueError(f"{run_dir} already holds a run: --reuse evaluates it again, --overwrite retrains it, "
                     f"or choose another --runs")


def seed_everything(seed: int) -> None:
    """python's, numpy's and torch's global RNGs (CPU and every GPU) from ``seed``."""
    import torch
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def run_task(task: dict) -> list[dict]:
    """Train (or reuse) one (recipe, seed) and evaluate it with each of its decodings, then its decoding
    variants; one result per decoding and variant. Runs in this process or in a worker process
    (``--jobs``): everything it needs is in ``task``."""
    from hw7qa.models import load_run_model, run_tokenizer
    from hw7qa.train import train
    from hw7qa.windows import encode, train_windows
    cfg: Config = task["cfg"]
    run_dir, action = Path(cfg.output_dir), task["action"]
    marker = run_dir / FINISHED
    if action == "reuse":
        minutes = json.loads(marker.read_text())["minutes"] if marker.exists() else math.nan
        print(f"{task['recipe']} seed {cfg.seed}: reusing the model trained in {run_dir}", flush=True)
    else:
        seed_everything(cfg.seed)
        started = time.time()
        run_dir = train(cfg, resume=action == "resume", overwrite=action == "overwrite")
        minutes = (time.time() - started) / 60
        marker.write_text(json.dumps({"minutes": minutes, "resumed": action == "resume"}))
    dev = load_qa_file(task["dev"], need_answers=True)
    if task["dev_limit"]:
        dev = QAData(dev.path, dev.questions[:task["dev_limit"]], dev.paragraphs)
    tokenizer = run_tokenizer(run_dir, cfg)                  # the run's own files, checked (a reused run may be damaged)
    train_enc = encode(load_qa_file(cfg.train_file), tokenizer, cfg.windows)
    n_windows = len(train_windows(train_enc, cfg.train_windows, random.Random(0)))
    model = load_run_model(run_dir)
    results = []
    for name, eval_cfg, sample_decoding in task["decodings"]:
        started, eval_cfg = time.time(), with_answer_length(eval_cfg, train_enc)
        cached = logits_cached(run_dir, dev, eval_cfg)
        result = evaluate(eval_cfg, run_dir / "model", dev, sample_decoding, model=model, device=task["device"])
        rate = inference_rate(run_dir, str(eval_device(task["device"])),
                              None if cached else (time.time() - started) / result["eval_windows"])
        results.append({"recipe": name, "trained_as": task["recipe"], "seed": cfg.seed, "run_dir": str(run_dir),
                        "train_windows": n_windows, "train_minutes": minutes, "seconds_per_window": rate,
                        "eval_minutes": (time.time() - started) / 60, "eval_device": str(eval_device(task["device"])),
                        "beyond_length_limit": beyond_length_limit(train_enc, eval_cfg.max_answer_length), **result, "dev_questions": len(dev.questions), "config": dataclasses.asdict(eval_cfg)})
        print(f"{name} seed {cfg.seed}: EM {result['em']:.4f} F1 {result['f1']:.4f} oracle EM "
              f"{result['oracle_em']:.4f} empty {result['empty_answers']}", flush=True)
    del model
    gc.collect()
    import torch
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return results + (variant_results(task, results[0], dev, tokenizer, train_enc) if task["variants"] else [])


def subset_file(path: str, limit: int, folder: Path) -> str:
    """The first ``limit`` questions of the QA file at ``path`` (with the paragraphs they use), as an
    HW7 JSON file in ``folder``; its path. Written only if missing or different."""
    data = load_qa_file(path, need_answers=True)
    questions = data.questions[:limit]
    used = sorted({q.paragraph_id for q in questions})
    new_id = {old: new for new, old in enumerate(used)}
    raw = {"questions": [{"id": q.id, "paragraph_id": new_id[q.paragraph_id], "question_text": q.question_text,
                          "answer_text": q.answer_text, "answer_start": q.answer_start, "answer_end": q.answer_end}
                         for q in questions],
           "paragraphs": [data.paragraphs[i] for i in used]}
    text = json.dumps(raw, ensure_ascii=False) + "\n"
    out = folder / f"{Path(path).stem}-first{limit}.json"
    folder.mkdir(parents=True, exist_ok=True)
    if not out.is_file() or out.read_text(encoding="utf-8") != text:
        out.write_text(text, encoding="utf-8")
    return str(out)


def environment(device: str) -> dict:
    import accelerate
    import torch
    import transformers
    dev = eval_device(device)
    return {"date": datetime.date.today().isoformat(), "python": platform.python_version(),
            "torch": torch.__version__, "transformers": transformers.__version__, "accelerate": accelerate.__version__,
            "cpu_cores": os.cpu_count(), "platform": platform.platform(),
            "gpu": torch.cuda.get_device_name(0) if dev.type == "cuda" else None,
            "gpu_driver": gpu_driver() if dev.type == "cuda" else None,
            "cuda": torch.version.cuda if dev.type == "cuda" else None,
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS")}


def gpu_driver() -> str | None:
    """The NVIDIA driver's version as ``nvidia-smi`` reports it; None where it cannot be asked."""
    import subprocess
    try:
        done = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip().splitlines()[0] if done.returncode == 0 and done.stdout.strip() else None


def write_results(out: Path, setup: dict, question_ids: list, runs: list[dict], summary: dict) -> str:
    """``out`` (JSON: setup, the dev question ids in the order of every run's per-question lists,
    summary, then one line per run) and ``out`` with ``.md`` (the tables); the markdown."""
    def clean(x):       # NaN (the sd of one seed) is no JSON
        if isinstance(x, float) and math.isnan(x):
            return None
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items()}
        if isinstance(x, list):
            return [clean(v) for v in x]
        return x
    body = ",\n".join(json.dumps(clean(r), ensure_ascii=False) for r in runs)
    with atomic_write(out, encoding="utf-8") as f:      # a benchmark killed at its time limit keeps the last file
        f.write("{\n" + f'"setup": {json.dumps(clean(setup), ensure_ascii=False, indent=1)},\n'
                f'"question_ids": {json.dumps(question_ids, ensure_ascii=False)},\n'
                f'"summary": {json.dumps(clean(summary), ensure_ascii=False, indent=1)},\n'
                f'"runs": [\n{body}\n]\n}}\n')
    env = setup["environment"]
    limit = f" (first {setup['train_limit']} questions)" if setup.get("train_limit") else ""
    driver = f", driver {env['gpu_driver']}, CUDA {env['cuda']}" if env.get("gpu_driver") else ""
    header = (f"model {setup['model']}; train {setup['train']}{limit}; dev {setup['dev']} ({setup['dev_questions']} "
              f"questions); epochs {setup['epochs']}; seeds {','.join(map(str, setup['seeds']))}; device "
              f"{env['gpu'] or 'CPU'}{driver} ({env['cpu_cores']} cores); torch {env['torch']}, transformers "
              f"{env['transformers']}, accelerate {env['accelerate']}; {env['date']}\n\n"
              f"`{setup['command']}`\n\n" + (f"Summary recomputed from the saved runs: `{setup['summarized_by']}`\n\n"
                                               if setup.get("summarized_by") else "")
              + (f"Not run: {'; '.join(setup['not_run'])}\n\n" if setup.get("not_run") else ""))
    tables = markdown_tables(summary, runs)
    with atomic_write(out.with_suffix(".md"), encoding="utf-8") as f:
        f.write(header + tables)
    return header + tables


def summarize_file(path: Path, baseline: str, n_boot: int, confidence: float) -> None:
    """Recompute the summary and the tables of a saved result file from its runs' per-question scores."""
    saved = json.loads(path.read_text(encoding="utf-8"))
    setup, runs = saved["setup"], saved["runs"]
    question_ids = saved.get("question_ids", setup.pop("question_ids", None))
    rows = list(dict.fromkeys(r["recipe"] for r in runs))
    if baseline and baseline not in rows:
        sys.exit(f"--baseline {baseline!r} is none of the rows: {', '.join(rows)}")
    for r in runs:          # null in JSON: no training time recorded
        r["train_minutes"] = math.nan if r["train_minutes"] is None else r["train_minutes"]
    setup["summarized_by"] = "python " + " ".join(sys.argv)
    summary = summarize_runs(runs, baseline or setup.get("rows", rows)[0], n_boot, confidence)
    print(write_results(path, setup, question_ids, runs, summary))
    print(f"rewritten: {path} and {path.with_suffix('.md')}")


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=os.environ.get("HW7QA_STAND_IN", str(STAND_IN)))
    parser.add_argument("--train", default=str(SHARED / "data/drcd/DRCD_test.json"))
    parser.add_argument("--train-limit", type=int, default=0, help="first N training questions only (0: all)")
    parser.add_argument("--dev", default=str(SHARED / "data/hw7-2021/hw7_dev.json"))
    parser.add_argument("--dev-limit", type=int, default=0, help="first N dev questions only (0: all)")
    parser.add_argument("--recipes", default="sample,project")
    parser.add_argument("--baseline", default="", help="the row the others are compared with (default: the first)")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seeds", default="", help="e.g. 0,1,2 or 0-4 (default: --seed)")
    parser.add_argument("--seed", type=int, default=0, help="the one seed when --seeds is not given")
    parser.add_argument("--runs", default=str(ROOT / "outputs" / "bench-accuracy"), help="run folders")
    parser.add_argument("--out", default=str(ROOT / "bench" / "accuracy.json"), help="JSON; the tables go beside it (.md)")
    parser.add_argument("--set", nargs="*", action="extend", default=[], metavar="KEY=VALUE", help="overrides for every recipe")
    parser.add_argument("--variants", nargs="+", default=[], metavar="KEY=VALUE[+KEY=VALUE]",
                        help="decode every run (but sample's) again with each of these settings, a row each, paired "
                        f"with the run's own decoding; no training (settings: {', '.join(DECODING)}, doc_stride)")
    parser.add_argument("--reuse", action="store_true", help="evaluate models already trained in --runs")
    parser.add_argument("--overwrite", action="store_true", help="retrain runs whose folders hold another run")
    parser.add_argument("--jobs", type=int, default=1, help="runs at once, each in its own process (1: in this one)")
    parser.add_argument("--budget-min", type=float, default=0, help="start no run that would end more than this "
                        "many minutes after the start, a run taking as long as the longest so far (0: no limit)")
    parser.add_argument("--run-estimate-min", type=float, default=2.0, help="what --budget-min assumes a run takes "
                        "before the first has finished")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="for evaluation")
    parser.add_argument("--n-boot", type=int, default=5000, help="bootstrap replicates")
    parser.add_argument("--confidence", type=float, default=0.95)
    parser.add_argument("--summarize", metavar="JSON", help="train nothing: recompute the summary and tables of a "
                        "saved result file (e.g. with another --baseline, --n-boot or --confidence), rewriting it")
    return parser


def checked_seeds(args) -> list[int]:
    """The seeds of ``args``; SystemExit with one sentence for arguments that cannot work."""
    try:
        seeds = parse_seeds(args.seeds) if args.seeds else [args.seed]
    except ValueError as e:
        sys.exit(str(e))
    reserved = [item for item in args.set if item.split("=", 1)[0] in ("seed", "output_dir")]
    if reserved:
        sys.exit(f"--set {reserved[0]}: the benchmark sets seed (--seeds) and output_dir (--runs) itself")
    if not Path(args.model).exists() and args.model == str(STAND_IN):
        sys.exit(f"no model at {args.model}: build the stand-in with ../shared/tools/stand-in-model/build")
    return seeds


def plan_tasks(args, seeds: list[int], train_file: str) -> list[dict]:
    """One task per (seed, recipe), seed by seed (a cut-off benchmark still has pairs), each with its
    config, what to do with its run folder and its decodings; SystemExit naming every task that
    cannot start, before anything is trained."""
    project_cfg = load_config(ROOT / "configs" / "small-model.json")
    tasks, problems = [], []
    for seed in seeds:
        for recipe in split_recipes(args.recipes):
            preset, *knobs = recipe.split("+")
            common = {"model_name": args.model, "train_file": train_file, "dev_file": "", "test_file": "",
                      "epochs": args.epochs, "seed": seed, "output_dir": f"{args.runs}/{recipe}-seed{seed}"}
            if preset == "sample":
                common["batch_size"] = args.batch_size
            try:
                cfg = load_config(ROOT / "configs" / f"{PRESETS.get(preset, preset)}.json",
                                  [f"{k}={v}" for k, v in common.items()] + args.set + knobs)
                action = plan_run(cfg, args.reuse, args.overwrite)
                variants = [] if preset == "sample" else [(f"{recipe}@{v}", variant_config(cfg, v))
                                                          for v in args.variants]
            except (ValueError, FileNotFoundError) as e:
                problems.append(f"{recipe} seed {seed}: {e}")
                continue
            decodings = [(recipe, cfg, recipe == "sample")]
            if recipe == "sample":   # the same model, decoded the project's way with the project's windows
                decodings.append(("sample+project-decoding", dataclasses.replace(
                    project_cfg, isolate_cjk=cfg.isolate_cjk, isolate_digits=cfg.isolate_digits), False))
            tasks.append({"recipe": recipe, "cfg": cfg, "action": action, "decodings": decodings, "variants": variants,
                          "dev": args.dev, "dev_limit": args.dev_limit, "device": args.device})
    if problems:
        sys.exit("nothing was trained:\n  " + "\n  ".join(problems))
    return tasks


class Budget:
    """Whether another run may start: only if it would end within ``minutes`` of the benchmark's
    start (0: always), a run being assumed to take as long as the longest so far (``first_guess``
    minutes before any has finished). Runs already going are never stopped."""

    def __init__(self, minutes: float, first_guess: float, clock=time.monotonic):
        self.minutes, self.longest, self.clock = minutes, first_guess * 60, clock
        self.started = clock()
        self.measured = False

    def allows(self) -> bool:
        return not self.minutes or self.clock() - self.started + self.longest <= self.minutes * 60

    def took(self, seconds: float) -> None:
        self.longest = seconds if not self.measured else max(self.longest, seconds)
        self.measured = True


def run_tasks(tasks: list, jobs: int, collect, budget: Budget | None = None, work=None) -> list:
    """``work(task)`` (default ``run_task``) for each task while ``budget`` allows, each result to
    ``collect`` as soon as it is there (a benchmark killed at a time limit keeps every finished run).
    ``jobs`` > 1: that many at once, each in a fresh process. Returns the tasks never started."""
    work, budget, pending = work or run_task, budget or Budget(0, 0), list(tasks)
    if jobs <= 1:
        while pending and budget.allows():
            started = budget.clock()
            result = work(pending.pop(0))
            budget.took(budget.clock() - started)
            collect(result)
        return pending
    import concurrent.futures
    import multiprocessing
    extra = {"max_tasks_per_child": 1} if sys.version_info >= (3, 11) else {}
    running: dict = {}                        # future → its start time
    with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"),
                                                **extra) as pool:
        while pending or running:
            while pending and len(running) < jobs and budget.allows():
                running[pool.submit(work, pending.pop(0))] = budget.clock()
            if not running:
                break
            done, _ = concurrent.futures.wait(running, return_when=concurrent.futures.FIRST_COMPLETED)
            for future in done:
                budget.took(budget.clock() - running.pop(future))
                collect(future.result())
    return pending


def run_benchmark(args, extra_setup: dict | None = None) -> tuple[str, list[dict]]:
    """Train and evaluate every (recipe, seed) of ``args`` (``parser()``'s), writing ``args.out`` and
    its tables after each; the tables in markdown, and the tasks left out by ``--budget-min``."""
    seeds = checked_seeds(args)
    train_file = subset_file(args.train, args.train_limit, Path(args.runs)) if args.train_limit else args.train
    dev = load_qa_file(args.dev, need_answers=True)
    n_dev = min(args.dev_limit, len(dev.questions)) if args.dev_limit else len(dev.questions)
    tasks = plan_tasks(args, seeds, train_file)
    rows = list(dict.fromkeys(row[0] for t in tasks for row in t["decodings"] + t["variants"]))
    if args.baseline and args.baseline not in rows:
        sys.exit(f"--baseline {args.baseline!r} is none of the rows: {', '.join(rows)}")
    baseline = args.baseline or rows[0]
    setup = {"command": "python " + " ".join(sys.argv), "model": args.model, "train": args.train,
             "train_limit": args.train_limit, "train_file_used": train_file, "dev": args.dev,
             "dev_questions": n_dev, "epochs": args.epochs, "seeds": seeds, "recipes": split_recipes(args.recipes),
             "rows": rows, "set": args.set, "environment": environment(args.device), **(extra_setup or {})}
    out, question_ids, runs = Path(args.out), [q.id for q in dev.questions[:n_dev]], []

    def collect(results: list[dict]) -> str:
        runs.extend(results)
        runs.sort(key=lambda r: (rows.index(r["recipe"]), r["seed"]))     # rows in the planned order
        return write_results(out, setup, question_ids, runs, summarize_runs(runs, baseline, args.n_boot,
                                                                            args.confidence))

    left = run_tasks(tasks, args.jobs, collect, Budget(args.budget_min, args.run_estimate_min))
    if left:
        setup["not_run"] = [f"{t['recipe']} seed {t['cfg'].seed} (it would have ended after --budget-min "
                            f"{args.budget_min:g})" for t in left]
    return collect([]), left


def main() -> None:
    args = parser().parse_args()
    if args.summarize:
        summarize_file(Path(args.summarize), args.baseline, args.n_boot, args.confidence)
        return
    markdown, _ = run_benchmark(args)
    print("\n" + markdown)
    print(f"written: {args.out} and {Path(args.out).with_suffix('.md')}")

if __name__ == "__main__":
    main()

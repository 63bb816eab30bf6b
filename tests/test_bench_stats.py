"""The statistics of bench/accuracy.py: spread over seeds and the paired bootstrap over seeds × questions."""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hw7qa.config import load_config

PATH = Path(__file__).resolve().parent.parent / "bench" / "accuracy.py"
spec = importlib.util.spec_from_file_location("bench_accuracy", PATH)
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)


def bernoulli(p, seeds, questions, seed):
    return (np.random.default_rng(seed).random((seeds, questions)) < p).astype(float)


# ---------------------------------------------------------------- parse_seeds

def test_parse_seeds_lists_and_ranges():
    assert bench.parse_seeds("0,1,2") == [0, 1, 2]
    assert bench.parse_seeds("0-4") == [0, 1, 2, 3, 4]
    assert bench.parse_seeds("3, 0-1,7") == [3, 0, 1, 7]


@pytest.mark.parametrize("text", ["", "a", "0,0", "2-1", "0-1,1", "-1", "1,"])
def test_parse_seeds_refuses_bad_lists(text):
    with pytest.raises(ValueError):
        bench.parse_seeds(text)


# ---------------------------------------------------------------- spread

def test_spread_is_mean_sample_sd_and_range():
    s = bench.spread([0.30, 0.36, 0.33])
    assert s["n"] == 3
    assert s["mean"] == pytest.approx(0.33)
    assert s["sd"] == pytest.approx(0.03)          # √((0.03² + 0.03² + 0) / 2)
    assert (s["min"], s["max"]) == (0.30, 0.36)


def test_spread_of_one_value_has_no_sd():
    s = bench.spread([0.4])
    assert s["mean"] == 0.4 and math.isnan(s["sd"]) and s["min"] == s["max"] == 0.4


def test_spread_of_nothing_is_an_error():
    with pytest.raises(ValueError):
        bench.spread([])


# ---------------------------------------------------------------- paired_bootstrap

def test_known_difference_without_noise_gives_exactly_that_interval():
    baseline = np.random.default_rng(1).integers(0, 7, size=(3, 200)) / 8     # F1-like, exact in binary
    result = bench.paired_bootstrap(baseline + 0.125, baseline, n_boot=500)
    assert result["diff"] == result["low"] == result["high"] == 0.125
    assert (result["n_seeds"], result["n_questions"]) == (3, 200)


def test_identical_recipes_give_zero():
    a = bernoulli(0.4, 3, 300, seed=2)
    result = bench.paired_bootstrap(a, a.copy(), n_boot=500)
    assert result["diff"] == result["low"] == result["high"] == 0.0


def test_recipes_of_equal_accuracy_give_an_interval_holding_zero():
    result = bench.paired_bootstrap(bernoulli(0.4, 3, 1000, seed=3), bernoulli(0.4, 3, 1000, seed=4), n_boot=2000)
    assert result["low"] < 0 < result["high"]


def test_a_real_difference_is_found():
    result = bench.paired_bootstrap(bernoulli(0.5, 3, 2000, seed=5), bernoulli(0.4, 3, 2000, seed=6), n_boot=2000)
    assert 0 < result["low"] < result["diff"] < result["high"]
    assert result["diff"] == pytest.approx(0.1, abs=0.02)


def test_the_interval_narrows_with_more_questions():
    def width(n):
        r = bench.paired_bootstrap(bernoulli(0.45, 3, n, seed=7), bernoulli(0.4, 3, n, seed=8), n_boot=2000)
        return r["high"] - r["low"]
    widths = [width(n) for n in (250, 1000, 4000)]
    assert widths[0] > widths[1] > widths[2] and widths[2] < widths[0] / 2.5


def test_seeds_are_resampled_too():
    """Per-seed offsets with no question noise: resampling questions alone would give a zero width."""
    offsets = np.array([[0.0], [0.125], [0.25]])
    result = bench.paired_bootstrap(np.zeros((3, 100)) + offsets, np.zeros((3, 100)), n_boot=2000)
    assert result["diff"] == 0.125
    assert 0.0 <= result["low"] < 0.125 < result["high"] <= 0.25


def test_the_same_inputs_give_the_same_interval_and_chunks_change_nothing():
    a, b = bernoulli(0.5, 3, 300, seed=9), bernoulli(0.45, 3, 300, seed=10)
    first = bench.paired_bootstrap(a, b, n_boot=1000)
    assert bench.paired_bootstrap(a, b, n_boot=1000) == first
    assert bench.paired_bootstrap(a, b, n_boot=1000, chunk=7) == first
    assert bench.paired_bootstrap(a, b, n_boot=1000, seed=1) != first


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 4), st.integers(1, 40), st.integers(0, 2 ** 16))
def test_swapping_the_recipes_mirrors_the_interval(k, n, seed):
    a, b = bernoulli(0.5, k, n, seed), bernoulli(0.5, k, n, seed + 1)
    forward, backward = bench.paired_bootstrap(a, b, n_boot=200), bench.paired_bootstrap(b, a, n_boot=200)
    assert backward["diff"] == pytest.approx(-forward["diff"], abs=1e-12)
    assert backward["low"] == pytest.approx(-forward["high"], abs=1e-12)
    assert backward["high"] == pytest.approx(-forward["low"], abs=1e-12)
    assert forward["low"] <= forward["high"]


def test_mismatched_shapes_are_an_error():
    with pytest.raises(ValueError):
        bench.paired_bootstrap(np.zeros((3, 10)), np.zeros((2, 10)))
    with pytest.raises(ValueError):
        bench.paired_bootstrap(np.zeros(10), np.zeros(10))


# ---------------------------------------------------------------- summarize_runs and the tables

def fake_runs():
    runs = []
    for seed in (0, 1, 2):
        for recipe, p in (("sample", 0.3), ("project", 0.45)):
            em = bernoulli(p, 1, 200, seed=10 * seed + len(recipe))[0]
            runs.append({"recipe": recipe, "seed": seed, "em": em.mean(), "f1": em.mean(), "oracle_em": 1.0,
                         "empty_answers": 0, "train_minutes": 1.0, "eval_minutes": 0.5, "train_windows": 200,
                         "per_question": {"em": em.tolist(), "f1": em.tolist()}})
    return runs


def test_summary_per_row_and_against_the_first_row():
    runs = fake_runs()
    summary = bench.summarize_runs(runs, n_boot=500)
    assert summary["baseline"] == "sample" and list(summary["rows"]) == ["sample", "project"]
    project = summary["rows"]["project"]
    assert project["seeds"] == [0, 1, 2]
    assert project["em"]["mean"] == pytest.approx(np.mean([r["em"] for r in runs if r["recipe"] == "project"]))
    diff = project["vs_baseline"]["em"]
    assert diff["diff"] == pytest.approx(project["em"]["mean"] - summary["rows"]["sample"]["em"]["mean"])
    assert diff["low"] > 0
    base = summary["rows"]["sample"]["vs_baseline"]["em"]
    assert base["diff"] == base["low"] == base["high"] == 0.0
    table = bench.markdown_tables(summary, runs)
    assert "| project | 3 |" in table and "(baseline)" in table and table.count("\n| sample | ") == 1 + 3   # summary + one per seed


def test_summary_pairs_only_the_seeds_both_rows_have():
    runs = [r for r in fake_runs() if not (r["recipe"] == "project" and r["seed"] == 2)]
    summary = bench.summarize_runs(runs, baseline="project", n_boot=100)
    assert summary["rows"]["sample"]["vs_baseline"]["seeds"] == [0, 1]
    assert summary["rows"]["sample"]["vs_baseline"]["em"]["n_seeds"] == 2


def test_summary_of_a_benchmark_whose_baseline_has_not_run_yet():
    runs = [r for r in fake_runs() if r["recipe"] == "sample"]
    summary = bench.summarize_runs(runs, baseline="project", n_boot=100)
    assert summary["baseline"] == "project" and "vs_baseline" not in summary["rows"]["sample"]
    assert "| sample | 3 |" in bench.markdown_tables(summary, runs)


# ---------------------------------------------------------------- recipes and a whole benchmark

def test_recipes_split_at_commas_that_start_a_name():
    assert bench.split_recipes("sample,project") == ["sample", "project"]
    assert bench.split_recipes("project,project+tta_strides=64,96,project+ema_decay=0.999") == \
        ["project", "project+tta_strides=64,96", "project+ema_decay=0.999"]


def test_a_benchmark_of_knobs_pairs_them_with_their_baseline_seed_by_seed(tmp_path):
    """The tiny demo model on the sample files: a recipe with knobs trains with them (its run folder's
    config says so), ``tta_strides`` votes more windows, and every row has every seed."""
    sample = PATH.parent.parent / "data" / "sample"
    out = tmp_path / "result.json"
    done = subprocess.run([sys.executable, str(PATH), "--model", "tiny-random-bert", "--train",
                           str(sample / "hw7_train.json"), "--dev", str(sample / "hw7_dev.json"), "--seeds", "0,1",
                           "--epochs", "2", "--recipes", "demo,demo+ema_decay=0.9+tta_strides=24,36",
                           "--runs", str(tmp_path / "runs"), "--out", str(out), "--n-boot", "200"],
                          capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text(encoding="utf-8"))
    rows = {(r["recipe"], r["seed"]): r for r in result["runs"]}
    assert set(rows) == {(name, seed) for name in ("demo", "demo+ema_decay=0.9+tta_strides=24,36") for seed in (0, 1)}
    knobs = load_config(tmp_path / "runs" / "demo+ema_decay=0.9+tta_strides=24,36-seed1" / "config.json")
    assert (knobs.ema_decay, knobs.tta_strides, knobs.seed) == (0.9, "24,36", 1)
    assert load_config(tmp_path / "runs" / "demo-seed1" / "config.json").ema_decay == 0.0
    voted, plain = rows[("demo+ema_decay=0.9+tta_strides=24,36", 0)], rows[("demo", 0)]
    assert voted["eval_windows"] > 3 * plain["eval_windows"]          # strides 48 + 24 + 36 against 48 alone
    assert "demo+ema_decay=0.9+tta_strides=24,36" in out.with_suffix(".md").read_text(encoding="utf-8")


# ---------------------------------------------------------------- --budget-min and --jobs

class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_the_budget_starts_a_run_only_if_it_would_end_in_time_by_the_longest_run_so_far():
    clock = FakeClock()
    budget = bench.Budget(minutes=1, first_guess=0.5, clock=clock)
    assert budget.allows()                      # 0 + 30 s ≤ 60 s
    clock.now = 31
    assert not budget.allows()                  # 31 + 30 > 60
    budget.took(10)                             # measured: shorter than the guess
    assert budget.allows()
    budget.took(5)                              # the longest so far counts
    clock.now = 51
    assert not budget.allows()
    assert bench.Budget(0, 100, clock).allows()  # no budget: always


def test_run_tasks_stops_starting_runs_when_the_budget_is_spent_and_returns_the_rest():
    clock, collected = FakeClock(), []

    def work(task):
        clock.now += 40
        return task * 10
    left = bench.run_tasks([1, 2, 3], 1, collected.append, bench.Budget(1, 0.5, clock), work=work)
    assert collected == [10] and left == [2, 3]             # after 40 s, another 40 s would end at 80 > 60


def test_run_tasks_in_processes_collects_every_result():
    collected = []
    tasks = [{"a": 1}, {"a": 1, "b": 2, "c": 3}, {}, {"x": 0, "y": 0}]
    assert bench.run_tasks(tasks, 2, collected.append, work=len) == []
    assert sorted(collected) == [0, 1, 2, 3]


# ---------------------------------------------------------------- decoding variants (--variants)

def demo_benchmark(tmp_path, *extra):
    sample = PATH.parent.parent / "data" / "sample"
    return bench.parser().parse_args(["--model", "tiny-random-bert", "--train", str(sample / "hw7_train.json"),
                                      "--dev", str(sample / "hw7_dev.json"), "--seeds", "0", "--epochs", "2",
                                      "--runs", str(tmp_path / "runs"), "--out", str(tmp_path / "result.json"),
                                      "--n-boot", "100", "--recipes", "demo", *extra])


def test_a_decoding_variant_decodes_the_cached_logits_and_trains_nothing(tmp_path, monkeypatch):
    """Run once: the variants' windows are run through the model and cached. Run again with
    ``--reuse``: nothing trains, the model does not run, and the run's own row and each variant read
    their logits from the run's cache."""
    import hw7qa.inference
    import hw7qa.train
    from hw7qa.data import load_qa_file
    from hw7qa.models import run_tokenizer
    from hw7qa.techniques import answer_length_from
    from hw7qa.windows import encode
    variants = ["max_answer_length=3", "n_best=20", "answer_length_quantile=0.5", "tta_strides=24"]
    _, left = bench.run_benchmark(demo_benchmark(tmp_path, "--variants", *variants))
    assert left == []
    logits = {p: p.stat().st_mtime_ns for p in (tmp_path / "runs" / "demo-seed0" / "logits").glob("*.npz")}
    assert len(logits) == 2                                   # strides 48 (the run's own) and 24

    forward_passes, cache_reads = [], []
    window_logits, read_cached_logits = hw7qa.inference.window_logits, hw7qa.inference.read_cached_logits

    def counted_window_logits(*args, **kwargs):
        forward_passes.append(kwargs.get("desc"))
        return window_logits(*args, **kwargs)

    def counted_read(*args):
        cache_reads.append(read_cached_logits(*args))
        return cache_reads[-1]
    monkeypatch.setattr(hw7qa.train, "train", lambda *a, **k: pytest.fail("a decoding variant trained"))
    monkeypatch.setattr(hw7qa.inference, "window_logits", counted_window_logits)
    monkeypatch.setattr(hw7qa.inference, "read_cached_logits", counted_read)
    _, left = bench.run_benchmark(demo_benchmark(tmp_path, "--reuse", "--variants", *variants))
    assert left == [] and forward_passes == []
    # the own row (evaluate), the variants' own windows, then 1+1+1+2
    assert len(cache_reads) == 1 + 1 + 5 and all(read is not None for read in cache_reads)
    assert {p: p.stat().st_mtime_ns for p in logits} == logits

    result = json.loads((tmp_path / "result.json").read_text(encoding="utf-8"))
    rows = {r["recipe"]: r for r in result["runs"]}
    own = rows["demo"]
    assert [rows[f"demo@{v}"]["paired_with"] for v in variants] == ["demo"] * 4
    assert rows["demo@n_best=20"]["per_question"] == own["per_question"]      # the demo's own n_best: same answers
    assert result["summary"]["rows"]["demo@n_best=20"]["vs_baseline"]["em"]["diff"] == 0
    tta = rows["demo@tta_strides=24"]
    assert tta["added_windows"] == tta["eval_windows"] - own["eval_windows"] > 0
    run_dir = tmp_path / "runs" / "demo-seed0"
    # every logit came from the cache: the added windows are priced at the first run's timed rate
    first_rate = json.loads((run_dir / bench.RATE).read_text())["cpu"]
    assert own["seconds_per_window"] == first_rate > 0
    assert tta["added_inference_minutes"] == pytest.approx(tta["added_windows"] * first_rate / 60)
    cfg = load_config(run_dir / "config.json")
    train_enc = encode(load_qa_file(cfg.train_file), run_tokenizer(run_dir, cfg), cfg.windows)
    assert rows["demo@answer_length_quantile=0.5"]["config"]["max_answer_length"] == \
        answer_length_from(train_enc.answer_tokens, 0.5) != own["config"]["max_answer_length"]
    assert rows["demo@max_answer_length=3"]["config"]["max_answer_length"] == 3
    lengths = [last - first + 1 for first, last in filter(None, train_enc.answer_tokens)]
    assert rows["demo@max_answer_length=3"]["beyond_length_limit"] == pytest.approx(np.mean([n > 3 for n in lengths]))
    assert rows["demo@max_answer_length=3"]["beyond_length_limit"] > own["beyond_length_limit"]
    assert "beyond_length_limit" in result["summary"]["rows"]["demo@max_answer_length=3"]


def test_reuse_decodes_a_finished_run_with_the_benchmarks_decoding_but_refuses_other_settings(tmp_path, monkeypatch,
                                                                                              capsys):
    import hw7qa.train
    bench.run_benchmark(demo_benchmark(tmp_path))
    monkeypatch.setattr(hw7qa.train, "train", lambda *a, **k: pytest.fail("a finished run was trained again"))
    bench.run_benchmark(demo_benchmark(tmp_path, "--reuse", "--set", "max_answer_length=3", "--set", "n_best=5"))
    [run] = json.loads((tmp_path / "result.json").read_text(encoding="utf-8"))["runs"]
    assert (run["config"]["max_answer_length"], run["config"]["n_best"]) == (3, 5)
    said = capsys.readouterr().out
    assert "decoded with the benchmark's n_best=20 (benchmark: 5); max_answer_length=20 (benchmark: 3)" in said
    with pytest.raises(SystemExit) as refused:       # a training setting: the model would not be the benchmark's
        bench.run_benchmark(demo_benchmark(tmp_path, "--reuse", "--set", "max_answer_length=3", "lr=0.01"))
    assert "holds a run with other settings" in str(refused.value) and "(benchmark: 0.01)" in str(refused.value)


@pytest.mark.parametrize("variant, named", [("n_best=5+lr=1e-3", "lr would change training"),
                                            ("max_length=64", "max_length would change training"),
                                            ("eval_batch_size=8", "eval_batch_size changes no answer")])
def test_a_variant_that_is_no_decoding_setting_is_refused_naming_it(tmp_path, variant, named):
    with pytest.raises(SystemExit) as refused:
        bench.run_benchmark(demo_benchmark(tmp_path, "--variants", "max_answer_length=20", variant))
    assert named in str(refused.value) and variant in str(refused.value)
    assert not (tmp_path / "runs").exists()                                     # nothing trained


def test_doc_stride_is_a_decoding_variant_unless_training_cuts_windows_on_its_grid():
    cfg = load_config(PATH.parent.parent / "configs" / "small-model.json")
    assert bench.variant_config(cfg, "doc_stride=64+tta_strides=48").inference_strides == [64, 48]
    with pytest.raises(ValueError, match="doc_stride would change training"):
        bench.variant_config(dataclasses.replace(cfg, train_windows="all"), "doc_stride=64")


def test_a_variant_max_answer_length_replaces_the_runs_quantile():
    cfg = load_config(None, ["answer_length_quantile=0.99"])
    assert bench.variant_config(cfg, "max_answer_length=12").answer_length_quantile == 0
    assert bench.variant_config(cfg, "n_best=5").answer_length_quantile == 0.99


def test_a_recipe_of_answer_length_quantile_decodes_with_the_length_it_took_from_the_answers(tmp_path):
    """train() saves max_answer_length from the training answers; the recipe's row decodes with it,
    and --reuse takes the run for the benchmark's."""
    recipe = ["--recipes", "demo+answer_length_quantile=0.5"]
    for again in ([], ["--reuse"]):
        bench.run_benchmark(demo_benchmark(tmp_path, *recipe, *again))
        saved = load_config(tmp_path / "runs" / "demo+answer_length_quantile=0.5-seed0" / "config.json")
        run = json.loads((tmp_path / "result.json").read_text(encoding="utf-8"))["runs"][0]
        assert run["config"]["max_answer_length"] == saved.max_answer_length != 30


def test_a_variant_row_is_paired_with_its_runs_own_decoding_not_the_baseline():
    runs = fake_runs()
    for r in [r for r in runs if r["recipe"] == "project"]:
        em = np.maximum(r["per_question"]["em"], bernoulli(0.1, 1, 200, seed=r["seed"])[0])
        runs.append({**r, "recipe": "project@n_best=40", "paired_with": "project", "em": em.mean(),
                     "added_inference_minutes": 0.0, "per_question": {"em": em.tolist(), "f1": em.tolist()}})
    summary = bench.summarize_runs(runs, baseline="sample", n_boot=200)
    variant = summary["rows"]["project@n_best=40"]
    assert variant["vs_baseline"]["row"] == "project"
    own = summary["rows"]["project"]["em"]["mean"]
    assert variant["vs_baseline"]["em"]["diff"] == pytest.approx(variant["em"]["mean"] - own)
    assert summary["rows"]["project"]["vs_baseline"]["row"] == "sample"
    assert " vs project |" in bench.markdown_tables(summary, runs)

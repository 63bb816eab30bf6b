"""bench/gpu.py, the GPU benchmark: its CPU smoke run (every measurement's code path, tiny shapes),
the FLOPs formula and peaks, the step timer, the budget, the carry folder and the T4 estimate."""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os
import stat
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from hw7qa import compiling
from hw7qa.config import Config, load_config

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module         # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


gpu = load("gpu")
flops = load("flops")
CONFIG_FIELDS = {f.name for f in dataclasses.fields(Config)}


# ---------------------------------------------------------------- the smoke run, once for the module

@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """``python bench/gpu.py --part speed --smoke`` and ``--part accuracy --smoke``, as CI and a user
    run them, with ``$OUT`` set; the two at once (each uses one core)."""
    tmp = tmp_path_factory.mktemp("gpu-smoke")
    (tmp / "out").mkdir()
    parts = {part: subprocess.Popen([sys.executable, str(BENCH / "gpu.py"), "--part", part, "--smoke", "--results",
                                     str(tmp / "results"), "--work", str(tmp / f"work-{part}")],
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                    env={**os.environ, "OMP_NUM_THREADS": "1", "OUT": str(tmp / "out")})
             for part in ("speed", "accuracy")}
    stdout = {}
    for part, process in parts.items():
        stdout[part], stderr = process.communicate(timeout=900)
        assert process.returncode == 0, stderr[-3000:]
    results = {path.name.split("-")[1]: path for path in (tmp / "results").glob("*.json")}
    return SimpleNamespace(stdout=stdout, tmp=tmp, speed=json.loads(results["speed"].read_text("utf-8")),
                           accuracy=json.loads(results["accuracy"].read_text("utf-8")), results=tmp / "results")


def recipe_batch(m) -> tuple[int, int]:
    cfg = load_config(ROOT / "configs" / f"{m.preset}.json", list(m.settings))
    return cfg.batch_size, cfg.grad_accum


def test_speed_smoke_runs_every_measurement_through_train_and_predict(smoke):
    rows = {r["name"]: r for r in smoke.speed["measurements"]}
    assert list(rows) == [m.name for m in gpu.SPEED_PLAN]
    for m in gpu.SPEED_PLAN:
        row, missing = rows[m.name], [s.split("=")[0] for s in m.settings if s.split("=")[0] not in CONFIG_FIELDS]
        if missing:     # a lever of another branch: reported, not crashed on
            assert row["status"] == "not available" and missing[0] in row["why"], row
            continue
        assert row["status"] == "ok", row
        if m.kind == "inference":
            assert [s["doc_stride"] for s in row["strides"]] == [32, 150]
            assert all(s["windows"] > 0 and s["sample_loop_s"] > 0 and s["project_s"] > 0 for s in row["strides"])
            continue
        micro, accum = row["micro_batch"], row["grad_accum"]
        assert micro * accum == math.prod(recipe_batch(m))          # auto_batch keeps the recipe's batch
        assert row["timed_steps"] == 2 and row["windows"] == 2 * micro * accum
        # seconds are written to 3 decimals, windows/s from the unrounded time (to 1 decimal)
        slowest, fastest = row["windows"] / (row["seconds"] + 5e-4), row["windows"] / (row["seconds"] - 5e-4)
        assert slowest - 0.05 <= row["windows_per_s"] <= fastest + 0.05, row
        assert row["mfu"] is None and row["peak_allocated_gib"] is None      # a CPU has no known peak
        assert row["loss"] is not None and row["loss_step"] == 3            # the last record of the 3 steps run
    assert rows["base bf16 batch 8x4"]["micro_batch"] == 8 and rows["base bf16 batch 8x4"]["grad_accum"] == 4


def test_speed_smoke_runs_the_levers_and_they_keep_the_loss(smoke):
    rows = {r["name"]: r for r in smoke.speed["measurements"]}
    # compile traced with aot_eager: eager's arithmetic, so the same loss at the same step
    assert rows["base bf16 compile"]["loss"] == pytest.approx(rows["base bf16"]["loss"], abs=2e-4)
    assert rows["large bf16 compile"]["loss"] == pytest.approx(rows["large bf16"]["loss"], abs=2e-4)
    if torch.__version__ >= compiling.MIN_TORCH:
        assert "torch.compile cannot run" not in smoke.stdout["speed"]  # compiled, not fallen back to eager
    else:                                                               # older torch: the one line, then eager
        assert f"needs torch {compiling.MIN_TORCH} or newer" in smoke.stdout["speed"]
    assert rows["base fp32 tf32"]["loss"] == rows["base fp32"]["loss"]   # a CUDA switch: the CPU's arithmetic stays
    chunked, whole = rows["inference base chunked"]["strides"], rows["inference base"]["strides"]
    assert [s["windows"] for s in chunked] == [s["windows"] for s in whole]


def test_speed_smoke_reports_model_flops_of_the_timed_windows(smoke):
    row = next(r for r in smoke.speed["measurements"] if r["name"] == "base bf16")
    # tiny shape, max_length 48: every timed window holds between 20 and 48 real tokens
    # ± 5e-4: seconds are written to 3 decimals
    low, high = (flops.train_flops(flops.SHAPES["tiny"], [n] * row["windows"]) / (row["seconds"] + d) / 1e12
                 for n, d in ((20, 5e-4), (48, -5e-4)))
    assert low * 0.99 <= row["model_tflops_per_s"] <= high * 1.01          # 3 significant digits
    assert 0 <= row["padding_pct"] < 100


def test_smoke_prints_and_writes_one_json_and_one_markdown_per_part_and_copies_them_to_out(smoke):
    assert "# Speed on CPU (smoke run" in smoke.stdout["speed"]
    assert "# Accuracy on CPU (smoke run" in smoke.stdout["accuracy"]
    written = sorted(p.name for p in smoke.results.iterdir())
    assert [Path(name).suffix for name in written] == [".json", ".md", ".json", ".md"]
    out = sorted(p.name for p in (smoke.tmp / "out").iterdir())
    assert out == written
    for name in out:
        assert (smoke.tmp / "out" / name).read_bytes() == (smoke.results / name).read_bytes()
    speed_md = (smoke.results / next(n for n in written if "speed" in n and n.endswith(".md"))).read_text("utf-8")
    assert "| base bf16 |" in speed_md and "| inference base (13 questions, batch 128) | 32 |" in speed_md
    assert "| macbert-base | base bf16 | 16 × 2 | 16 × 2 | — | — |" in speed_md          # the presets' table


def test_accuracy_smoke_runs_every_technique_and_seed_and_says_what_each_allows(smoke):
    runs = {(r["recipe"], r["seed"]) for r in smoke.accuracy["runs"]}
    rows = list(gpu.TECHNIQUE_RECIPES) + ["sample+project-decoding"]
    assert runs == {(row, seed) for row in rows for seed in (0, 1)}
    decisions = smoke.accuracy["setup"]["decisions"]
    assert len(decisions) == len(rows) - 1 and all("2 paired seeds (needs ≥ 3): no decision" in d for d in decisions)
    assert smoke.accuracy["summary"]["baseline"] == "project"
    assert smoke.accuracy["setup"]["command"].endswith("bench/gpu.py --part accuracy --smoke --results "
                                                       f"{smoke.results} --work {smoke.tmp / 'work-accuracy'}")


# ---------------------------------------------------------------- budget, names, carry: in this process

def test_measurements_that_would_overrun_the_budget_are_listed_not_run_and_the_files_still_written(tmp_path, capsys):
    code = gpu.main(["--part", "speed", "--smoke", "--budget-min", "0.1", "--only", "base bf16,large bf16",
                     "--results", str(tmp_path), "--work", str(tmp_path / "work")])
    assert code == 0
    saved = json.loads(next(tmp_path.glob("*.json")).read_text("utf-8"))
    assert [(r["name"], r["status"]) for r in saved["measurements"]] == [("base bf16", "not run"),
                                                                         ("large bf16", "not run")]
    assert "estimated 60 s" in saved["measurements"][0]["why"]
    assert "- base bf16: not run (estimated 60 s" in next(tmp_path.glob("*.md")).read_text("utf-8")


def test_a_measurement_that_fails_is_recorded_and_the_next_one_still_runs(tmp_path, monkeypatch, capsys):
    plan = (gpu.Measurement("broken", "bert-base", ("batch_size=0",)), gpu.SPEED_PLAN[0])
    monkeypatch.setattr(gpu, "SPEED_PLAN", plan)
    assert gpu.main(["--part", "speed", "--smoke", "--results", str(tmp_path), "--work", str(tmp_path / "work")]) == 0
    rows = json.loads(next(tmp_path.glob("*.json")).read_text("utf-8"))["measurements"]
    assert [r["status"] for r in rows] == ["error", "ok"]
    assert rows[0]["error"] == "ValueError: batch_size must be at least 1, got 0"
    assert "Traceback" in capsys.readouterr().err          # the log keeps the whole story


def test_an_unknown_measurement_is_refused_in_one_sentence(tmp_path, capsys):
    assert gpu.main(["--part", "speed", "--smoke", "--only", "base bf17", "--results", str(tmp_path),
                     "--work", str(tmp_path / "work")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --only 'base bf17' is no measurement; choose from: base bf16,")
    assert err.count("\n") == 1
    assert not list(tmp_path.glob("*.json"))


def test_a_gpu_run_without_the_carry_folder_says_how_to_make_it(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(gpu, "CARRY", tmp_path / ".gpu-carry")
    assert gpu.main(["--part", "accuracy", "--results", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "bert-base-chinese-tokenizer not found: run `python bench/gpu.py --prepare`" in err
    assert "name .gpu-carry in the device run's carry" in err and not list(tmp_path.glob("*.json"))


@pytest.fixture
def fake_shared(tmp_path):
    """A shared folder with the files --prepare copies, and a proxy build tool that counts its runs."""
    shared = tmp_path / "shared"
    for key, (_, source) in gpu.CARRIED.items():
        (shared / source).parent.mkdir(parents=True, exist_ok=True)
    (shared / "models/bert-base-chinese-tokenizer").mkdir()
    (shared / "models/bert-base-chinese-tokenizer/vocab.txt").write_text("[PAD]\n[UNK]\n")
    for key in ("train", "dev"):
        (shared / gpu.CARRIED[key][1]).write_text(json.dumps({"key": key}))
    build = shared / gpu.CARRIED["proxy"][1]
    build.write_text(f'#!/bin/sh\necho built >> "{tmp_path}/builds"\nmkdir -p "$1"\n'
                     f'echo weights > "$1/model.safetensors"\n')
    build.chmod(build.stat().st_mode | stat.S_IEXEC)
    return shared


def test_prepare_fills_the_carry_folder_once_and_lists_what_it_holds(fake_shared, tmp_path):
    carry = tmp_path / ".gpu-carry"
    report = gpu.prepare(fake_shared, carry)
    assert "PYTHONUNBUFFERED=1 python3 bench/gpu.py --part speed" in report
    sources = gpu.carried_sources(carry)
    assert json.loads(Path(sources.dev).read_text()) == {"key": "dev"}
    assert (Path(sources.tokenizer) / "vocab.txt").read_text() == "[PAD]\n[UNK]\n"
    manifest = json.loads((carry / "MANIFEST.json").read_text())["files"]
    assert set(manifest) == {"bert-base-chinese-tokenizer/vocab.txt", "data/DRCD_test.json", "data/hw7_dev.json",
                             "bert-proxy/model.safetensors"}
    gpu.prepare(fake_shared, carry)
    assert (tmp_path / "builds").read_text() == "built\n"          # the proxy is built once


def test_prepare_refuses_a_carry_over_the_device_limit_and_a_missing_shared_folder(fake_shared, tmp_path):
    with pytest.raises(gpu.Refused, match=r"and the working tree \(\d+\.\d MiB\) exceed the 0.5 MiB a device run"):
        gpu.prepare(fake_shared, tmp_path / "carry", limit=2 ** 19)      # the tree alone is larger
    with pytest.raises(gpu.Refused, match=r"models/bert-base-chinese-tokenizer not found: --prepare needs"):
        gpu.prepare(tmp_path / "nowhere", tmp_path / "carry2")


# ---------------------------------------------------------------- the formula, the peaks, the sampler

@pytest.mark.parametrize("shape", [flops.SHAPES["tiny"], flops.Shape(3, 96, 4, 200)])
def test_n_is_the_non_embedding_parameters_of_the_qa_model(shape):
    from transformers import BertConfig, BertForQuestionAnswering
    model = BertForQuestionAnswering(BertConfig(vocab_size=50, hidden_size=shape.hidden, num_hidden_layers=shape.layers,
                                                num_attention_heads=shape.heads, intermediate_size=shape.intermediate))
    counted = sum(p.numel() for name, p in model.named_parameters() if ".embeddings." not in f".{name}")
    assert flops.matmul_parameters(shape) == counted


def test_training_flops_are_six_n_t_plus_attention_and_three_times_the_forward():
    shape, n = flops.SHAPES["bert-base"], flops.matmul_parameters(flops.SHAPES["bert-base"])
    assert flops.train_flops(shape, [384]) == 6 * n * 384 + 12 * 12 * 768 * 384 ** 2
    assert flops.train_flops(shape, [100, 384]) == 3 * flops.forward_flops(shape, [100, 384])
    assert flops.mfu(989e12, 2.0, 989.0) == 0.5 and flops.mfu(1.0, 1.0, None) is None
    assert flops.hours(65e12 * 3600, 65.0, 0.5) == 2.0


@pytest.mark.parametrize("name, peak", [("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H100 PCIe", 756.0),
                                        ("NVIDIA H100 NVL", 835.0), ("NVIDIA H200", 989.0),
                                        ("NVIDIA A100-SXM4-80GB", 312.0), ("Tesla T4", 65.0), ("NVIDIA L4", 121.0),
                                        ("Tesla V100-SXM2-16GB", 125.0), ("NVIDIA L40S", None), (None, None)])
def test_peaks_by_gpu_name(name, peak):
    assert flops.peak_tflops(name) == peak


def test_the_busy_sampler_averages_what_it_read_between_two_times():
    readings = iter([20.0, 60.0] * 1000)
    with gpu.BusySampler(probe=lambda: next(readings), period=0.01) as sampler:
        deadline = time.time() + 60                    # waits for samples, however slow a loaded machine is
        while len(sampler.samples) < 4 and time.time() < deadline:
            time.sleep(0.01)
    assert len(sampler.samples) >= 4 and sampler.busy() == pytest.approx(40.0, abs=10)
    first, second = sampler.samples[0], sampler.samples[1]
    assert sampler.busy(first[0], first[0]) == 20.0 and sampler.busy(second[0], second[0]) == 60.0
    assert sampler.busy(time.time() + 10) is None and sampler.why == ""


def test_the_busy_sampler_without_a_gpu_samples_nothing_and_says_why():
    def broken():
        raise RuntimeError("NVML not found")
    with gpu.BusySampler(probe=None if not __import__("torch").cuda.is_available() else broken) as sampler:
        pass
    assert sampler.busy() is None and sampler.why.startswith("GPU busy share not sampled: RuntimeError:")


# ---------------------------------------------------------------- the step timer

def fake_run(step, lengths, batches, grad_accum=2, steps_per_epoch=20):
    windows = SimpleNamespace(length=np.array(lengths))
    return SimpleNamespace(state=SimpleNamespace(step=step, grad_accum=grad_accum, micro_batch=len(batches[0])),
                           steps_per_epoch=steps_per_epoch, batches=SimpleNamespace(batches=batches),
                           dataset=SimpleNamespace(windows=windows))


def test_the_step_timer_times_the_steps_after_the_warmup_and_counts_their_windows():
    import torch
    lengths = list(range(10, 50))                      # window i has 10 + i tokens
    batches = [[2 * b, 2 * b + 1] for b in range(20)]  # micro-batches of 2, two per optimizer step
    timer = gpu.StepTimer(warmup=2, steps=3, deadline=time.time() + 60, device=torch.device("cpu"))
    for step in (1, 2, 3, 4):
        timer(fake_run(step, lengths, batches))
    with pytest.raises(gpu.EnoughSteps):
        timer(fake_run(5, lengths, batches))
    r = timer.result
    assert r["timed_steps"] == 3 and r["lengths"] == [10 + i for i in range(8, 20)]    # batches 4..9
    assert r["padded_tokens"] == sum(2 * -(-max(10 + 2 * b, 10 + 2 * b + 1) // 8) * 8 for b in range(4, 10))
    row = gpu.training_row(timer, flops.SHAPES["tiny"], 100.0)
    assert row["windows"] == 12 and row["mfu"] == pytest.approx(      # rounded to 4 digits
        flops.train_flops(flops.SHAPES["tiny"], r["lengths"]) / r["seconds"] / 100e12, abs=1e-4)


def test_the_step_timer_stops_at_the_deadline_and_keeps_clear_of_the_epoch_end():
    import torch
    lengths, batches = [30] * 40, [[2 * b, 2 * b + 1] for b in range(20)]
    late = gpu.StepTimer(warmup=5, steps=3, deadline=time.time() - 1, device=torch.device("cpu"))
    with pytest.raises(gpu.EnoughSteps):
        late(fake_run(1, lengths, batches))
    assert late.result["timed_steps"] == 0 and "deadline" in late.note
    short = gpu.StepTimer(warmup=2, steps=30, deadline=time.time() + 60, device=torch.device("cpu"))
    short(fake_run(1, lengths, batches, steps_per_epoch=6))
    short(fake_run(2, lengths, batches, steps_per_epoch=6))
    assert short.steps == 3                            # steps 3, 4, 5: not step 6, which saves the model


# ---------------------------------------------------------------- decisions and the T4 estimate

def test_a_technique_is_allowed_into_a_preset_only_where_its_interval_over_three_seeds_excludes_zero():
    def row(low, high, seeds):
        return {"vs_baseline": {"em": {"diff": (low + high) / 2, "low": low, "high": high, "n_seeds": seeds}}}
    summary = {"baseline": "project", "rows": {"project": row(0, 0, 3), "up": row(0.01, 0.03, 3),
                                               "zero": row(-0.01, 0.02, 5), "down": row(-0.03, -0.01, 3),
                                               "few": row(0.01, 0.03, 2), "none": {}}}
    verdicts = gpu.verdicts(summary)
    assert [v.split(":")[0] for v in verdicts] == ["- up", "- zero", "- down", "- few", "- none"]
    assert verdicts[0].endswith("excludes 0, above: may enter a preset")
    assert verdicts[1].endswith("holds 0: no effect established, stays off")
    assert verdicts[2].endswith("excludes 0, below: stays off")
    assert "no decision" in verdicts[3] and "no decision" in verdicts[4]


def test_the_t4_estimate_counts_each_preset_s_work_and_uses_the_measured_mfu(tmp_path):
    sources = gpu.smoke_sources(tmp_path / "smoke")
    speed = tmp_path / "speed.json"
    speed.write_text(json.dumps({"machine": {"gpu": "NVIDIA H200"}, "measurements": [
        {"name": "base bf16", "status": "ok", "mfu": 0.30}, {"name": "base fp16", "status": "ok", "mfu": 0.25},
        {"name": "large bf16", "status": "ok", "mfu": 0.20}]}))
    result, markdown = gpu.t4_estimate(sources.dev, sources.tokenizer, str(speed))
    rows = {r["preset"]: r for r in result["rows"]}
    assert list(rows) == ["sample-recipe", "bert-base", "macbert-base", "macbert-large"]
    assert result["measured_mfu"] == {"bert-base": 0.25, "large": 0.20}            # fp16 first, else bf16
    base = rows["bert-base"]
    assert base["hours_measured"] == pytest.approx(base["pflop"] * 1e15 / (65e12 * 0.25) / 3600)
    total = 2 * math.ceil(math.ceil(base["epoch_windows"] / 16) / 2)                # eval_every 500
    assert base["dev_evaluations"] == len(range(500, total + 1, 500)) + (total % 500 != 0)
    assert rows["sample-recipe"]["dev_evaluations"] == 1
    low, high = result["band_mfu"]
    assert low < high and high == pytest.approx(flops.electra_t4_mfu()) or low == pytest.approx(flops.electra_t4_mfu())
    course = result["anchors_mfu"]["course: sample recipe in 8 min"]
    assert flops.hours(rows["sample-recipe"]["pflop"] * 1e15, 65.0, course) == pytest.approx(8 / 60)   # its 8 min
    assert "**Estimate, not a measurement.**" in markdown and "measured on NVIDIA H200" in result["measured_from"]
    assert gpu.t4_estimate(sources.dev, sources.tokenizer)[0]["rows"][0]["hours_measured"] is None


# ---------------------------------------------------------------- train()'s on_step

def test_train_calls_on_step_after_every_optimizer_step_and_an_exception_from_it_ends_training(tmp_path):
    from hw7qa.run import demo_config
    from hw7qa.train import train
    cfg = demo_config(str(tmp_path / "run"), ["epochs=1", "dev_file=", "keep_checkpoints=0", "grad_accum=2",
                                              "auto_batch=false", "max_length=64"])
    seen = []
    train(cfg, on_step=lambda run: seen.append((run.state.step, run.state.batches_done)))
    assert seen == [(1, 2), (2, 4), (3, 0)]                # 38 windows: batches of 8, two per step, 5 in all

    class Stop(Exception):
        pass

    def stop_at_2(run):
        if run.state.step == 2:
            raise Stop
    with pytest.raises(Stop):
        train(dataclasses.replace(cfg, output_dir=str(tmp_path / "stopped")), on_step=stop_at_2)
    assert not (tmp_path / "stopped" / "model").exists()   # the epoch's end, which saves the model, never came

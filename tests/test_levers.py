"""The speed levers ``compile`` and ``tf32``: each does what it says, changes no result beyond float
rounding, keeps checkpoints and resumes as they were, and leaves nothing behind for the next call.

Compiling uses ``backend="aot_eager"`` (through ``compiling.COMPILE_OPTIONS``): the same traced
graph as inductor's, run eagerly, because inductor's C++ compilation of a training graph takes
minutes on a small CPU. ``test_the_default_backend_compiles_the_model`` runs inductor itself once.
"""
import copy
import dataclasses
import shutil

import pytest
import torch
from safetensors.torch import load_file

import hw7qa.compiling as compiling
import hw7qa.decode as decode
import hw7qa.run as run_module
import hw7qa.train as train_module
from hw7qa.__main__ import main
from hw7qa.config import Config
from hw7qa.decode import predict
from hw7qa.devices import tf32_matmuls
from hw7qa.report import read_metrics
from hw7qa.run import demo_config, evaluate_run
from hw7qa.runs import list_checkpoints
from hw7qa.tiny import build_tiny_model
from hw7qa.train import train
from test_resume import assert_same_weights, crash_during_step

AOT_EAGER = {"dynamic": True, "backend": "aot_eager"}
# 38 windows, batch 8: 5 steps per epoch; checkpoints at steps 2, 4, 5, 6, ...; dev evaluated at epoch ends
KNOBS = {"epochs": 3, "batch_size": 8, "log_every": 1, "save_every": 2, "keep_checkpoints": 2, "test_file": ""}


MINIMUM = ".".join(map(str, compiling.MIN_TORCH))
needs_compile = pytest.mark.skipif(compiling.torch_version() < compiling.MIN_TORCH,
                                   reason=f"compile needs torch {MINIMUM} or newer (compiling.py)")


@pytest.fixture(scope="module", autouse=True)
def aot_eager():
    # dynamo's caches are process-wide: compiled graphs of earlier tests (test_estimate.py's)
    # count against its recompile limit, after which it runs frames eagerly; each module starts clean
    torch._dynamo.reset()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(compiling, "COMPILE_OPTIONS", AOT_EAGER)
        yield
    torch._dynamo.reset()


@pytest.fixture
def compiled_calls(monkeypatch):
    """How many calls went through a compiled model (``EagerIfCompileFails``)."""
    calls = []
    real = compiling.EagerIfCompileFails.__call__

    def counted(self, *args, **kwargs):
        calls.append(self.model.training)
        return real(self, *args, **kwargs)
    monkeypatch.setattr(compiling.EagerIfCompileFails, "__call__", counted)
    return calls


def tiny_batch(vocab=300, batch=4, length=40):
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(5, vocab, (batch, length), generator=generator)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "token_type_ids": torch.zeros_like(ids),
            "start_positions": torch.tensor([3] * batch), "end_positions": torch.tensor([5] * batch)}


def outputs(model, batch):
    """Training loss (dropout on, from the same random state) and evaluation logits of ``model``."""
    model.train()
    torch.manual_seed(1)
    loss = model(**batch).loss.detach()
    model.eval()
    with torch.inference_mode():
        logits = model(**{k: v for k, v in batch.items() if "positions" not in k}).start_logits
    return loss, logits


@needs_compile
def test_a_compiled_model_computes_what_the_eager_one_does_and_keeps_its_keys(compiled_calls, bert_tokenizer):
    eager = build_tiny_model(len(bert_tokenizer))     # the demo's shape: the training below reuses the graphs
    model = compiling.compile_model(copy.deepcopy(eager))
    assert compiling.is_compiled(model) and compiling.compile_model(model) is model      # compiled once
    assert list(model.state_dict()) == list(eager.state_dict())                        # no "_orig_mod." prefix
    for length in (40, 24):                                  # another width: the same dynamic graph
        batch = tiny_batch(length=length)
        (loss, logits), (eager_loss, eager_logits) = outputs(model, batch), outputs(eager, batch)
        torch.testing.assert_close(loss, eager_loss, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(logits, eager_logits, rtol=1e-5, atol=1e-6)
    assert compiled_calls == [True, False, True, False]
    # a copy of a compiled model runs its own weights through the compiled graph
    copied = copy.deepcopy(model)
    with torch.no_grad():
        copied.qa_outputs.bias += 1
    torch.testing.assert_close(outputs(copied, batch)[1], eager_logits + 1, rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def eager_run(tmp_path_factory):
    return train(demo_config(str(tmp_path_factory.mktemp("eager") / "run"), KNOBS))


def checkpoint_keys(run):
    return [sorted(load_file(c / "model.safetensors")) for c in list_checkpoints(run)]


def assert_close_metrics(got, expected):
    assert [sorted(r) for r in got] == [sorted(r) for r in expected]
    for g, e in zip(got, expected):
        assert g == pytest.approx(e, rel=1e-4, abs=1e-6), (g, e)


@needs_compile
def test_training_compiled_matches_eager_and_resumes_bit_identically(eager_run, tmp_path, monkeypatch, compiled_calls):
    knobs = {**KNOBS, "compile": True}
    whole = train(demo_config(str(tmp_path / "whole"), knobs))
    # every one of the 15 training steps, from the first, and the dev evaluations ran compiled
    assert compiled_calls[0] and compiled_calls.count(True) == 15 and False in compiled_calls
    assert_close_metrics(read_metrics(whole), read_metrics(eager_run))
    assert checkpoint_keys(whole) == checkpoint_keys(eager_run)         # the plain model's keys
    assert sorted(load_file(whole / "model" / "model.safetensors")) == sorted(
        load_file(eager_run / "model" / "model.safetensors"))

    # the notebook's loop: compiled, then not, then compiled again, in one process
    again = train(demo_config(str(tmp_path / "eager-again"), KNOBS))
    assert read_metrics(again) == read_metrics(eager_run)
    assert_same_weights(again / "model", eager_run / "model")
    crash_during_step(monkeypatch, 7)
    with pytest.raises(KeyboardInterrupt):
        train(demo_config(str(tmp_path / "cut"), knobs))
    monkeypatch.undo()
    cut = tmp_path / "cut"
    assert main(["train", "--resume", str(cut)]) == 0                   # compile=true from its config.json
    assert read_metrics(cut) == read_metrics(whole)
    assert_same_weights(cut / "model", whole / "model")
    last = list_checkpoints(whole)[-1].name
    assert_same_weights(cut / "checkpoints" / last, whole / "checkpoints" / last)


@needs_compile
def test_predict_and_evaluate_compile_the_loaded_model(eager_run, compiled_calls):
    scores, plain = evaluate_run(eager_run)
    assert not compiled_calls
    shutil.rmtree(eager_run / "logits")
    compiled_scores, compiled = evaluate_run(eager_run, overrides=["compile=true"])
    assert compiled_calls and not any(compiled_calls)                  # evaluation mode
    assert [p.answer for p in compiled] == [p.answer for p in plain] and compiled_scores == scores
    assert [p.score for p in compiled] == pytest.approx([p.score for p in plain], abs=1e-4)


def test_a_model_that_cannot_compile_runs_eagerly_after_one_line(monkeypatch, capfd, sample_dev, bert_tokenizer):
    model, cfg = build_tiny_model(len(bert_tokenizer)), Config(max_length=128, max_question_tokens=32, doc_stride=48)
    expected = predict(model, bert_tokenizer, sample_dev, cfg)
    capfd.readouterr()

    def no_compiler(*args, **kwargs):
        raise RuntimeError("Dynamo is not supported on this Python\nsecond line")
    monkeypatch.setattr(torch, "compile", no_compiler)
    monkeypatch.setattr(compiling, "MIN_TORCH", (0, 0))
    got = predict(model, bert_tokenizer, sample_dev, dataclasses.replace(cfg, compile=True))
    printed = capfd.readouterr()
    assert got == expected and not compiling.is_compiled(model)
    assert printed.out.count("\n") == 1 and not any(word in printed.err for word in ("Traceback", "dynamo", "compile"))
    assert printed.out.startswith("compile=true: torch.compile cannot compile BertForQuestionAnswering here "
                                  "(RuntimeError: Dynamo is not supported on this Python); it runs uncompiled")


class Small(torch.nn.Module):
    """A module of this file: dynamo compiles the forward passes of code outside torch itself."""

    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(4, 3)

    def forward(self, x):
        return torch.relu(self.linear(x))


def test_a_compile_error_at_the_first_call_falls_back_once(monkeypatch, capfd):
    def failing_backend(graph, example_inputs):
        raise OSError("no C compiler found")
    monkeypatch.setattr(compiling, "COMPILE_OPTIONS", {"dynamic": True, "backend": failing_backend})
    monkeypatch.setattr(compiling, "MIN_TORCH", (0, 0))
    model = Small()
    x = torch.randn(2, 4)
    expected = model(x)
    compiling.compile_model(model)
    assert torch.equal(model(x), expected) and torch.equal(model(x), expected)
    printed = capfd.readouterr()
    assert printed.out.count("\n") == 1 and "no C compiler found" in printed.out and "runs uncompiled" in printed.out
    assert printed.err == "" and not compiling.is_compiled(model)


def test_torch_older_than_the_minimum_runs_uncompiled_after_one_line(monkeypatch, capfd):
    monkeypatch.setattr(compiling, "MIN_TORCH", (99, 0))
    model, x = Small(), torch.randn(2, 4)
    assert compiling.compile_model(model) is model and not compiling.is_compiled(model)
    printed = capfd.readouterr()
    assert printed.out == (f"compile=true: torch.compile cannot compile Small here (RuntimeError: compile needs torch "
                           f"99.0 or newer, this is {torch.__version__}); it runs uncompiled\n")
    assert torch.equal(model(x), model._call_impl(x))


@needs_compile
def test_the_default_backend_compiles_the_model(monkeypatch):
    """inductor, as a run with compile=true uses it, on the evaluation graph of a tiny model."""
    if not any(shutil.which(name) for name in ("cc", "gcc", "g++", "c++")):
        pytest.skip("no C compiler: inductor cannot compile for the CPU here (compile falls back, tested above)")
    monkeypatch.setattr(compiling, "COMPILE_OPTIONS", {"dynamic": True})
    eager = build_tiny_model(300, hidden=32, layers=1).eval()
    model = compiling.compile_model(copy.deepcopy(eager))
    fallbacks = []
    monkeypatch.setattr(compiling, "fall_back", lambda model, error: fallbacks.append(error))
    batch = {k: v for k, v in tiny_batch().items() if "positions" not in k}
    with torch.inference_mode():
        got, expected = model(**batch).start_logits, eager(**batch).start_logits
    causes = fallbacks[:1]         # the error, and the errors it wraps
    while causes and (getattr(causes[-1], "inner_exception", None) or causes[-1].__cause__):
        causes.append(getattr(causes[-1], "inner_exception", None) or causes[-1].__cause__)
    if any(type(e).__name__ in ("CppCompileError", "InvalidCxxCompiler") for e in causes):
        pytest.skip(f"inductor cannot build C++ kernels here (e.g. no Python.h): {str(causes[-1])[:200]}")
    assert not fallbacks and compiling.is_compiled(model)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------- tf32

def tf32_flags():
    return torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32


def test_tf32_is_on_inside_and_restored_after_even_after_an_error():
    before = tf32_flags()
    with tf32_matmuls(False):
        assert tf32_flags() == before
    with tf32_matmuls(True):
        assert tf32_flags() == (True, True)
    assert tf32_flags() == before
    with pytest.raises(ZeroDivisionError), tf32_matmuls(True):
        assert tf32_flags() == (True, True)
        1 / 0
    assert tf32_flags() == before


def test_train_and_evaluate_with_tf32_set_it_for_the_call_only_and_cpu_results_do_not_change(eager_run, tmp_path,
                                                                                            monkeypatch):
    seen = []
    real_step, real_logits = train_module.train_step, decode.window_logits
    monkeypatch.setattr(train_module, "train_step", lambda *a: seen.append(("train", tf32_flags())) or real_step(*a))
    monkeypatch.setattr(decode, "window_logits", lambda *a, **k: seen.append(("infer", tf32_flags()))
                        or real_logits(*a, **k))
    before = tf32_flags()
    assert before != (True, True)                 # torch's default: TF32 for convolutions only
    run = train(demo_config(str(tmp_path / "tf32"), {**KNOBS, "tf32": True}))
    assert tf32_flags() == before
    assert {flags for _, flags in seen} == {(True, True)} and {what for what, _ in seen} == {"train", "infer"}
    assert read_metrics(run) == read_metrics(eager_run)
    assert_same_weights(run / "model", eager_run / "model")

    expected = evaluate_run(eager_run)[1]
    seen.clear()
    monkeypatch.setattr(run_module, "window_logits", lambda *a, **k: seen.append(("infer", tf32_flags()))
                        or real_logits(*a, **k))
    assert evaluate_run(run)[1] == expected
    assert seen == [("infer", (True, True))] and tf32_flags() == before

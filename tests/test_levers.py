"""The speed levers ``compile`` and ``tf32``: each does what it says, changes no result beyond float
rounding, keeps checkpoints and resumes as they were, and leaves nothing behind for the next call.

Compiling uses ``aot_eager`` (through ``compiling.COMPILE_OPTIONS``): the same traced graph as
inductor's, run eagerly, because inductor compiles a training graph for minutes on a small CPU.
``test_the_default_backend_compiles_the_model`` runs inductor itself once, on an evaluation graph.
"""
import copy
import shutil

import pytest
import torch
from safetensors.torch import load_file

import hw7qa.models as compiling
import hw7qa.inference as inference
import hw7qa.train as train_module
from hw7qa.__main__ import main
from hw7qa.models import tf32_matmuls
from hw7qa.report import read_metrics
from hw7qa.config import demo_config
from hw7qa.inference import evaluate_run
from hw7qa.runfolder import list_checkpoints
from hw7qa.tiny import build_tiny_model
from hw7qa.train import train
from test_resume import assert_same_weights, crash_during_step

DEFAULT_OPTIONS = dict(compiling.COMPILE_OPTIONS)
CALLS = []     # torch.is_grad_enabled() at each call of a compiled graph: True while training
GRAPHS = []    # the graphs compiled


def counted_aot_eager(graph, example_inputs):
    """A torch.compile backend: ``aot_eager``, recording each graph it compiles and each call of one."""
    compiled = torch._dynamo.lookup_backend("aot_eager")(graph, example_inputs)
    GRAPHS.append(graph)

    def call(*args):
        CALLS.append(torch.is_grad_enabled())
        return compiled(*args)
    return call


# 38 windows, batch 8: 5 steps per epoch; checkpoints at steps 2, 4, 5, 6, ...; dev evaluated at epoch ends
KNOBS = {"epochs": 3, "batch_size": 8, "log_every": 1, "save_every": 2, "keep_checkpoints": 2, "test_file": ""}
needs_compile = pytest.mark.skipif(torch.__version__ < compiling.MIN_TORCH,
                                   reason=f"compile needs torch {compiling.MIN_TORCH} or newer (models.compile_model)")


@pytest.fixture(scope="module", autouse=True)
def aot_eager():
    # dynamo's caches are process-wide: compiled graphs of earlier tests (test_estimate.py's)
    # count against its recompile limit, after which it runs frames eagerly; each module starts clean
    torch._dynamo.reset()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(compiling, "COMPILE_OPTIONS", {**DEFAULT_OPTIONS, "backend": counted_aot_eager})
        yield
    torch._dynamo.reset()


@pytest.fixture(autouse=True)
def compiled_calls():
    """The calls of compiled graphs in a test, which finds torch.compile probed (``cannot_compile``)."""
    compiling.cannot_compile.cache_clear()
    compiling.cannot_compile(torch.device("cpu"))
    CALLS.clear()
    yield CALLS
    compiling.cannot_compile.cache_clear()          # a test may have probed with other options


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
    model = copy.deepcopy(eager)
    assert compiling.compile_model(model) is model and not compiled_calls        # compiled at its first call
    assert list(model.state_dict()) == list(eager.state_dict())                 # no "_orig_mod." prefix

    def check(length):
        batch = tiny_batch(length=length)
        (loss, logits), (eager_loss, eager_logits) = outputs(model, batch), outputs(eager, batch)
        torch.testing.assert_close(loss, eager_loss, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(logits, eager_logits, rtol=1e-5, atol=1e-6)
    check(40)
    graphs = len(GRAPHS)                                     # both modes' graphs, compiled at width 40
    check(24)                                                # another width: the same dynamic graphs
    compiling.compile_model(model)                          # again, as each dev evaluation does
    check(32)
    assert compiled_calls == [True, False] * 3 and len(GRAPHS) == graphs


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


class Small(torch.nn.Module):
    """A module of this file: dynamo compiles the forward passes of code outside torch itself."""

    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(4, 3)

    def forward(self, x):
        return torch.relu(self.linear(x))


def no_compiler(graph, example_inputs):
    raise OSError("no C compiler found")


def unsupported_python(*args, **kwargs):
    raise RuntimeError("Dynamo is not supported on this Python\nsecond line")


@pytest.mark.parametrize("patches, reason", [
    ([(compiling, "COMPILE_OPTIONS", {"dynamic": True, "backend": no_compiler}), (compiling, "MIN_TORCH", "0")],
     "OSError: no C compiler found"),
    ([(torch, "compile", unsupported_python), (compiling, "MIN_TORCH", "0")],
     "RuntimeError: Dynamo is not supported on this Python"),
    ([(compiling, "MIN_TORCH", "99.0")], f"RuntimeError: it needs torch 99.0 or newer, this is {torch.__version__}"),
], ids=["no C compiler", "unsupported Python", "torch too old"])
def test_where_torch_compile_cannot_run_one_line_says_so_and_the_model_runs_eagerly(patches, reason, monkeypatch,
                                                                                   capfd, compiled_calls):
    for where, name, value in patches:
        monkeypatch.setattr(where, name, value)
    compiling.cannot_compile.cache_clear()
    model, x = Small(), torch.randn(2, 4)
    expected = model(x)
    for _ in range(2):                                      # compiled again, as each dev evaluation does
        assert compiling.compile_model(model) is model and torch.equal(model(x), expected)
    assert not compiled_calls
    printed = capfd.readouterr()
    assert printed.out == f"compile=true: torch.compile cannot run here ({reason}); the model runs uncompiled\n"
    assert printed.err == ""


@needs_compile
def test_the_default_backend_compiles_the_model(monkeypatch, capsys):
    """inductor, as a run with compile=true uses it, on the evaluation graph of a tiny model."""
    monkeypatch.setattr(compiling, "COMPILE_OPTIONS", DEFAULT_OPTIONS)
    compiling.cannot_compile.cache_clear()
    if compiling.cannot_compile(torch.device("cpu")):
        pytest.skip(capsys.readouterr().out.strip())    # e.g. no C compiler: compile falls back, tested above
    eager = build_tiny_model(300, hidden=32, layers=1).eval()
    model = compiling.compile_model(copy.deepcopy(eager))
    batch = {k: v for k, v in tiny_batch().items() if "positions" not in k}
    with torch.inference_mode():
        got, expected = model(**batch).start_logits, eager(**batch).start_logits
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
    real_step, real_logits = train_module.train_step, inference.window_logits
    monkeypatch.setattr(train_module, "train_step", lambda *a: seen.append(("train", tf32_flags())) or real_step(*a))
    monkeypatch.setattr(inference, "window_logits", lambda *a, **k: seen.append(("infer", tf32_flags()))
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
    monkeypatch.setattr(inference, "window_logits", lambda *a, **k: seen.append(("infer", tf32_flags()))
                        or real_logits(*a, **k))
    assert evaluate_run(run)[1] == expected
    assert seen == [("infer", (True, True))] and tf32_flags() == before

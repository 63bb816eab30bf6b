"""bench/fp16_head.py: float16 matmuls in float32 kernels (``--emulate-matmuls``), and its fp32 answers."""
from __future__ import annotations

import contextlib
import importlib.util
import io
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from hw7qa.config import demo_config
from hw7qa.data import QAData, load_qa_file
from hw7qa.inference import evaluate_run
from hw7qa.tiny import build_tiny_model
from hw7qa.train import train

PATH = Path(__file__).resolve().parent.parent / "bench" / "fp16_head.py"
spec = importlib.util.spec_from_file_location("bench_fp16_head", PATH)
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)
# named here, not read from the bench: the spy must also see a matmul the bench leaves out
MATMULS = ("linear", "matmul", "addmm", "mm", "bmm", "baddbmm")


class MatmulOperands(TorchDispatchMode):
    """Records the dtypes of every matmul's tensor operands that reaches it."""
    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ in MATMULS:
            self.seen.append({a.dtype for a in args if isinstance(a, torch.Tensor)})
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("grad_mode", [torch.inference_mode, torch.no_grad])
def test_every_float16_matmul_reaches_a_float32_kernel(grad_mode, bert_tokenizer):
    """Under inference_mode (as hw7qa's inference runs) linear arrives whole, under no_grad as addmm:
    either way no matmul is left to the CPU's float16 kernels, and autocast's float16 stays around them."""
    model = build_tiny_model(len(bert_tokenizer)).eval()
    ids = torch.randint(5, len(bert_tokenizer), (2, 24))
    layer_out = []
    model.bert.encoder.layer[-1].output.dense.register_forward_hook(lambda m, i, out: layer_out.append(out.dtype))
    with grad_mode(), torch.autocast("cpu", dtype=torch.float16), MatmulOperands() as below, \
            bench.Float16MatmulsInFloat32():          # the newest mode handles an op first, then passes it down
        model(input_ids=ids, attention_mask=torch.ones_like(ids))
    assert below.seen and all(dtypes == {torch.float32} for dtypes in below.seen)
    assert layer_out == [torch.float16]


def test_a_float16_linear_is_rounded_once_from_a_float32_product():
    x, w, b = torch.randn(64, 96), torch.randn(80, 96), torch.randn(80)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.float16), bench.Float16MatmulsInFloat32():
        out = torch.nn.functional.linear(x, w, b)
    once = (x.half().float() @ w.half().float().T + b.half().float()).half()
    assert out.dtype == torch.float16
    assert torch.allclose(out.float(), once.float(), rtol=0, atol=1e-2)    # equal but for the order of the sum
    assert (out == once).float().mean() > 0.99


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        return train(demo_config(str(tmp_path_factory.mktemp("fp16-head") / "run"), {"epochs": 3}))


def test_the_fp32_answers_are_the_runs_own_from_its_cache_or_computed(demo_run, monkeypatch):
    passes = []                                    # the precision of each forward pass over the windows
    real = bench.window_logits
    monkeypatch.setattr(bench, "window_logits", lambda *args: passes.append(args[4]) or real(*args))
    whole = load_qa_file(demo_config().dev_file, need_answers=True)
    first = QAData(whole.path, whole.questions[:12], whole.paragraphs)
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        computed = bench.variants(str(demo_run), first, emulate=True)
        assert passes == ["fp16", "no"] and not (demo_run / "logits").exists()     # nothing cached: computed
        _, predictions = evaluate_run(demo_run)           # caches the run's fp32 logits of its dev file
        passes.clear()
        from_cache = bench.variants(str(demo_run), whole, emulate=True)
    assert passes == ["fp16"]
    assert from_cache["fp32"] == [p.answer for p in predictions]
    assert computed["fp32"] == from_cache["fp32"][:12]
    assert set(computed) == {"fp32", "fp16", "fp16 + float32 head"}
    assert all(len(answers) == 12 for answers in computed.values())

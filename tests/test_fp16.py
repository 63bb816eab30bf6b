"""fp16 as a T4 runs it, on the CPU: float16 autocast and a dynamic loss scale (``GradScaler``).

On the CPU accelerate turns ``mixed_precision="fp16"`` into nothing (no scaler, float32 forward
passes). ``t4_fp16`` gives its ``Accelerator`` what a GPU without bf16 gets, so the trainer's own
code runs as on a T4 through accelerate's objects: the scaler's skips and the counters around them,
``max_skipped_steps``, FGM, EMA, layer-wise lr and accumulation, checkpoints and resume, auto_batch,
and float16 inference. The scale starts at 2**26, where the demo model's float16 gradients
overflow: the first 3 steps are skipped while it calibrates, and growing every 3 applied steps it
overflows again now and then.
"""
import contextlib
import io

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import window_rows
import hw7qa.train as train_module
from hw7qa.__main__ import main
from hw7qa.config import DecodeSpec, WindowSpec
from hw7qa.data import QAData, Question
from hw7qa.decode import decode_predictions
from hw7qa.inference import window_logits
from hw7qa.models import Float32Head, load_model
from hw7qa.report import read_metrics
from hw7qa.config import demo_config
from hw7qa.runfolder import list_checkpoints
from hw7qa.tiny import build_tiny_model
from hw7qa.train import train
from hw7qa.windows import encode, eval_windows
from test_resume import assert_same_weights, crash_during_step, snapshot
from test_trainer import expected_lr, oom_above, watch_steps

SCALER = {"init_scale": 2.0 ** 26, "growth_interval": 3}
# 38 windows, micro-batch 8, 2 per optimizer step: 3 steps per epoch; a checkpoint after every step, the newest 2 kept
KNOBS = {"epochs": 3, "batch_size": 8, "grad_accum": 2, "auto_batch": False, "log_every": 1, "save_every": 1,
         "keep_checkpoints": 2, "dev_file": "", "test_file": "", "mixed_precision": "fp16", "max_skipped_steps": 3,
         "lr": 0.002, "lr_schedule": "linear", "warmup_ratio": 0.25, "layer_lr_decay": 0.5, "ema_decay": 0.9,
         "fgm_epsilon": 1.0}
TOTAL, WARMUP = 9, 2


def t4_fp16(monkeypatch) -> None:
    """Every ``Accelerator`` with ``mixed_precision="fp16"`` gets on the CPU what a T4 gets: float16
    autocast (``native_amp``) and a ``GradScaler``, which ``prepare``, ``backward``,
    ``clip_grad_norm_``, the optimizer's and scheduler's wrappers and ``save_state``/``load_state``
    use as they do on a GPU."""
    import accelerate

    class T4Accelerator(accelerate.Accelerator):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            if self.mixed_precision == "fp16":
                self.native_amp, self.scaler = True, torch.amp.GradScaler("cpu", **SCALER)
    monkeypatch.setattr(accelerate, "Accelerator", T4Accelerator)


@pytest.fixture
def t4(monkeypatch):
    t4_fp16(monkeypatch)


def observe(run) -> dict:
    """What an optimizer step left: AdamW's own count of applied steps, lrs, scale, weights, average."""
    model, inner = run.accelerator.unwrap_model(run.model), run.optimizer.optimizer
    return {"step": run.state.step, "applied": int(inner.state[model.qa_outputs.weight].get("step", 0)),
            "lrs": [g["lr"] for g in inner.param_groups], "scaler": run.accelerator.scaler.state_dict(),
            "weights": {k: v.clone() for k, v in model.state_dict().items()},
            "average": {k: v.clone() for k, v in run.ema.model.state_dict().items()}}


def watch_fgm(monkeypatch) -> list:
    """Per adversarial pass: the (scaled) embedding gradient it starts from, how far the embeddings
    were moved, the QA head's gradient before it and what the pass added to it."""
    seen, real = [], train_module.adversarial_backward

    def adversarial_backward(model, embeddings, batch, epsilon, backward):
        saved, grad, head = embeddings.detach().clone(), embeddings.grad.clone(), model.qa_outputs.weight
        before, moved = head.grad.clone(), []
        hook = model.get_input_embeddings().register_forward_hook(
            lambda m, i, o: moved.append(m.weight.detach() - saved))
        try:
            real(model, embeddings, batch, epsilon, backward)
        finally:
            hook.remove()
        seen.append((grad, moved[0], before, head.grad - before))
    monkeypatch.setattr(train_module, "adversarial_backward", adversarial_backward)
    return seen


@pytest.fixture(scope="module")
def whole(tmp_path_factory):
    """The fp16 demo run with accumulation and every technique, uninterrupted: its folder, what each
    step left, what each adversarial pass did, and what it printed."""
    printed = io.StringIO()
    with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stdout(printed):
        t4_fp16(patch)
        steps, fgm = watch_steps(patch, observe), watch_fgm(patch)
        run = train(demo_config(str(tmp_path_factory.mktemp("fp16") / "whole"), KNOBS))
    return run, steps, fgm, printed.getvalue()


def test_skipped_steps_are_not_trained_steps(whole):
    run, steps, _, printed = whole
    applied = [s["applied"] for s in steps]
    assert [s["step"] for s in steps] == list(range(1, TOTAL + 1))
    assert applied[:3] == [0, 0, 0] and 0 < applied[-1] < TOTAL          # calibration skips, and later ones
    # the lr of every record is the schedule's after the steps applied so far
    lrs = [r["lr"] for r in read_metrics(run) if "lr" in r]
    assert lrs == pytest.approx([expected_lr("linear", n, WARMUP, TOTAL, 0.002) for n in applied], abs=1e-12)
    # layer-wise lr on this path: every layer's lr keeps its ratio to the top one
    for s in (s for s in steps if s["lrs"][0] > 0):
        ratios = sorted({round(lr / s["lrs"][0], 9) for lr in s["lrs"]})
        assert ratios == pytest.approx([0.5 ** k for k in range(3, -1, -1)])     # 2 layers: 4 depths
    # the scale halves at each skip and doubles after 3 applied optimizer steps (not micro-batches)
    scale, tracker = SCALER["init_scale"], 0
    for before, s in zip([0] + applied, steps):
        if s["applied"] == before:
            scale, tracker = scale / 2, 0
        else:
            tracker += 1
            scale, tracker = (scale * 2, 0) if tracker == 3 else (scale, tracker)
        assert (s["scaler"]["scale"], s["scaler"]["_growth_tracker"]) == (scale, tracker), s["step"]
    skipped = TOTAL - applied[-1]
    assert (f"fp16: the loss scaler skipped {skipped} of the {TOTAL} optimizer steps" in printed
            and f"the other {applied[-1]} were applied" in printed)


def test_a_skipped_step_moves_neither_the_weights_nor_their_average(whole):
    run, steps, _, _ = whole
    for previous, s in zip(steps, steps[1:]):
        same = [torch.equal(s[key][k], previous[key][k]) for key in ("weights", "average") for k in s["weights"]
                if s["weights"][k].is_floating_point()]
        if s["applied"] == previous["applied"]:
            assert all(same), s["step"]
            continue
        assert not all(same) or previous["lrs"][0] == 0, s["step"]    # (warmup's first lr is 0)
        d = min(0.9, (1 + s["applied"]) / (10 + s["applied"]))     # the average's step: the applied ones
        for k, v in s["average"].items():
            if v.is_floating_point():
                assert torch.allclose(v, d * previous["average"][k] + (1 - d) * s["weights"][k], atol=1e-6), k
    saved = load_file(run / "model" / "model.safetensors")
    assert all(torch.equal(saved[k], steps[-1]["average"][k]) for k in saved)


def test_fgm_moves_the_embeddings_by_epsilon_and_adds_a_scaled_gradient(whole):
    _, _, fgm, _ = whole
    assert len(fgm) == 15                                     # one per micro-batch: 5 per epoch
    finite = 0
    for grad, moved, before, added in fgm:
        if not torch.isfinite(grad).all():                    # an overflow: that step is skipped, nothing moved
            assert not moved.any()
            continue
        finite += 1
        # epsilon along the gradient, whatever the loss scale it carries
        assert moved.norm().item() == pytest.approx(1.0, rel=1e-3)
        assert torch.nn.functional.cosine_similarity(moved.flatten(), grad.flatten(), dim=0) > 0.999
        # the second pass's gradient is scaled as the first one: of the same size, not 1/scale of it
        if torch.isfinite(added).all() and torch.isfinite(before).all():
            assert 0.05 < (added.norm() / before.norm()).item() < 20
    assert finite >= 5


def test_calibration_skips_pass_while_a_non_finite_loss_stops(tmp_path, t4, monkeypatch, capsys):
    """The whole run skipped its first 3 steps with max_skipped_steps=3 and finished; this one's loss
    is NaN from step 5 on, after the same 3 skips and an applied step 4."""
    real = train_module.train_step

    def nan_from_step_5(run, batch):
        if run.state.step + 1 < 5:
            return real(run, batch)
        hook = run.accelerator.unwrap_model(run.model).register_forward_hook(
            lambda m, i, out: setattr(out, "loss", out.loss * float("nan")) or out)
        try:
            return real(run, batch)
        finally:
            hook.remove()
    monkeypatch.setattr(train_module, "train_step", nan_from_step_5)
    run = tmp_path / "nan"
    assert main(["demo", "--output-dir", str(run), "--set", *[f"{k}={v}" for k, v in KNOBS.items()]]) == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("training stopped: 3 optimizer steps in a row had a non-finite loss or gradients "
                              "(step 7)") and not any("Traceback" in line for line in err)
    # the scaler's skips were checkpointed as any step; none during the streak (5-7)
    assert [c.name for c in list_checkpoints(run)] == ["step-0000003", "step-0000004"]


def test_killed_mid_epoch_resumes_bit_identical_scaler_included(tmp_path, t4, monkeypatch, whole, capsys):
    run, steps, _, _ = whole
    cut = tmp_path / "cut"
    crash_during_step(monkeypatch, 8)
    with pytest.raises(KeyboardInterrupt):
        train(demo_config(str(cut), KNOBS))
    monkeypatch.undo()
    t4_fp16(monkeypatch)
    assert [c.name for c in list_checkpoints(cut)] == ["step-0000006", "step-0000007"]   # step 7: mid-epoch
    scaler = torch.load(cut / "checkpoints" / "step-0000007" / "scaler.pt", weights_only=True)
    assert scaler == steps[6]["scaler"] and scaler["_growth_tracker"] > 0     # 2 steps into the next growth
    assert main(["train", "--resume", str(cut)]) == 0
    assert read_metrics(cut) == read_metrics(run)
    assert_same_weights(cut / "model", run / "model")
    last = list_checkpoints(run)[-1]
    assert_same_weights(cut / "checkpoints" / last.name, last)
    assert (torch.load(cut / "checkpoints" / last.name / "scaler.pt", weights_only=True)
            == torch.load(last / "scaler.pt", weights_only=True))
    # a resume that changes the precision is refused, touching nothing
    before = snapshot(cut)
    assert main(["train", "--resume", str(cut), "--set", "mixed_precision=no"]) == 2
    assert "mixed_precision='no' (the run has 'fp16')" in capsys.readouterr().err
    assert snapshot(cut) == before


def test_auto_batch_after_out_of_memory_trains_as_the_recipe(tmp_path, t4, monkeypatch, whole, capsys):
    run, _, _, _ = whole
    oom_above(monkeypatch, 8)
    auto = train(demo_config(str(tmp_path / "auto"), {**KNOBS, "batch_size": 16, "grad_accum": 1, "auto_batch": True}))
    assert "16 windows per forward pass do not fit in memory; 8 × grad_accum 2 instead" in capsys.readouterr().out
    assert not torch.is_autocast_enabled("cpu")      # the out-of-memory error left no float16 autocast on
    assert read_metrics(auto) == read_metrics(run)
    last = list_checkpoints(run)[-1]
    assert_same_weights(list_checkpoints(auto)[-1], last)
    assert (torch.load(list_checkpoints(auto)[-1] / "scaler.pt", weights_only=True)
            == torch.load(last / "scaler.pt", weights_only=True))


# ---------------------------------------------------------------- inference in float16

def test_float16_inference_computes_the_heads_logits_in_float32(tmp_path, bert_tokenizer, sample_dev):
    build_tiny_model(len(bert_tokenizer)).save_pretrained(tmp_path)
    model = load_model(str(tmp_path))                              # as every run's model is loaded
    assert isinstance(model.qa_outputs, Float32Head) and "qa_outputs.weight" in model.state_dict()
    windows = eval_windows(encode(sample_dev, bert_tokenizer, WindowSpec(128, 32, doc_stride=48)))
    encoder = set()
    model.bert.encoder.layer[-1].output.dense.register_forward_hook(lambda m, i, out: encoder.add(out.dtype))
    low = np.concatenate([s for s, _ in window_logits(model, bert_tokenizer, windows, 32, "fp16")])
    assert encoder == {torch.float16}                             # the encoder runs in float16 ...
    full = np.concatenate([s for s, _ in window_logits(model, bert_tokenizer, windows, 32, "no")])
    assert (low != low.astype(np.float16)).mean() > 0.9           # ... the logits are not on float16's grid
    assert 0 < np.abs(low - full).max() < 0.05                    # the encoder's float16 rounding only


def test_equal_span_scores_follow_the_stated_tie_rule(bert_tokenizer):
    """Coarse logits (float16's) make equal span scores: decode.py's one rule decides, the later
    start, then the later end, in a window, and the earlier of two windows."""
    paragraph = "甲乙丙丁戊己庚辛壬癸" * 6
    data = QAData("mem", [Question(0, "問?", 0)], [paragraph])
    enc = encode(data, bert_tokenizer, WindowSpec(32, 8, doc_stride=16))
    windows = eval_windows(enc)
    assert len(windows) >= 2
    rows = window_rows(windows)
    logits = [(np.zeros(len(w.input_ids), np.float32), np.zeros(len(w.input_ids), np.float32)) for w in rows]
    spec = DecodeSpec(n_best=5, max_answer_length=30)
    for wi, w in enumerate([rows[0], rows[1]]):
        start, end = logits[wi]
        start[w.context_start + 1] = start[w.context_start + 3] = 5      # two starts tie ...
        end[w.context_start + 4] = end[w.context_start + 6] = 3          # ... and two ends
    [prediction] = decode_predictions(enc, windows, logits, spec)
    w = rows[0]
    assert (prediction.window, prediction.score) == (0, 8.0)
    assert (prediction.char_start, prediction.char_end) == windows.char_span(enc, 0, w.context_start + 3,
                                                                             w.context_start + 6)

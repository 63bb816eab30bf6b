"""The opt-in techniques (techniques.py), each seen taking effect: the learning rate of every layer,
the moving average step by step, the adversarial pass's perturbation and restore, the answer length
from the training answers; and each one off when its knob is off."""
import dataclasses

import pytest
import torch
from safetensors.torch import load_file

import hw7qa.train as train_module
from hw7qa.config import load_config
from hw7qa.config import demo_config
from hw7qa.config import run_config
from hw7qa.report import read_metrics
from hw7qa.techniques import (WeightAverage, adversarial_backward, answer_length_from, layer_depth,
                              layer_parameter_groups)
from hw7qa.tiny import build_tiny_model
from hw7qa.train import train, load_inputs
from test_trainer import QUICK, watch_steps


# ---------------------------------------------------------------- layer-wise lr decay

def test_layer_depth_counts_from_the_embeddings_up():
    assert layer_depth("bert.embeddings.word_embeddings.weight", 12) == 0
    assert layer_depth("bert.encoder.layer.0.attention.self.query.weight", 12) == 1
    assert layer_depth("roberta.encoder.layer.11.output.dense.bias", 12) == 12
    assert layer_depth("qa_outputs.weight", 12) == 13


def test_each_layer_learns_at_its_decayed_rate():
    model = build_tiny_model(50, layers=3)
    groups = layer_parameter_groups(model, lr=1e-3, weight_decay=0.01, layer_lr_decay=0.5)
    owner = {id(p): g for g in groups for p in g["params"]}
    assert len(owner) == len(list(model.parameters()))        # every parameter in exactly one group
    for name, p in model.named_parameters():
        group = owner[id(p)]
        assert group["lr"] == pytest.approx(1e-3 * 0.5 ** (4 - layer_depth(name, 3))), name
        assert group["weight_decay"] == (0.01 if p.ndim >= 2 else 0.0), name
    assert groups[0]["lr"] == 1e-3 and groups[0]["params"][0] is model.qa_outputs.weight


def test_the_schedule_scales_every_layer_alike(tmp_path, monkeypatch):
    seen = watch_steps(monkeypatch, lambda run: [g["lr"] for g in run.optimizer.param_groups])
    run = train(demo_config(str(tmp_path / "run"), {**QUICK, "layer_lr_decay": 0.5, "lr": 1e-3, "dev_file": ""}))
    top = [r["lr"] for r in read_metrics(run) if "lr" in r]
    assert [lrs[0] for lrs in seen] == pytest.approx(top)            # the logged lr is the top layer's
    layers = 2                                                        # the demo's tiny model
    assert sum(lrs[0] > 0 for lrs in seen) >= len(seen) - 1           # (linear decay: 0 at the last step)
    for lrs in (lrs for lrs in seen if lrs[0] > 0):
        ratios = sorted({round(lr / lrs[0], 9) for lr in lrs})
        assert ratios == pytest.approx([0.5 ** k for k in range(layers + 1, -1, -1)])


# ---------------------------------------------------------------- moving average of the weights

def test_the_moving_average_follows_its_formula():
    model = build_tiny_model(50)
    average = WeightAverage(model, decay=0.9)
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    for step in range(1, 30):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        average.update(step)
        d = min(0.9, (1 + step) / (10 + step))
        for k, v in model.state_dict().items():
            if v.is_floating_point():
                expected[k] = d * expected[k] + (1 - d) * v
    for k, v in average.model.state_dict().items():
        assert torch.allclose(v, expected[k], atol=1e-5), k
    assert not any(p.requires_grad for p in average.model.parameters())


def test_the_run_saves_the_moving_average_not_the_trained_weights(tmp_path, monkeypatch):
    captured = watch_steps(monkeypatch, lambda run: (
        {k: v.clone() for k, v in run.ema.model.state_dict().items()},
        {k: v.clone() for k, v in run.accelerator.unwrap_model(run.model).state_dict().items()}))
    run = train(demo_config(str(tmp_path / "run"), {**QUICK, "ema_decay": 0.9, "dev_file": ""}))
    averaged, trained = captured[-1]
    saved = load_file(run / "model" / "model.safetensors")
    assert all(torch.equal(saved[k], averaged[k]) for k in saved)
    assert not all(torch.equal(saved[k], trained[k]) for k in saved)


# ---------------------------------------------------------------- adversarial training (FGM)

def qa_batch(vocab=50, n=4, length=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(5, vocab, (n, length), generator=g),
            "attention_mask": torch.ones(n, length, dtype=torch.long),
            "start_positions": torch.randint(1, length, (n,), generator=g),
            "end_positions": torch.randint(1, length, (n,), generator=g)}


def test_the_adversarial_pass_adds_the_gradient_at_the_perturbed_embeddings():
    model, batch = build_tiny_model(50).eval(), qa_batch()        # eval: no dropout, so passes compare
    embeddings = model.get_input_embeddings().weight
    original = embeddings.detach().clone()
    model(**batch).loss.backward()
    clean = {n: p.grad.clone() for n, p in model.named_parameters()}
    direction = 0.5 * clean["bert.embeddings.word_embeddings.weight"]
    direction /= clean["bert.embeddings.word_embeddings.weight"].norm()
    adversarial_backward(model, embeddings, batch, 0.5, torch.Tensor.backward)
    assert torch.equal(embeddings.detach(), original)               # restored bit for bit

    reference = build_tiny_model(50).eval()
    with torch.no_grad():
        reference.get_input_embeddings().weight.add_(direction)
    reference(**batch).loss.backward()
    for n, p in reference.named_parameters():
        assert torch.allclose(dict(model.named_parameters())[n].grad, clean[n] + p.grad, atol=1e-6), n


def test_a_non_finite_gradient_moves_no_embedding():
    model, batch = build_tiny_model(50).eval(), qa_batch()
    embeddings = model.get_input_embeddings().weight
    model(**batch).loss.backward()
    clean = {n: p.grad.clone() for n, p in model.named_parameters()}
    embeddings.grad[3, 0] = float("inf")                               # an fp16 overflow, say
    seen = []
    hook = model.bert.embeddings.word_embeddings.register_forward_hook(lambda m, i, out: seen.append(m.weight.clone()))
    adversarial_backward(model, embeddings, batch, 1.0, torch.Tensor.backward)
    hook.remove()
    assert torch.equal(seen[0], embeddings.detach()) and torch.isfinite(embeddings).all()
    qa = model.qa_outputs.weight.grad
    assert torch.allclose(qa, 2 * clean["qa_outputs.weight"], atol=1e-6)  # the same batch again, unperturbed


def test_training_with_fgm_runs_two_passes_per_batch_and_learns(tmp_path, monkeypatch):
    calls = []
    real = train_module.adversarial_backward
    monkeypatch.setattr(train_module, "adversarial_backward", lambda *a: calls.append(1) or real(*a))
    run = train(demo_config(str(tmp_path / "run"), {**QUICK, "epochs": 6, "fgm_epsilon": 1.0}))
    steps = max(r["step"] for r in read_metrics(run))
    assert len(calls) == steps                                         # batch 8, no accumulation: one per step
    losses = [r["loss"] for r in read_metrics(run) if "loss" in r]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.1


# ---------------------------------------------------------------- answer length

def test_answer_length_is_the_quantile_of_the_training_answers():
    spans = [(0, 0), (3, 4), None, (10, 14), (2, 11)]          # lengths 1, 2, 5, 10 (None: not found)
    assert answer_length_from(spans, 1.0) == 10
    assert answer_length_from(spans, 0.5) == 5                 # 'higher': an observed length, never below it
    assert answer_length_from(spans, 0.0) == 1
    with pytest.raises(ValueError):
        answer_length_from([None], 0.9)


def test_the_run_records_the_answer_length_it_decodes_with_and_resumes(tmp_path):
    cfg = demo_config(str(tmp_path / "run"), {**QUICK, "epochs": 1, "answer_length_quantile": 1.0})
    inputs = load_inputs(cfg)
    longest = max(e - s + 1 for s, e in (a for a in inputs.train_enc.answer_tokens if a))
    assert inputs.cfg.max_answer_length == longest != cfg.max_answer_length
    run = train(cfg)
    assert run_config(run).max_answer_length == longest
    train(dataclasses.replace(cfg, epochs=1), resume=True)         # the same request resumes the run
    assert run_config(run).max_answer_length == longest


def test_every_technique_is_off_by_default():
    cfg = load_config()
    assert (cfg.layer_lr_decay, cfg.ema_decay, cfg.fgm_epsilon, cfg.answer_length_quantile, cfg.tta_strides) == \
        (1.0, 0.0, 0.0, 0.0, "")

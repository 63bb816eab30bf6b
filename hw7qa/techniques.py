"""Opt-in training techniques of Chinese reading-comprehension competitions, each off by default and none a
default before ``bench/accuracy.py`` measures it beating the noise over seeds (docs/benchmarks.md):

- ``layer_lr_decay``: lower layers of the pretrained encoder learn slower, keeping more of their pre-training.
- ``ema_decay``: a moving average of the weights is evaluated and saved, smoothing the last steps' noise.
- ``fgm_epsilon``: the Fast Gradient Method, one more forward and backward pass per step with the word
  embeddings moved along their gradient, the direction that raises the loss most (twice the compute).
- ``answer_length_quantile``: ``max_answer_length`` from the training answers' token lengths, not a fixed 30.
"""
from __future__ import annotations

import copy
import re

import numpy as np
import torch
from torch.optim.swa_utils import get_ema_multi_avg_fn

LAYER_INDEX = re.compile(r"\.layers?\.(\d+)\.")     # encoder.layer.N. (BERT, RoBERTa, XLM-R, ELECTRA)


def layer_depth(name: str, n_layers: int) -> int:
    """Where parameter ``name`` sits, counted from the input: 0 for the embeddings, ``i + 1`` for
    encoder layer ``i``, ``n_layers + 1`` for everything above the encoder (the QA head, a pooler)."""
    if ".embeddings." in f".{name}":
        return 0
    match = LAYER_INDEX.search(f".{name}")
    return int(match.group(1)) + 1 if match else n_layers + 1


def layer_parameter_groups(model: torch.nn.Module, lr: float, weight_decay: float, layer_lr_decay: float
                           ) -> list[dict]:
    """AdamW parameter groups, weight decay on matrices only, with ``lr × layer_lr_decay ** (n_layers + 1 − depth)``
    (``layer_depth``): the full ``lr`` at the top (the first group, so the logged lr is ``lr``), the embeddings
    lowest. With ``layer_lr_decay=1`` (off) two groups: the matrices and the rest."""
    decayed = layer_lr_decay < 1
    n_layers = model.config.num_hidden_layers if decayed else 0
    groups: dict[tuple[int, bool], list] = {}
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            depth = layer_depth(name, n_layers) if decayed else n_layers + 1
            groups.setdefault((depth, parameter.ndim >= 2), []).append(parameter)
    return [{"params": params, "weight_decay": weight_decay if is_matrix else 0.0,
             "lr": lr * layer_lr_decay ** (n_layers + 1 - depth)}
            for (depth, is_matrix), params in sorted(groups.items(), key=lambda kv: (-kv[0][0], not kv[0][1]))]


class WeightAverage:
    """An exponential moving average of a model's floating-point weights, kept in a copy of the model: after
    optimizer step ``t`` (from 1), ``average ← d·average + (1 − d)·weights``, ``d = min(decay, (1+t) / (10+t))``
    (close to the weights at first: the QA head starts random). Updated on the device without waiting for it;
    checkpointed (``state_dict``), so a resumed run continues the same average."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        # views of the weights (the optimizer and load_state change them in place), listed once: listing them at
        # every step would cost host time on every optimizer step
        self.averaged = [t for t in self.model.state_dict().values() if t.is_floating_point()]
        self.current = [t for t in model.state_dict().values() if t.is_floating_point()]

    @torch.no_grad()
    def update(self, step: int) -> None:
        """Fold the followed model's weights after optimizer step ``step`` (counted from 1) into the average."""
        get_ema_multi_avg_fn(min(self.decay, (1 + step) / (10 + step)))(self.averaged, self.current, None)

    def state_dict(self) -> dict:
        return self.model.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state)


def adversarial_backward(model: torch.nn.Module, embeddings: torch.nn.Parameter, batch: dict, epsilon: float,
                         backward) -> None:
    """One more forward and backward pass of ``batch`` through ``model`` (the prepared one) with the word
    ``embeddings`` moved by ``r = epsilon · g / ‖g‖`` (``g``: their gradient so far, fp16's loss-scaled one alike;
    ``r = 0`` where ``g`` is zero or not finite: an fp16 overflow, a step skipped anyway), restored afterwards bit
    for bit; the new gradients add to the ones there. Decided on the device, without a host sync."""
    if embeddings.grad is None:
        return
    saved = embeddings.detach().clone()
    with torch.no_grad():
        norm = embeddings.grad.float().norm()
        usable = torch.isfinite(norm) & (norm > 0)
        scale = torch.where(usable, epsilon / torch.where(usable, norm, 1.0), 0.0)
        embeddings.add_(torch.nan_to_num(embeddings.grad * scale.to(embeddings.grad.dtype)))
    try:
        backward(model(**batch).loss)
    finally:
        with torch.no_grad():
            embeddings.copy_(saved)


def answer_length_from(answer_tokens: list[tuple[int, int] | None], quantile: float) -> int:
    """The ``quantile`` of the training answers' lengths in tokens (``Encoded.answer_tokens``, inclusive spans;
    answers that map to no tokens left out), rounded up; at least 1. ValueError if no answer maps to tokens."""
    lengths = [end - start + 1 for start, end in (span for span in answer_tokens if span is not None)]
    if not lengths:
        raise ValueError("answer_length_quantile: no training answer maps to tokens")
    return max(1, int(np.quantile(lengths, quantile, method="higher")))

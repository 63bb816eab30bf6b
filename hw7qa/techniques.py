"""Opt-in training techniques of Chinese reading-comprehension competitions, each off by default.

- ``layer_lr_decay`` (``layer_parameter_groups``): lower layers of the pretrained encoder keep more
  of what they learned in pre-training; the new QA head learns at the full ``lr``.
- ``ema_decay`` (``WeightAverage``): the weights that are evaluated and saved are an exponential
  moving average of the trained ones, which smooths the last steps' noise.
- ``fgm_epsilon`` (``adversarial_backward``): the Fast Gradient Method. After the usual backward
  pass the word embeddings are moved by ``epsilon`` along their gradient (the direction that raises
  the loss most), the batch runs forward and backward once more, and the embeddings are put back;
  the optimizer steps on the sum of both gradients. Twice the compute per step.
- ``answer_length_quantile`` (``answer_length_from``): ``max_answer_length`` taken from the training
  answers' token lengths instead of a fixed 30.

Each is measured over seeds with ``bench/accuracy.py`` (``--recipes project,project+ema_decay=0.999``);
docs/benchmarks.md says which ones beat the noise. None is a default before it does.
"""
from __future__ import annotations

import copy
import re

import numpy as np
import torch
from torch.optim.swa_utils import get_ema_multi_avg_fn

# ---------------------------------------------------------------- layer-wise learning-rate decay

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


# ---------------------------------------------------------------- moving average of the weights

class WeightAverage:
    """An exponential moving average of a model's floating-point weights, kept in a copy of the model.

    After optimizer step ``t`` (1, 2, ...): ``average ← d·average + (1 − d)·weights`` with
    ``d = min(decay, (1 + t) / (10 + t))``: the average follows the weights closely at first (the
    QA head starts random) and with the full ``decay`` once ``t`` is large. The update runs on the
    device (``torch._foreach_lerp_`` through ``get_ema_multi_avg_fn``) without waiting for it.

    ``state_dict``/``load_state_dict`` make it a checkpointed object
    (``accelerator.register_for_checkpointing``), so a resumed run continues the same average.

    It follows ``model``: the floating-point tensors of both state dicts are listed once, here
    (views of the weights, which the optimizer and ``load_state`` change in place), not at every
    step, where listing them would cost host time on every optimizer step.
    """

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
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


# ---------------------------------------------------------------- adversarial training (FGM)

def adversarial_backward(model: torch.nn.Module, embeddings: torch.nn.Parameter, batch: dict, epsilon: float,
                         backward) -> None:
    """One more forward and backward pass of ``batch`` with the word ``embeddings`` (a weight of
    ``model``) moved by ``epsilon`` along their gradient so far, ``r = epsilon · g / ‖g‖`` (the same
    for fp16's loss-scaled ``g``); restored afterwards bit for bit; the new gradients (scaled alike by
    ``backward``, the accelerator's) add to the ones already there. ``model`` is the prepared
    (possibly DDP-wrapped) model. Where ``g`` is zero or not finite (an fp16 overflow; that step is
    skipped anyway) ``r`` is 0. Decided on the device, without a host sync."""
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


# ---------------------------------------------------------------- answer length

def answer_length_from(answer_tokens: list[tuple[int, int] | None], quantile: float) -> int:
    """The ``quantile`` of the training answers' lengths in tokens (``Encoded.answer_tokens``, inclusive
    spans; answers that map to no tokens left out), rounded up; at least 1. ValueError if no answer
    maps to tokens."""
    lengths = [end - start + 1 for start, end in (span for span in answer_tokens if span is not None)]
    if not lengths:
        raise ValueError("answer_length_quantile: no training answer maps to tokens")
    return max(1, int(np.quantile(lengths, quantile, method="higher")))

"""The optimizer and its schedule: AdamW with weight decay on matrices only (or layer-wise lr, ``layer_lr_decay``),
warmup then the configured decay, and an optimizer step that a non-finite gradient skips on the device."""
from __future__ import annotations

import torch

from .config import Config
from .techniques import layer_parameter_groups


def make_optimizer(model: torch.nn.Module, cfg: Config, device: torch.device) -> torch.optim.AdamW:
    # fused: one kernel updates all parameters, and can skip a step on the device (step_unless)
    groups = layer_parameter_groups(model, cfg.lr, cfg.weight_decay, cfg.layer_lr_decay)
    return torch.optim.AdamW(groups, lr=cfg.lr, fused=device.type in ("cpu", "cuda"))


def make_scheduler(optimizer, cfg: Config, total_steps: int):
    """``transformers.get_scheduler`` warming up over ``warmup_ratio`` of the steps; ``constant`` warms up too."""
    from transformers import get_scheduler
    name = "constant_with_warmup" if cfg.lr_schedule == "constant" else cfg.lr_schedule
    return get_scheduler(name, optimizer, num_warmup_steps=int(cfg.warmup_ratio * total_steps),
                         num_training_steps=total_steps)


def step_unless(optimizer, skip: torch.Tensor) -> None:
    """``optimizer.step()`` unless ``skip`` (a 0-dim bool tensor), deciding on the device where it can."""
    inner = optimizer.optimizer
    if optimizer.scaler is not None:        # fp16: the GradScaler skips non-finite steps by itself
        optimizer.step()
    elif inner.defaults.get("fused"):
        inner.found_inf = skip.float()      # 1: weights, moments and step count left alone
        try:
            optimizer.step()
        finally:
            del inner.found_inf
    elif not bool(skip):                    # any other optimizer asks the host
        optimizer.step()

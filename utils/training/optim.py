"""AdamW with the usual no-decay groups, and the warmup + decay learning-rate schedules."""
from __future__ import annotations

import math
import warnings

import torch
from torch import nn


def build_optimizer(model: nn.Module, learning_rate: float, weight_decay: float) -> torch.optim.AdamW:
    """Biases and norm weights (1-D tensors) get no weight decay, as in HF Trainer and nanoGPT."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("The model has no trainable parameters (all have requires_grad=False). Unfreeze some layers.")
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    groups = [g for g in groups if g["params"]]
    try:
        # The fused kernel (CPU and CUDA in torch >= 2.4): the same update, one kernel for all parameters.
        # Measured 3% more tokens/s on 2 CPU cores, identical validation loss (CLAUDE.md).
        return torch.optim.AdamW(groups, lr=learning_rate, fused=True)
    except (RuntimeError, ValueError, TypeError):  # a device or dtype without the fused kernel
        return torch.optim.AdamW(groups, lr=learning_rate)


def build_scheduler(optimizer, schedule: str, total_steps: int, warmup_steps: int):
    """Linear warmup over ``warmup_steps``, then cosine/linear decay to 0, or constant."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        if schedule == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def rate_from_schedule(optimizer, scheduler) -> None:
    """The next step's learning rate from the (possibly rebuilt) schedule, not the one saved with the optimizer.

    Equal for a plain resume; after raising n_epochs the saved rate belongs to the old curve (0 at a cosine's
    end), and the first resumed step would otherwise run at it.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # get_lr() outside step() warns
        for group, rate in zip(optimizer.param_groups, scheduler.get_lr()):
            group["lr"] = rate

"""AdamW with the usual no-decay groups, the warmup + decay learning-rate schedules, and the optimisation group
of the settings."""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
from torch import nn

from .setting_rules import MATCH, POSITIVE, SettingsGroup, check_float, number, one_of, setting, whole

LR_SCHEDULES = ("cosine", "constant", "linear")
FLOAT32_MAX = 3.4028234663852886e38


def _check_learning_rate(name, value):
    check_float(name, value, low=0.0, hint=" Typical fine-tuning values are 1e-5 to 5e-4.")
    if value > FLOAT32_MAX:
        raise ValueError(f"{name} must be finite in float32 (<= {FLOAT32_MAX:.3g}), got {value:g}: the first update "
                         "would make every weight inf. Typical fine-tuning values are 1e-5 to 5e-4.")


@dataclass
class OptimisationSettings(SettingsGroup):
    learning_rate: float = setting(5e-5, check=_check_learning_rate, resume=MATCH, setup=True, search=True)
    weight_decay: float = setting(0.01, check=number(0.0), resume=MATCH, setup=True, search=True)
    gradient_accumulation_steps: int = setting(1, check=POSITIVE, resume=MATCH, setup=True, search=True)
    # The previous gradient_clip_norm; None disables clipping.
    max_grad_norm: float | None = setting(1.0, check=number(0.0, low_open=True, optional=True,
                                                            hint=" Use None to turn clipping off."),
                                          resume=MATCH, setup=True, search=True)
    lr_schedule: str = setting("cosine", check=one_of(LR_SCHEDULES), resume=MATCH, setup=True, search=True)
    warmup_ratio: float = setting(0.1, check=number(0.0, high=1.0), resume=MATCH, setup=True, search=True)
    # Overrides warmup_ratio when set.
    warmup_steps: int | None = setting(None, check=whole(0, optional=True), resume=MATCH, setup=True, search=True)

    def warmup_steps_for(self, total_steps: int) -> int:
        """``warmup_steps``, else ``warmup_ratio`` of the run's steps."""
        return self.warmup_steps if self.warmup_steps is not None else int(math.ceil(total_steps * self.warmup_ratio))


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

"""Issue 47, the edges of a run: a loss scale that does not depend on log_every, tampered or unreadable meta.json
named as such, a deleted output_dir recreated with a warning, a damaged only checkpoint named and kept aside."""
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from models import TinyCausalLM, random_lines
from utils.tier3_training_utilities import test_fine_tuning

VOCAB, PAD = 50, 0
CONFIG = SimpleNamespace(vocab_size=VOCAB, pad_token_id=PAD)
TRAIN, VAL = random_lines(20, seed=1), random_lines(8, seed=2)
QUIET = dict(progress=False, save_plots=False)


class InfGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return torch.full_like(grad, float("inf"))


class OverflowThenNaN(nn.Module):
    """Training forward ``overflow_at`` gets an infinite gradient (fp16: skipped, scale halved, training goes on);
    from training forward ``nan_from`` on every loss is NaN (the run stops at the first)."""

    def __init__(self, overflow_at, nan_from):
        super().__init__()
        torch.manual_seed(0)
        self.lm, self.overflow_at, self.nan_from, self.calls = TinyCausalLM(vocab_size=VOCAB), overflow_at, nan_from, 0

    def forward(self, idx):
        logits = self.lm(idx)
        if not self.training:
            return logits
        self.calls += 1
        if self.calls == self.overflow_at:
            return InfGradient.apply(logits)
        return logits * float("nan") if self.nan_from is not None and self.calls >= self.nan_from else logits


def _fp16_run(nan_from, **options):
    return test_fine_tuning(OverflowThenNaN(2, nan_from), CONFIG, TRAIN, VAL,
                            **dict(n_epochs=3, batch_size=4, learning_rate=3e-3, shuffle=False, precision="fp16",
                                   **QUIET, **options))


def test_final_loss_scale_is_the_last_applied_steps_whatever_log_every():
    nan_from = 7  # optimizer step 7 (one micro-batch a step); steps 1-6 applied except the overflowed step 2
    # Independent: the same run ended as planned after step 6, reporting the scale its last update left.
    planned = _fp16_run(None, max_steps=nan_from - 1)
    assert planned["completed"] and planned["final_loss_scale"] == 65536.0 / 2  # halved once, at step 2
    for log_every in (1, 10):
        stopped = _fp16_run(nan_from, log_every=log_every)
        assert stopped["non_finite"] and stopped["global_step"] == nan_from - 1, log_every
        assert stopped["final_loss_scale"] == planned["final_loss_scale"], log_every

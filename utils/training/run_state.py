"""The state of one fine-tuning run: what the loop reads and what a checkpoint must carry."""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .distributed import DistContext
from .loss import TokenSums
from .metrics import MetricsTracker
from .model_io import ModelCaller
from .settings import FineTuneSettings


@dataclass
class TrainState:
    """Everything about progress that a checkpoint must carry to continue exactly."""

    epoch: int = 0
    step_in_epoch: int = 0  # optimizer steps already done in ``epoch``
    global_step: int = 0
    epoch_sums: TokenSums = field(default_factory=TokenSums)  # this epoch's training steps so far
    train_seconds: float = 0.0  # this epoch's training phase (no validation)
    run_seconds: float = 0.0  # the whole run: training and validation, every epoch
    train_sequences: int = 0  # sequences trained on, the whole run
    batch_shapes: list = field(default_factory=list)  # distinct [rows, width] of the training micro-batches
    best_val_loss: float = math.inf
    best_epoch: int | None = None
    epochs_without_improvement: int = 0

    @classmethod
    def from_dict(cls, values: dict) -> "TrainState":
        return cls(**dict(values, epoch_sums=TokenSums(**values["epoch_sums"])))

    def start_epoch(self, epoch: int) -> None:
        self.epoch, self.step_in_epoch, self.epoch_sums, self.train_seconds = epoch, 0, TokenSums(), 0.0


@dataclass
class Run:
    model: nn.Module  # the user's module (trained in place)
    train_model: nn.Module  # the same, DDP-wrapped under torchrun
    caller: ModelCaller
    settings: FineTuneSettings
    ctx: DistContext
    device: torch.device
    pad_token_id: int
    train: object  # ExampleBatches or LoaderBatches
    val: object
    optimizer: torch.optim.Optimizer
    scheduler: object
    scaler: torch.amp.GradScaler
    tracker: MetricsTracker
    data_fingerprint: str
    val_fingerprint: str
    run_id: str
    on_evaluation: object = None  # called with (step, val loss, final) after each validation; returns a stop reason or None
    state: TrainState = field(default_factory=TrainState)
    best_weights: dict | None = None
    best_checkpoint: str | None = None
    last_checkpoint: str | None = None

    @property
    def checkpoints_dir(self) -> Path:
        return Path(self.settings.output_dir) / "checkpoints"

    @property
    def amp_enabled(self) -> bool:
        return self.settings.autocast_dtype(self.device) is not None

    def autocast(self):
        dtype = self.settings.autocast_dtype(self.device)
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast("cuda", dtype={"bf16": torch.bfloat16, "fp16": torch.float16}[dtype])

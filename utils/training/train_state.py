"""Progress of one fine-tuning run: the counters, sums and best-so-far a checkpoint must carry to continue exactly."""
from __future__ import annotations

import math
from dataclasses import dataclass, field, fields

from .loss import TokenSums


@dataclass
class TrainState:
    """Everything about progress that a checkpoint must carry to continue exactly."""

    epoch: int = 0
    step_in_epoch: int = 0  # optimizer steps already done in ``epoch``
    global_step: int = 0
    epoch_sums: TokenSums = field(default_factory=TokenSums)  # this epoch's training steps so far
    train_seconds: float = 0.0  # this epoch's training phase (no validation)
    run_seconds: float = 0.0  # the whole run: training and validation, every epoch
    train_sequences: int = 0  # sequences trained on, the whole run (non-counting repeats excluded)
    batch_shapes: list = field(default_factory=list)  # distinct [rows, width] of the training micro-batches
    best_val_loss: float = math.inf
    best_epoch: int | None = None
    epochs_without_improvement: int = 0

    @classmethod
    def from_dict(cls, values: dict) -> "TrainState":
        known = {f.name for f in fields(cls)}  # a DataLoader's order state was kept here before its source kept it
        return cls(**{k: v for k, v in values.items() if k in known and k != "epoch_sums"},
                   epoch_sums=TokenSums(**values["epoch_sums"]))

    def start_epoch(self, epoch: int) -> None:
        self.epoch, self.step_in_epoch, self.epoch_sums, self.train_seconds = epoch, 0, TokenSums(), 0.0

    def note_shapes(self, batches: list[dict]) -> None:
        for batch in batches:  # each new shape costs a warm-up (a recompile under compile=True) on a GPU
            shape = list(batch["input_ids"].shape)
            if shape not in self.batch_shapes:
                self.batch_shapes.append(shape)

    def note_validation(self, epoch: int, val_loss: float) -> bool:
        """Count an epoch's validation toward the best and early stopping; whether it improved (NaN never does)."""
        if not val_loss < self.best_val_loss:
            self.epochs_without_improvement += 1
            return False
        self.best_val_loss, self.best_epoch, self.epochs_without_improvement = val_loss, epoch + 1, 0
        return True

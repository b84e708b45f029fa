"""All keywords of ``test_fine_tuning`` in one object, checked once and logged whole."""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path

LR_SCHEDULES = ("cosine", "constant", "linear")
MIXED_PRECISION = (None, "bf16", "fp16")


@dataclass
class FineTuneSettings:
    n_epochs: int = 3
    learning_rate: float = 5e-5
    batch_size: int = 4
    gradient_accumulation_steps: int = 1
    weight_decay: float = 0.01
    max_grad_norm: float | None = 1.0  # None disables clipping
    lr_schedule: str = "cosine"
    warmup_ratio: float = 0.1
    shuffle: bool = True
    random_seed: int = 42
    group_by_length: bool = True  # see CLAUDE.md: measured faster, same token-weighted loss
    pad_to_multiple_of: int | str | None = "auto"  # "auto": 64 on CUDA (bounded shapes), exact lengths on CPU
    mixed_precision: str | None = None  # "bf16" or "fp16" autocast on CUDA
    val_fraction: float = 0.2
    output_dir: str | None = None
    checkpoint_every: int | None = None
    keep_checkpoints: int = 2
    resume_from_checkpoint: bool | str = False
    early_stopping_patience: int | None = None
    load_best_model_at_end: bool = False
    use_wandb: bool = False
    wandb_project: str | None = None
    wandb_run_name: str | None = None
    wandb_mode: str | None = None
    progress: bool = True
    log_every: int = 10  # optimizer steps between host reads of the loss (progress bar, finiteness check)
    save_plots: bool = True

    def __post_init__(self):
        self.output_dir = str(Path(self.output_dir or os.path.join(os.getcwd(), "outputs", "fine_tuning")))

    def validate(self) -> None:
        """Raise on a setting that cannot work, naming it and the fix, before any work is done."""
        positive_ints = {"batch_size": self.batch_size, "n_epochs": self.n_epochs,
                         "gradient_accumulation_steps": self.gradient_accumulation_steps, "log_every": self.log_every}
        for name, value in positive_ints.items():
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name} must be an int, got {type(value).__name__} ({value!r}).")
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}.")
        if self.learning_rate < 0:
            raise ValueError(f"learning_rate must be >= 0, got {self.learning_rate}. Typical fine-tuning values are 1e-5 to 5e-4.")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}.")
        if self.max_grad_norm is not None and self.max_grad_norm <= 0:
            raise ValueError(f"max_grad_norm must be > 0 or None (no clipping), got {self.max_grad_norm}.")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"Unknown lr_schedule {self.lr_schedule!r}; choose one of {', '.join(LR_SCHEDULES)}.")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}.")
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1), got {self.val_fraction}.")
        if self.mixed_precision not in MIXED_PRECISION:
            raise ValueError(f"mixed_precision must be None, 'bf16' or 'fp16', got {self.mixed_precision!r}.")
        if self.pad_to_multiple_of not in (None, "auto") and (not isinstance(self.pad_to_multiple_of, int) or self.pad_to_multiple_of < 1):
            raise ValueError(f"pad_to_multiple_of must be an int >= 1, None or 'auto', got {self.pad_to_multiple_of!r}.")

    def padding_multiple(self, device) -> int | None:
        """On CUDA every new batch shape costs time the first time it runs; a multiple of 64 bounds the shapes."""
        if self.pad_to_multiple_of == "auto":
            return 64 if device.type == "cuda" else None
        return self.pad_to_multiple_of
        if self.checkpoint_every is not None and self.checkpoint_every < 1:
            raise ValueError(f"checkpoint_every must be >= 1 or None, got {self.checkpoint_every}.")
        if self.keep_checkpoints < 1:
            raise ValueError(f"keep_checkpoints must be >= 1, got {self.keep_checkpoints}.")
        if self.early_stopping_patience is not None and self.early_stopping_patience < 1:
            raise ValueError(f"early_stopping_patience must be >= 1 or None, got {self.early_stopping_patience}.")

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def keyword_names(cls) -> set[str]:
        return {f.name for f in fields(cls)}

"""The logging group of the settings: what a run shows and records (the progress bar, W&B, files, plots) and how
often it reads its rows from the device."""
from __future__ import annotations

from dataclasses import dataclass

from ..setting_rules import FREE, POSITIVE, SettingsGroup, check_bool, check_optional_text, setting


def _check_progress(name, value):
    if value not in (True, False, "all"):
        raise ValueError(f"{name} must be True, False or 'all', got {value!r}.")


@dataclass
class LoggingSettings(SettingsGroup):
    use_wandb: bool = setting(False, check=check_bool, resume=FREE, setup=False, search=True)
    # With W&B: per-layer gradient norms every N optimizer steps, and gradient histograms at the same steps.
    log_grad_dist_every: int = setting(5, check=POSITIVE, resume=FREE, setup=False, search=True)
    log_grad_histogram: bool = setting(False, check=check_bool, resume=FREE, setup=False, search=True)
    wandb_project: str | None = setting(None, check=check_optional_text, resume=FREE, setup=False, search=True)
    wandb_run_name: str | None = setting(None, check=check_optional_text, resume=FREE, setup=False, search=False)
    wandb_group: str | None = setting(None, check=check_optional_text, resume=FREE, setup=False, search=False)
    wandb_mode: str | None = setting(None, check=check_optional_text, resume=FREE, setup=False, search=True)
    progress: bool = setting(True, check=_check_progress, resume=FREE, setup=False, search=False)
    # Optimizer steps between host reads of the step rows (progress bar, W&B, the stop flag).
    log_every: int = setting(10, check=POSITIVE, resume=FREE, setup=False, search=True)
    save_plots: bool = setting(True, check=check_bool, resume=FREE, setup=False, search=True)

"""The checkpoints group of the settings: where a run writes (``output_dir``), when it checkpoints, how many it
keeps, where it stages them and what it resumes from."""
from __future__ import annotations

import hashlib
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ..setting_rules import FREE, POSITIVE, POSITIVE_OR_NONE, SettingsGroup, check_bool, number, setting

GOOGLE_DRIVE_MOUNT = Path("/content/drive")  # where Colab mounts Google Drive (drive.mount)


def _check_resume_target(name, value):
    if not isinstance(value, (bool, str, os.PathLike)):
        raise TypeError(f"{name} must be True/False or a checkpoint folder path, got {type(value).__name__}.")


def _check_output_dir(name, value):
    if Path(value).exists() and not Path(value).is_dir():
        raise ValueError(f"{name}={value!r} is a file, not a folder. Pass a folder path (it is created if missing).")


def _check_staging_dir(name, value):
    if value is not None and value != "auto" and not isinstance(value, (str, os.PathLike)):
        raise TypeError(f"{name} must be a folder path, 'auto' or None, got {type(value).__name__}.")


@dataclass
class CheckpointSettings(SettingsGroup):
    # The run's folder: checkpoints, metrics files and plots (None: ./outputs/fine_tuning).
    output_dir: str | None = setting(None, check=_check_output_dir, resume=FREE, setup=False, search=False)
    checkpoint_every: int | None = setting(None, check=POSITIVE_OR_NONE, resume=FREE, setup=False, search=True)
    keep_checkpoints: int = setting(2, check=POSITIVE, resume=FREE, setup=False, search=True)
    # Also a checkpoint when this many minutes of wall time passed since the last one (a float; with or without
    # checkpoint_every): a Colab VM can disconnect at any time.
    checkpoint_every_minutes: float | None = setting(
        None, check=number(0.0, low_open=True, optional=True, hint=" Pass minutes as a number, e.g. "
                           "checkpoint_every_minutes=30 (or 0.5 for 30 seconds)."),
        resume=FREE, setup=False, search=True)
    # Checkpoints are written here first and copied into output_dir in the background. "auto": a local temporary
    # folder when output_dir is on Google Drive (/content/drive), else None (written into output_dir directly).
    checkpoint_staging_dir: str | None = setting("auto", check=_check_staging_dir, resume=FREE, setup=False,
                                                 search=True)
    # False: training waits for each checkpoint write (as before).
    async_checkpoints: bool = setting(True, check=check_bool, resume=FREE, setup=False, search=True)
    resume_from_checkpoint: bool | str = setting(False, check=_check_resume_target, resume=FREE, setup=False,
                                                 search=False)
    load_best_model_at_end: bool = setting(False, check=check_bool, resume=FREE, setup=False, search=True)

    def __post_init__(self):
        self.output_dir = str(Path(self.output_dir or os.path.join(os.getcwd(), "outputs", "fine_tuning")))

    def check_together(self) -> None:
        value = self.checkpoint_staging_dir
        if value is None or value == "auto":
            return
        staging, output = Path(value).resolve(), Path(self.output_dir).resolve()
        if staging == output or output in staging.parents or staging in output.parents:
            raise ValueError(f"checkpoint_staging_dir={str(value)!r} overlaps output_dir={self.output_dir!r}: it is a "
                             "local folder that checkpoints are written to before they are copied into output_dir. "
                             "Pass a folder outside output_dir on a local disk (e.g. /tmp/staging), or None.")

    @property
    def writes_checkpoints(self) -> bool:
        """Checkpoints only when asked for, or implied by wanting to resume or to get the best model back."""
        return bool(self.checkpoint_every or self.checkpoint_every_minutes or self.resume_from_checkpoint
                    or self.load_best_model_at_end)

    def checkpoint_staging_folder(self) -> Path | None:
        """This run's staging folder (one per output_dir, so two runs never share one), or None: no staging."""
        value = self.checkpoint_staging_dir
        if value == "auto":
            output = Path(self.output_dir).resolve()
            if output != GOOGLE_DRIVE_MOUNT and GOOGLE_DRIVE_MOUNT not in output.parents:
                return None
            value = Path(tempfile.gettempdir()) / "tier3-checkpoint-staging"
        if value is None:
            return None
        return Path(value) / hashlib.sha1(str(Path(self.output_dir).resolve()).encode()).hexdigest()[:12]

"""Checkpoints written in the background (issue 37): the snapshot is the state of its step, failures are not
silent, staging copies complete folders into output_dir, and checkpoint_every_minutes writes by the clock.
Kills during background writes and staging copies: tests/test_random_kills.py."""
import math
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from models import TinyCausalLM, random_lines
from utils.tier3_training_utilities import test_fine_tuning
from utils.training import checkpoint
from utils.training.checkpoint_writer import CheckpointWriteError
from utils.training.settings import FineTuneSettings

CONFIG = SimpleNamespace(vocab_size=50, pad_token_id=0)
TRAIN, VAL = random_lines(32), random_lines(8, seed=1)


def _run(output_dir, model=None, **kwargs):
    torch.manual_seed(0)
    options = dict(n_epochs=1, batch_size=4, progress=False, save_plots=False, output_dir=str(output_dir))
    return test_fine_tuning(model or TinyCausalLM(vocab_size=50, dropout=0.1), CONFIG, TRAIN, VAL, **dict(options, **kwargs))


def _steps(checkpoints_dir):
    return sorted(int(f.name[len(checkpoint.STEP_PREFIX):]) for f in checkpoint.step_folders(checkpoints_dir))


def test_background_checkpoints_hold_the_state_of_their_step(tmp_path):
    # Training goes on while the writer works: a snapshot that shared memory with the live weights or moments
    # would hold a later step's values. The synchronous writes (async_checkpoints=False) are the reference.
    background = _run(tmp_path / "async", checkpoint_every=1, keep_checkpoints=100)
    synchronous = _run(tmp_path / "sync", checkpoint_every=1, keep_checkpoints=100, async_checkpoints=False)
    steps = _steps(tmp_path / "async" / "checkpoints")
    assert steps == _steps(tmp_path / "sync" / "checkpoints") == list(range(1, background["global_step"] + 1))
    for step in steps:
        a = checkpoint.load_checkpoint(tmp_path / "async" / "checkpoints" / f"step-{step}")
        b = checkpoint.load_checkpoint(tmp_path / "sync" / "checkpoints" / f"step-{step}")
        for name, value in b["model.pt"].items():
            assert torch.equal(a["model.pt"][name], value), (step, name)
        for index, moments in b["optimizer.pt"]["state"].items():
            for name, value in moments.items():
                assert torch.equal(a["optimizer.pt"]["state"][index][name], value), (step, index, name)
        untimed = lambda files: {k: v for k, v in files["trainer_state.pt"]["state"].items()  # noqa: E731
                                 if k not in ("train_seconds", "run_seconds")}  # wall time differs between runs
        assert untimed(a) == untimed(b)
        assert torch.equal(a["trainer_state.pt"]["rng"][0]["torch"], b["trainer_state.pt"]["rng"][0]["torch"])
    assert background["last_checkpoint"] == str(tmp_path / "async" / "checkpoints" / f"step-{steps[-1]}")
    assert background["loss_history"] == synchronous["loss_history"]


def test_a_failed_background_write_is_raised_not_silent(tmp_path):
    checkpoints_dir = tmp_path / "checkpoints"
    checkpoints_dir.mkdir(parents=True)
    (checkpoints_dir / ".tmp-step-2").write_text("a file where the writer needs a folder")  # a real OSError
    with pytest.warns(UserWarning, match="Background write failed"), \
            pytest.raises(CheckpointWriteError, match="step-2 could not be written"):
        _run(tmp_path, checkpoint_every=2)
    assert _steps(checkpoints_dir) == []  # nothing written after the failure: the run stopped at the next checkpoint


def test_a_non_finite_stop_waits_for_the_writer_and_reports_its_failure(tmp_path):
    checkpoints_dir = tmp_path / "checkpoints"
    checkpoints_dir.mkdir(parents=True)
    (checkpoints_dir / ".tmp-step-1").write_text("blocks step 1")
    with pytest.warns(UserWarning, match="last checkpoint was not written.*step-1"):
        result = _run(tmp_path, checkpoint_every=1, learning_rate=1e6, max_grad_norm=None, warmup_ratio=0.0,
                      lr_schedule="constant")
    assert "not finite" in result["stop_reason"] and "step-1" in result["checkpoint_error"]


def test_staging_copies_complete_folders_into_output_dir(tmp_path):
    staging, output = tmp_path / "local", tmp_path / "drive"
    result = _run(output, checkpoint_every=2, checkpoint_staging_dir=str(staging), n_epochs=2, keep_checkpoints=2)
    checkpoints_dir = output / "checkpoints"
    steps = _steps(checkpoints_dir)
    assert len(steps) == 2 and steps[-1] == result["global_step"]
    assert result["last_checkpoint"] == str(checkpoints_dir / f"step-{steps[-1]}")
    assert result["best_checkpoint"] == str(checkpoints_dir / "best")
    for folder in [checkpoints_dir / f"step-{s}" for s in steps] + [checkpoints_dir / "best"]:
        checkpoint.verify_folder(folder)
    assert sorted(p.name for p in checkpoints_dir.iterdir()) == sorted(["best"] + [f"step-{s}" for s in steps])
    assert not any(staging.rglob("*.pt"))  # the local copies are gone once published
    again = _run(output, checkpoint_every=2, checkpoint_staging_dir=str(staging), n_epochs=3, resume_from_checkpoint=True)
    assert again["resumed_from_step"] == result["global_step"] < again["global_step"]


def test_staging_is_on_by_default_for_google_drive_only(tmp_path):
    drive = FineTuneSettings(output_dir="/content/drive/MyDrive/run", checkpoint_every=10)
    assert drive.checkpoint_staging_dir == "auto" and drive.checkpoint_staging_folder() is not None
    assert Path("/content/drive") not in drive.checkpoint_staging_folder().parents
    assert FineTuneSettings(output_dir=str(tmp_path)).checkpoint_staging_folder() is None
    other = FineTuneSettings(output_dir=str(tmp_path / "b"), checkpoint_staging_dir=str(tmp_path / "s"))
    assert other.checkpoint_staging_folder().parent == tmp_path / "s"
    assert other.checkpoint_staging_folder() != FineTuneSettings(output_dir=str(tmp_path / "c"),
                                                                 checkpoint_staging_dir=str(tmp_path / "s")).checkpoint_staging_folder()


class SlowLM(TinyCausalLM):
    """A training forward takes at least ``seconds``: steps of known minimum wall time."""

    seconds = 0.03

    def forward(self, idx):
        if self.training:
            time.sleep(self.seconds)
        return super().forward(idx)


def test_checkpoint_every_minutes_writes_by_the_clock(tmp_path):
    minutes = 0.0025  # 0.15 s: a fractional value; steps take >= 0.03 s, the epoch >= 0.03 s x its steps
    started = time.monotonic()
    result = _run(tmp_path, model=SlowLM(vocab_size=50), checkpoint_every_minutes=minutes, keep_checkpoints=1000,
                  log_every=1)
    seconds = time.monotonic() - started
    steps = _steps(tmp_path / "checkpoints")
    mid_epoch = [s for s in steps if s != result["global_step"]]  # the epoch's end has its own checkpoint
    assert steps[-1] == result["global_step"]
    assert len(mid_epoch) >= 1
    assert len(mid_epoch) <= seconds / (60 * minutes)  # never more often than the clock allows
    without = _run(tmp_path / "no-clock", model=SlowLM(vocab_size=50), checkpoint_every=1000)
    assert _steps(tmp_path / "no-clock" / "checkpoints") == [without["global_step"]]


def test_checkpoint_every_minutes_with_checkpoint_every(tmp_path):
    # Steps take >= 0.03 s: 5 steps pass the 0.15 s of the clock before step 6 (the count's first) comes.
    result = _run(tmp_path, model=SlowLM(vocab_size=50), checkpoint_every=6, checkpoint_every_minutes=0.0025,
                  keep_checkpoints=1000)
    steps = set(_steps(tmp_path / "checkpoints"))
    assert set(range(6, result["global_step"], 6)) <= steps
    assert steps - set(range(6, result["global_step"] + 1, 6)) - {result["global_step"]}  # and some by the clock
    assert math.isfinite(result["final_val_loss"])

"""Issue 47, the edges of a run: a loss scale that does not depend on log_every, tampered or unreadable meta.json
named as such, a deleted output_dir recreated with a warning, a damaged only checkpoint named and kept aside."""
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from models import InfGradient, TinyCausalLM, random_lines, wait_for_checkpoint_writes
from utils.tier3_training_utilities import test_fine_tuning
from utils.training.checkpoints import ownership

VOCAB, PAD = 50, 0
CONFIG = SimpleNamespace(vocab_size=VOCAB, pad_token_id=PAD)
TRAIN, VAL = random_lines(20, seed=1), random_lines(8, seed=2)
QUIET = dict(progress=False, save_plots=False)


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


def _train_tiny(output_dir, **options):
    torch.manual_seed(0)
    return test_fine_tuning(TinyCausalLM(vocab_size=VOCAB), CONFIG, TRAIN, VAL,
                            **dict(dict(n_epochs=1, batch_size=4, learning_rate=3e-3, checkpoint_every=2,
                                        keep_checkpoints=3, output_dir=str(output_dir)), **QUIET, **options))


@pytest.fixture(scope="module")
def made_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("made") / "run"
    _train_tiny(folder)
    return folder


def _newest(run_dir):
    return max((run_dir / "checkpoints").glob("step-*"), key=lambda p: int(p.name.split("-")[1]))


def _edit_meta(folder, seal, **changes):
    path = folder / "meta.json"
    meta = json.loads(path.read_text())
    if not seal:
        meta.pop("meta_sha256", None)  # as meta.json was before it was sealed (format 2 and older)
    for key, value in changes.items():
        if isinstance(value, dict):
            meta[key] = dict(meta[key], **value)
        else:
            meta[key] = value
    path.write_text(json.dumps(meta, indent=1))


@pytest.mark.parametrize("change", [{"format_version": None}, {"format_version": "abc"}, {"best_val_loss": 0.5},
                                    {"settings": {"n_epochs": 3}}])
def test_an_edited_meta_json_is_named_as_tampered(made_run, tmp_path, change):
    run = tmp_path / "run"
    shutil.copytree(made_run, run)
    folder = _newest(run)
    _edit_meta(folder, seal=True, **change)
    with pytest.raises(ValueError, match=r"meta\.json.*tampered"):
        _train_tiny(run, resume_from_checkpoint=str(folder))


@pytest.mark.parametrize("value", [None, "abc"])
def test_an_unreadable_format_version_of_an_unsealed_meta_json_is_named(made_run, tmp_path, value):
    run = tmp_path / "run"
    shutil.copytree(made_run, run)
    folder = _newest(run)
    _edit_meta(folder, seal=False, format_version=value)
    with pytest.raises(ValueError, match=rf"{folder}/meta\.json records format_version={value!r}.*tampered"):
        _train_tiny(run, resume_from_checkpoint=True)


def test_a_format_2_checkpoint_still_resumes(made_run, tmp_path):
    """Format 3 only added meta.json's seal: a format 2 meta.json (unsealed) is read as before."""
    run = tmp_path / "run"
    shutil.copytree(made_run, run)
    folder = _newest(run)
    _edit_meta(folder, seal=False, format_version=2)
    result = _train_tiny(run, resume_from_checkpoint=str(folder), n_epochs=2)
    assert result["resumed_from_checkpoint"] == str(folder) and result["completed"]


# -- the output_dir lock and the folder itself --------------------------------------------------------------------
WORKER = Path(__file__).with_name("resume_worker.py")


def _long_run(out_dir):
    """A worker process training for a long while (killed by the test), checkpointing every step."""
    settings = dict(n_epochs=400, checkpoint_every=1, keep_checkpoints=2)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    worker = subprocess.Popen([sys.executable, str(WORKER), "full", str(out_dir), json.dumps(settings)], cwd=out_dir,
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    lock, deadline = out_dir / "run" / ownership.LOCK_FILE, time.time() + 180
    while not (lock.exists() and list((out_dir / "run").glob("checkpoints/step-*"))):
        assert worker.poll() is None and time.time() < deadline, worker.stderr.read()[-2000:] if worker.poll() else ""
        time.sleep(0.1)
    return worker, lock


def test_a_removed_lock_is_restored_and_a_second_process_is_refused(tmp_path):
    worker, lock = _long_run(tmp_path)
    try:
        lock.unlink()  # a cleanup script, a user's rm
        deadline = time.time() + 10  # the check runs every second (ownership.CHECK_SECONDS)
        while not lock.exists() and time.time() < deadline:
            time.sleep(0.05)
        assert lock.exists(), "the live run did not restore its lock"
        for _ in range(10):  # this process is the second one: refused each time while the first lives
            with pytest.raises(RuntimeError, match=rf"Another process \(pid {worker.pid} "):
                ownership.OutputDirLock(lock.parent).__enter__()
            assert worker.poll() is None
            time.sleep(0.1)
    finally:
        worker.kill()
        worker.wait()


def test_a_lock_another_process_took_stops_the_run_before_it_writes(tmp_path):
    worker, lock = _long_run(tmp_path)
    try:
        # Another process took the lock in the moment it was missing: its own lock now stands there.
        taken = lock.with_name("taken.tmp")
        taken.write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "token": "another run"}))
        os.replace(taken, lock)
        worker.wait(timeout=60)
        stderr = worker.stderr.read()
        assert worker.returncode == 1, stderr[-2000:]
        assert f"Training stopped: another process (pid {os.getpid()} on {socket.gethostname()}) took {lock}" in stderr
        assert json.loads(lock.read_text())["token"] == "another run"  # the other run's lock is left alone
    finally:
        worker.kill()
        worker.wait()


class DeletesFolderAt(nn.Module):
    def __init__(self, folder, at):
        super().__init__()
        torch.manual_seed(0)
        self.lm, self.folder, self.at, self.calls = TinyCausalLM(vocab_size=VOCAB), folder, at, 0

    def forward(self, idx):
        if self.training:
            self.calls += 1
            if self.calls == self.at:
                wait_for_checkpoint_writes()  # deleted between two writes (one in flight would fail, and say so)
                gone = self.folder.with_name("deleted")
                os.replace(self.folder, gone)  # gone at once (the run's lock check may not restore into it)
                shutil.rmtree(gone)
        return self.lm(idx)


def test_an_output_dir_deleted_under_the_run_is_warned_when_recreated(tmp_path):
    run = tmp_path / "run"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = test_fine_tuning(DeletesFolderAt(run, at=3), CONFIG, TRAIN, VAL, n_epochs=1, batch_size=4,
                                  checkpoint_every=1, output_dir=str(run), **QUIET)
    said = [str(w.message) for w in caught if "was deleted while this run" in str(w.message)]
    assert len(said) == 1 and f"output_dir {run} " in said[0], [str(w.message) for w in caught]
    assert result["completed"] and Path(result["last_checkpoint"]).is_dir()


def test_a_damaged_only_checkpoint_is_named_as_damaged_and_kept_aside(tmp_path, capsys):
    run = tmp_path / "run"
    _train_tiny(run, keep_checkpoints=1, max_steps=2)
    (only,) = (run / "checkpoints").glob("step-*")
    model_bytes = (only / "model.pt").read_bytes()
    with open(only / "optimizer.pt", "r+b") as handle:  # the disk lost the end of one file
        handle.truncate(100)
    capsys.readouterr()
    with pytest.warns(UserWarning, match=rf"Skipping checkpoint {only}"):
        result = _train_tiny(run, keep_checkpoints=1, max_steps=4, resume_from_checkpoint=True)
    said = capsys.readouterr().out
    assert f"every checkpoint under {run / 'checkpoints'} is damaged ({only.name}: " in said, said
    assert "no checkpoint" not in said and result["resumed_from_step"] is None
    # The new run saved and pruned (keep_checkpoints=1) without deleting it: its intact files are kept aside.
    (aside,) = (run / "checkpoints").glob(f"damaged-*/{only.name}")
    assert (aside / "model.pt").read_bytes() == model_bytes
    assert [p.name for p in (run / "checkpoints").glob("step-*")] == ["step-4"]

"""Checkpoints written in the background (issue 37): the snapshot is the state of its step, failures are not
silent, staging copies complete folders into output_dir, and checkpoint_every_minutes writes by the clock; files
are streamed (hashed while written, handed to the disk in chunks) and still checked on every load.
Kills during background writes and staging copies: tests/test_random_kills.py."""
import hashlib
import io
import json
import math
import os
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from models import BlockedPickle, ForwardWritesLM, TinyCausalLM, random_lines
from utils.tier3_training_utilities import test_fine_tuning
from utils.training.checkpoints import checkpoint
from utils.training.checkpoints import WRITER_NICENESS, CheckpointWriteError, CheckpointWriter
from utils.training.settings import FineTuneSettings

CONFIG = SimpleNamespace(vocab_size=50, pad_token_id=0)
TRAIN, VAL = random_lines(32), random_lines(8, seed=1)


def _run(output_dir, model=None, **kwargs):
    torch.manual_seed(0)
    options = dict(n_epochs=1, batch_size=4, progress=False, save_plots=False, output_dir=str(output_dir))
    return test_fine_tuning(model or TinyCausalLM(vocab_size=50, dropout=0.1), CONFIG, TRAIN, VAL,
                            **dict(options, **kwargs))


def _steps(checkpoints_dir):
    return sorted(int(f.name[len(checkpoint.STEP_PREFIX):]) for f in checkpoint.step_folders(checkpoints_dir))


def test_a_forward_that_changes_its_own_state_still_gets_each_steps_values_checkpointed(tmp_path):
    """Issue 47: the writer copied the weights while the next forward ran, and a forward that changes a parameter
    in place (a frozen EMA, a trained parameter under no_grad) got the next step's value into the checkpoint."""
    torch.manual_seed(0)
    model = ForwardWritesLM(vocab_size=50, ballast=1 << 21, record=True)  # 8 MB first: the copy reaches the rest late
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = _run(tmp_path / "run", model, checkpoint_every=1, keep_checkpoints=100)
    after_step = model.history + [model.written()]  # after_step[k]: as step k left them
    steps = _steps(tmp_path / "run" / "checkpoints")
    assert result["global_step"] == len(after_step) - 1 and steps[-1] == result["global_step"]
    for step in steps:
        saved = torch.load(tmp_path / "run" / "checkpoints" / f"step-{step}" / "model.pt")
        for name, value in after_step[step].items():
            assert torch.equal(saved[name], value), (step, name)
    # The trained parameter the forward shrinks is found by its version counter: that first snapshot is not
    # published (warned), and from then on it is copied at once, so every later step has its checkpoint.
    dropped = [str(w.message) for w in caught if "was not written" in str(w.message)]
    assert len(dropped) == 1 and "gain" in dropped[0] and "ema" not in dropped[0], dropped
    assert steps == list(range(2, result["global_step"] + 1))


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
    again = _run(output, checkpoint_every=2, checkpoint_staging_dir=str(staging), n_epochs=3,
                 resume_from_checkpoint=True)
    assert again["resumed_from_step"] == result["global_step"] < again["global_step"]


def test_staging_is_on_by_default_for_google_drive_only(tmp_path):
    drive = FineTuneSettings(output_dir="/content/drive/MyDrive/run", checkpoint_every=10).checkpoints
    assert drive.checkpoint_staging_dir == "auto" and drive.checkpoint_staging_folder() is not None
    assert Path("/content/drive") not in drive.checkpoint_staging_folder().parents
    assert FineTuneSettings(output_dir=str(tmp_path)).checkpoints.checkpoint_staging_folder() is None
    other = FineTuneSettings(output_dir=str(tmp_path / "b"), checkpoint_staging_dir=str(tmp_path / "s")).checkpoints
    assert other.checkpoint_staging_folder().parent == tmp_path / "s"
    third = FineTuneSettings(output_dir=str(tmp_path / "c"), checkpoint_staging_dir=str(tmp_path / "s")).checkpoints
    assert other.checkpoint_staging_folder() != third.checkpoint_staging_folder()


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


def _payload():
    g = torch.Generator().manual_seed(0)
    # Sizes that are no multiple of the chunk: writes end mid-chunk and chunks straddle the zip records.
    return {"model.pt": {"w": torch.randn(10_001, generator=g), "b": torch.randn(333, generator=g)},
            "optimizer.pt": {"state": {0: {"exp_avg": torch.randn(7_777, generator=g)}}},
            "trainer_state.pt": {"step": 3}}


def _torch_save_bytes(obj) -> bytes:
    """What torch.save writes without the zip records' CRC32 (checkpoint files leave it out: sha256 covers them)."""
    buffer = io.BytesIO()
    before = torch.serialization.get_crc32_options()
    torch.serialization.set_crc32_options(False)
    try:
        torch.save(obj, buffer)
    finally:
        torch.serialization.set_crc32_options(before)
    return buffer.getvalue()


def test_streamed_files_hold_torch_saves_bytes_and_their_sha256(tmp_path, monkeypatch):
    # Files are written in pieces, each hashed just before its write, and handed to the disk in chunks: small
    # sizes put many boundaries inside every record. best/model.pt is written from the same stream.
    monkeypatch.setattr(checkpoint, "WRITE_PIECE", 1000)
    monkeypatch.setattr(checkpoint, "WRITEBACK_CHUNK", 8192)
    payload = _payload()
    step_folder, best_folder = checkpoint.save_step(tmp_path, 3, payload, {"run_id": "r"}, best=True)
    meta = json.loads((step_folder / "meta.json").read_text())
    for name, obj in payload.items():
        written = (step_folder / name).read_bytes()
        assert written == _torch_save_bytes(obj), name
        assert meta["sha256"][name] == hashlib.sha256(written).hexdigest() and meta["files"][name] == len(written)
    assert (best_folder / "model.pt").read_bytes() == (step_folder / "model.pt").read_bytes()
    assert json.loads((best_folder / "meta.json").read_text())["sha256"] == {"model.pt": meta["sha256"]["model.pt"]}
    loaded = checkpoint.load_checkpoint(step_folder)
    assert torch.equal(loaded["model.pt"]["w"], payload["model.pt"]["w"])
    assert checkpoint.verify_folder(best_folder)["run_id"] == "r"
    assert torch.serialization.get_crc32_options()  # the process's own torch.save still writes CRC32s


def test_a_file_changed_after_its_streamed_hash_is_refused_on_load(tmp_path):
    # The sha256 recorded while writing is checked against the file's bytes on every load, also in the process
    # that wrote it: a changed byte with the size and modification time put back is still found.
    step_folder, best_folder = checkpoint.save_step(tmp_path, 3, _payload(), {}, best=True)
    model_file = step_folder / "model.pt"
    stat = model_file.stat()
    raw = bytearray(model_file.read_bytes())
    raw[len(raw) // 2] ^= 0x10
    with open(model_file, "r+b") as handle:  # in place, as a disk or another program would change it
        handle.write(raw)
    os.utime(model_file, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert model_file.stat().st_size == stat.st_size
    with pytest.raises(OSError, match="does not match its sha256"):
        checkpoint.load_checkpoint(step_folder)
    with pytest.warns(UserWarning, match=f"Skipping checkpoint {step_folder}.*sha256"):
        assert checkpoint.find_resumable(tmp_path) is None
    checkpoint.verify_folder(best_folder)  # its own file, not a second name of the step's: still intact


def _niceness(thread_id):
    return os.getpriority(os.PRIO_PROCESS, thread_id)


@pytest.mark.skipif(not hasattr(os, "getpriority") or sys.platform != "linux", reason="per-thread priorities: Linux")
def test_the_writer_gives_way_to_training_until_training_waits_for_it(tmp_path):
    # The writer gives way to training (WRITER_NICENESS); once training waits for the write, it goes back to
    # training's priority (where the process may raise it again).
    blocked, training = BlockedPickle(), _niceness(threading.get_native_id())
    writer = CheckpointWriter(tmp_path, keep=2, note=lambda message: None)
    writer.submit(1, {"model.pt": {"w": torch.ones(4)}, "trainer_state.pt": blocked}, {}, False,
                  lambda step_folder, best_folder: None)
    assert blocked.pickling.wait(timeout=60)
    writer_id = writer.thread.native_id
    assert _niceness(writer_id) == min(training + WRITER_NICENESS, 19)
    waiting = threading.Thread(target=writer.wait)
    waiting.start()
    deadline = time.monotonic() + 10
    while _niceness(writer_id) != training and time.monotonic() < deadline:
        time.sleep(0.01)
    restored = _niceness(writer_id) == training
    if os.geteuid() == 0:
        assert restored
    blocked.release.set()
    waiting.join(timeout=60)
    assert not waiting.is_alive() and writer.error is None
    assert checkpoint.verify_folder(tmp_path / "step-1")["step"] == 1


def _may_raise_priority(niceness):
    import resource

    return os.geteuid() == 0 or resource.getrlimit(resource.RLIMIT_NICE)[0] >= 20 - niceness


@pytest.mark.skipif(not hasattr(os, "getpriority") or sys.platform != "linux", reason="per-thread priorities: Linux")
def test_a_write_waited_for_while_it_copies_the_weights_keeps_trainings_priority(tmp_path):
    # The run's end waits for its last checkpoint at once, while the writer is still copying the weights (at
    # training's priority). It then gave way to training for the whole write, which training was waiting for.
    blocked, training = BlockedPickle(), _niceness(threading.get_native_id())
    if not _may_raise_priority(training):  # a writer that gave way first could not be brought back
        pytest.skip("this process may not raise a thread's priority again")
    weights = torch.ones(32 << 20)  # 128 MB, copied by the writer thread: the wait below comes during the copy
    writer = CheckpointWriter(tmp_path, keep=2, note=lambda message: None)
    writer.submit(1, {"model.pt": {"w": weights}, "trainer_state.pt": blocked}, {}, False,
                  lambda step_folder, best_folder: None, {weights.untyped_storage().data_ptr()})
    waiting = threading.Thread(target=writer.wait)
    waiting.start()
    assert blocked.pickling.wait(timeout=60)
    assert _niceness(writer.thread.native_id) == training
    blocked.release.set()
    waiting.join(timeout=60)
    assert not waiting.is_alive() and writer.error is None
    assert torch.equal(checkpoint.load_checkpoint(tmp_path / "step-1")["model.pt"]["w"], weights)

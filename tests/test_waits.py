"""Waits that say what they wait for (issue 47): a checkpoint write that stalls is named within seconds, Ctrl-C
during the run's end returns the results (metrics files written first), and under torchrun a stopped process is
named, with its step, within ``process_timeout_minutes``."""
import contextlib
import gc
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from models import BlockedPickle
from utils.training.distributed import DistContext, ProcessStalledError, ProcessWatch
from utils.training.settings import FineTuneSettings
from utils.training.checkpoints import WAIT_NOTICE_AFTER_S, CheckpointWriter, load_checkpoint, step_folders

HERE = Path(__file__).parent
NOTICE_DEADLINE_S = 10  # the target: a stalled write is named within 10 s


class Lines:
    """A subprocess's output lines as they arrive, each with its arrival time (time.monotonic)."""

    def __init__(self, process):
        self.lines, self.process = [], process
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self):
        for line in self.process.stdout:
            self.lines.append((time.monotonic(), line.rstrip("\n")))

    def wait_for(self, text, timeout):
        """The first line holding ``text`` and its arrival time, or (None, None) after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = next(((t, line) for t, line in list(self.lines) if text in line), None)
            if found:
                return found
            if self.process.poll() is not None and not self.reader.is_alive():
                break
            time.sleep(0.05)
        return None, None

    def text(self):
        return "\n".join(line for _, line in self.lines)


@pytest.fixture(scope="module")
def stalled_writes(tmp_path_factory):
    """One run (8 steps, checkpoints every 2): the write of step-2 stalls 8 s, so checkpoint step-4 waits for it;
    the write of the epoch's end (step-8) stalls 10 s, so the run's end waits for it until a SIGINT (Ctrl-C)
    comes once the wait was named (or after the deadline, on code that names nothing). The worker then calls again
    with resume_from_checkpoint=True in the same process, while step-8's write is still stalled."""
    out = tmp_path_factory.mktemp("stalls")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", PYTHONUNBUFFERED="1")
    process = subprocess.Popen([sys.executable, str(HERE / "stall_worker.py"), str(out), "2=8", "8=10"], cwd=out,
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines, seen = Lines(process), {}
    try:
        for step, waiter in ((2, "Checkpoint step-4"), (8, "The run's end")):
            seen[f"stall {step}"], marker = lines.wait_for(f"STALL step-{step} ", timeout=120)
            assert marker, lines.text()
            seen[f"stall {step}"] = float(marker.split()[-1])  # the worker's clock: the same monotonic clock
            seen[f"notice {step}"], seen[f"notice line {step}"] = lines.wait_for(
                f"{waiter} waits for checkpoint step-{step}", timeout=NOTICE_DEADLINE_S + 5)
        seen["history before Ctrl-C"] = (out / "run" / "metrics_history.json").exists()
        process.send_signal(signal.SIGINT)
        lines.wait_for("RESULT WRITTEN", timeout=60)
        lines.wait_for("RESUMED WRITTEN", timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
        process.wait()
    result, resumed = (json.loads((out / name).read_text()) if (out / name).exists() else {}
                       for name in ("result.json", "resumed.json"))
    return out, seen, result, resumed, lines.text()


def test_a_checkpoint_waiting_for_a_stalled_write_says_so(stalled_writes):
    out, seen, _, _, text = stalled_writes
    assert seen["notice 2"] is not None, text
    waited = seen["notice 2"] - seen["stall 2"]
    assert WAIT_NOTICE_AFTER_S <= waited <= NOTICE_DEADLINE_S, text
    line = seen["notice line 2"]
    assert str(out / "run" / "checkpoints") in line and "writing its files" in line and " s since" in line


def test_the_runs_end_names_a_stalled_write_and_ctrl_c_returns_the_results(stalled_writes):
    out, seen, result, _, text = stalled_writes
    assert seen["notice 8"] is not None, text
    assert seen["notice 8"] - seen["stall 8"] <= NOTICE_DEADLINE_S, text
    assert seen["history before Ctrl-C"], "metrics_history.json must be written before waiting for the write"
    assert "error" not in result, result
    assert result["completed"] and not result["interrupted"] and result["global_step"] == 8
    assert result["checkpoint_error"] is None and "step-8" in result["checkpoint_pending"]
    # The newest complete checkpoint is named, and it loads; the stalled one is not named.
    assert result["last_checkpoint"] == str(out / "run" / "checkpoints" / "step-6")
    load_checkpoint(Path(result["last_checkpoint"]))
    history = json.loads((out / "run" / "metrics_history.json").read_text())
    assert [row["step"] for row in history["steps"]] == list(range(1, 9)) and len(history["epochs"]) == 1


def test_the_next_call_in_the_process_waits_for_the_write_ctrl_c_left_running(stalled_writes):
    # The write goes on after Ctrl-C, as the results say; the next call into the same folder waits for it (without
    # that it resumed from step-6 while step-8 was still being written) and resumes from it (step-8 completed the
    # run: nothing left to train).
    out, _, _, resumed, text = stalled_writes
    assert resumed.get("resumed_from_step") == 8 and resumed["global_step"] == 8, resumed
    load_checkpoint(out / "run" / "checkpoints" / "step-8")


def _free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _wait_for_file(path, process, timeout):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not path.exists() and process.poll() is None:
        time.sleep(0.1)
    return path.exists()


def test_a_stopped_process_is_named_with_its_step_within_the_timeout(tmp_path):
    timeout_minutes = 0.05  # 3 s
    limit = 60 * timeout_minutes
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    process = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                                f"--master_port={_free_port()}", str(HERE / "stalled_rank_worker.py"), str(tmp_path),
                                str(timeout_minutes)], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    lines = Lines(process)
    try:
        # On code without the watch rank 0 waits for torch's own timeout (30 min on gloo): 60 s is a failure.
        assert _wait_for_file(tmp_path / "rank0.json", process, timeout=60), lines.text()
    finally:
        if (tmp_path / "rank1.json").exists():  # the stopped process: torchrun's SIGTERM cannot end it
            with contextlib.suppress(ProcessLookupError):
                os.kill(json.loads((tmp_path / "rank1.json").read_text())["pid"], signal.SIGKILL)
        try:
            process.wait(timeout=60)
        finally:
            if process.poll() is None:
                process.kill()
    report, stopped = (json.loads((tmp_path / name).read_text()) for name in ("rank0.json", "rank1.json"))
    assert report["error"] == "ProcessStalledError", (report, lines.text())
    assert "rank 1 " in report["message"] and "after optimizer step 6:" in report["message"], report["message"]
    assert f"intact under {tmp_path / 'run' / 'checkpoints'} (newest: step-4)" in report["message"]
    # Named after the limit (the heartbeat's silence), and within it plus the group timeout's three heartbeat
    # periods (0.3 s each here) and 10 s for two loaded cores.
    waited = report["time"] - stopped["stopped_at"]
    assert limit <= waited <= limit + 3 * 0.3 + 10, waited
    assert "stopped responding after optimizer step 6" in lines.text()  # said at once on stderr, too
    # The checkpoints completed before the stop are intact: step 6's needed rank 1 (its state is gathered).
    folders = step_folders(tmp_path / "run" / "checkpoints")
    assert sorted(f.name for f in folders) == ["step-2", "step-4"]
    for folder in folders:
        load_checkpoint(folder)


@pytest.mark.parametrize("value", [0, -1.0, float("nan"), "10"])
def test_a_process_timeout_that_cannot_work_is_refused(value):
    with pytest.raises((ValueError, TypeError), match="process_timeout_minutes"):
        FineTuneSettings.from_keywords({"process_timeout_minutes": value})


@pytest.fixture
def store(monkeypatch):
    return _store_server(monkeypatch)


def _store_server(monkeypatch):
    """A real TCPStore server, as torchrun's agent runs one, at MASTER_ADDR:MASTER_PORT."""
    port = _free_port()
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(port))
    return dist.TCPStore("127.0.0.1", port, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=5))


def _watches(run_key, waiting_for_rank_0=None):
    """The watches of two processes of one run (0.01 minutes: 0.6 s), their optimizer steps 3 and 5."""
    return [ProcessWatch(DistContext(rank, 2), 0.01, progress=lambda step=step: step, run_key=run_key,
                         waiting_for=(lambda: waiting_for_rank_0) if rank == 0 else (lambda: None))
            for rank, step in ((0, 3), (1, 5))]


def test_a_timeout_while_every_process_beats_names_each_ones_step_and_wait(store):
    first, second = _watches("alive", "checkpoint step-3, writing its files into /x (700 s since ...)")
    with first, second:
        time.sleep(1.5)  # more than the limit: both beat all along
        error = first.error_for(RuntimeError("Timed out waiting 1200ms for recv operation"), "CKPT.")
        assert first.error_for(RuntimeError("Connection reset by peer"), "CKPT.") is None  # not a stall: as raised
    assert isinstance(error, ProcessStalledError)
    assert "rank 0 at optimizer step 3, waiting for checkpoint step-3" in str(error)
    assert "rank 1 at optimizer step 5" in str(error) and "CKPT." in str(error)


def test_a_silent_process_and_a_silent_store_are_named(monkeypatch):
    server = _store_server(monkeypatch)  # a server of this test's own: it is shut down below
    first, second = _watches("silent")
    with first:
        with second:
            time.sleep(0.3)
        time.sleep(1.2)  # the second one's thread has stopped: silent for longer than the limit
        error = first.error_for(RuntimeError("Application timeout caused pair closure"), "CKPT.")
        assert isinstance(error, ProcessStalledError)
        assert "Process rank 1 (of 2) stopped responding after optimizer step 3" in str(error), str(error)
        del server  # the store's process is gone (torchrun's agent, or rank 0 holding it)
        gc.collect()
        time.sleep(1.5)
        error = first.error_for(RuntimeError("Timed out"), "CKPT.")
    assert "torchrun's store at 127.0.0.1:" in str(error) and "has not answered" in str(error), str(error)


def test_a_long_wait_is_named_again_at_each_interval_not_once_nor_flooding(tmp_path):
    """The repeat of the stalled-write notice (every WAIT_NOTICE_EVERY_S, 30 s, in a run): here with the intervals
    given to the writer (0.3 s, then every 0.6 s), a write held inside its serialisation (a real pickle that waits)."""
    notes, blocked = [], BlockedPickle()
    writer = CheckpointWriter(tmp_path, keep=2, note=lambda message: notes.append((time.monotonic(), message)),
                              notice_times=(0.3, 0.6))
    writer.submit(1, {"model.pt": {"w": torch.ones(4)}, "trainer_state.pt": blocked}, {}, False,
                  lambda step_folder, best_folder: None)
    assert blocked.pickling.wait(timeout=60)
    waiting = threading.Thread(target=writer.wait, args=("The run's end",))
    started = time.monotonic()
    waiting.start()
    time.sleep(2.2)
    released = time.monotonic() - started
    blocked.release.set()
    waiting.join(timeout=60)
    assert not waiting.is_alive() and writer.error is None
    times = [at - started for at, _ in notes]
    # First after 0.3 s, then one every 0.6 s: 4 before the release (0.3, 0.9, 1.5, 2.1), give or take a loaded
    # core. On a loaded core the write may still be finishing 0.6 s after the release: a notice then is right.
    assert 3 <= sum(at < released for at in times) <= 4 and times[0] >= 0.3, times
    assert all(later - earlier >= 0.6 for earlier, later in zip(times, times[1:])), times
    assert all("The run's end waits for checkpoint step-1, writing its files into" in message and "Ctrl-C" in message
               for _, message in notes), notes
    assert load_checkpoint(tmp_path / "step-1")["model.pt"]["w"].sum() == 4

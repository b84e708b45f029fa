"""Waits that say what they wait for (issue 47): a checkpoint write that stalls is named within seconds, Ctrl-C
during the run's end returns the results (metrics files written first), and under torchrun a stopped process is
named, with its step, within ``process_timeout_minutes``."""
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from utils.training.checkpoints import WAIT_NOTICE_AFTER_S, load_checkpoint

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
    the write of the epoch's end (step-8) stalls 120 s, so the run's end waits for it until a SIGINT (Ctrl-C)
    comes once the wait was named (or after the deadline, on code that names nothing)."""
    out = tmp_path_factory.mktemp("stalls")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", PYTHONUNBUFFERED="1")
    process = subprocess.Popen([sys.executable, str(HERE / "stall_worker.py"), str(out), "2=8", "8=120"], cwd=out,
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
    finally:
        if process.poll() is None:
            process.kill()
        process.wait()
    result = json.loads((out / "result.json").read_text()) if (out / "result.json").exists() else {}
    return out, seen, result, lines.text()


def test_a_checkpoint_waiting_for_a_stalled_write_says_so(stalled_writes):
    out, seen, _, text = stalled_writes
    assert seen["notice 2"] is not None, text
    waited = seen["notice 2"] - seen["stall 2"]
    assert WAIT_NOTICE_AFTER_S <= waited <= NOTICE_DEADLINE_S, text
    line = seen["notice line 2"]
    assert str(out / "run" / "checkpoints") in line and "writing its files" in line and " s since" in line


def test_the_runs_end_names_a_stalled_write_and_ctrl_c_returns_the_results(stalled_writes):
    out, seen, result, text = stalled_writes
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

"""Who owns an ``output_dir``: one run id per folder, and one live process writing into it at a time."""
from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
import warnings
from pathlib import Path

RUN_FILE = "run.json"
LOCK_FILE = ".lock"
HEARTBEAT_SECONDS = 20  # the lock's owner touches it this often
STALE_AFTER_SECONDS = 90  # a lock from another machine untouched this long belongs to a dead run (Colab VM gone)


def claim_run_id(output_dir: Path, *, resuming: bool, writes_checkpoints: bool, has_checkpoints: bool) -> str:
    """The run id recorded in ``output_dir/run.json``: kept when resuming, new for a fresh run.

    A fresh run that would write checkpoints into a folder holding another run's checkpoints is refused:
    pruning and ``resume_from_checkpoint=True`` would otherwise mix the two runs.
    """
    path = output_dir / RUN_FILE
    recorded = json.loads(path.read_text()).get("run_id") if path.exists() else None
    if resuming and has_checkpoints and recorded:
        return recorded
    if writes_checkpoints and has_checkpoints and not resuming:
        raise ValueError(
            f"{output_dir} already holds checkpoints of another run (run id {recorded or 'unknown'}). Continue that run "
            "with resume_from_checkpoint=True, or start a new one in another output_dir (or delete "
            f"{output_dir / 'checkpoints'}).")
    run_id = uuid.uuid4().hex[:12]
    output_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"run_id": run_id, "host": socket.gethostname(), "pid": os.getpid(), "started": time.time()}))
    return run_id


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class OutputDirLock:
    """``output_dir/.lock`` with the owner's pid and host, refreshed by a heartbeat while the run lives.

    A lock whose process is gone (same host) or whose heartbeat stopped (another host, e.g. a Colab VM
    that disconnected) is taken over with a warning; a live one stops this run with a clear error.
    """

    def __init__(self, output_dir: Path):
        self.path = Path(output_dir) / LOCK_FILE
        self._stop = threading.Event()
        self._thread = None

    def __enter__(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        me = {"pid": os.getpid(), "host": socket.gethostname()}
        while True:
            try:
                descriptor = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                self._take_over_if_stale(me)
                continue
            with os.fdopen(descriptor, "w") as handle:
                json.dump(me, handle)
            break
        self._thread = threading.Thread(target=self._heartbeat, daemon=True)
        self._thread.start()
        return self

    def _take_over_if_stale(self, me: dict) -> None:
        try:
            owner = json.loads(self.path.read_text() or "{}")
            age = time.time() - self.path.stat().st_mtime
        except (OSError, ValueError):
            owner, age = {}, STALE_AFTER_SECONDS + 1  # unreadable or vanished: not a live owner
        same_host = owner.get("host") == me["host"]
        live = (owner.get("pid") != me["pid"] and _alive(int(owner.get("pid", 0) or 0))) if same_host else age < STALE_AFTER_SECONDS
        if live:
            raise RuntimeError(
                f"Another process (pid {owner.get('pid')} on {owner.get('host')}) is writing into {self.path.parent}. "
                "Two runs in one output_dir would overwrite each other's checkpoints and metrics: wait for it to end, or "
                f"pass another output_dir. If that process is gone, delete {self.path}.")
        if owner.get("pid") != me["pid"]:
            warnings.warn(f"Taking over the lock of a run that is no longer alive (pid {owner.get('pid')} on "
                          f"{owner.get('host')}) in {self.path.parent}.", UserWarning, stacklevel=4)
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_SECONDS):
            try:
                os.utime(self.path)
            except OSError:
                return

    def __exit__(self, *exc) -> None:
        self._stop.set()
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass

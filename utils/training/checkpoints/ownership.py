"""Who owns an ``output_dir``: one run id per folder, and one live process writing into it at a time."""
from __future__ import annotations

import contextlib
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
TAKEOVER_STALE_SECONDS = 10  # a takeover takes milliseconds; a takeover file this old was left by a killed process


def claim_run_id(output_dir: Path, *, resuming: bool, writes_checkpoints: bool, has_checkpoints: bool) -> str:
    """The run id recorded in ``output_dir/run.json``: kept when resuming, new for a fresh run.

    A fresh run that would write checkpoints into a folder holding another run's checkpoints is refused:
    pruning and ``resume_from_checkpoint=True`` would otherwise mix the two runs.
    """
    path = output_dir / RUN_FILE
    recorded = _recorded_run_id(path)
    if resuming and has_checkpoints and recorded:
        return recorded
    if writes_checkpoints and has_checkpoints and not resuming:
        raise ValueError(
            f"{output_dir} already holds checkpoints of another run (run id {recorded or 'unknown'}). Continue that "
            "run with resume_from_checkpoint=True, or start a new one in another output_dir (or delete "
            f"{output_dir / 'checkpoints'}).")
    run_id = uuid.uuid4().hex[:12]
    output_dir.mkdir(parents=True, exist_ok=True)
    _write_json_atomically(path, {"run_id": run_id, "host": socket.gethostname(), "pid": os.getpid(),
                                  "started": time.time()})
    return run_id


def _recorded_run_id(path: Path) -> str | None:
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text()).get("run_id")
    except (OSError, ValueError, AttributeError) as error:
        warnings.warn(f"{path} is damaged ({type(error).__name__}: {error}); it is rewritten with a new run id. The "
                      "checkpoints in this folder are still used when resuming.", UserWarning, stacklevel=4)
        return None


def _write_json_atomically(path: Path, value: dict) -> None:
    """Temp file, fsync, rename: a kill at any moment leaves the old file or the new one, never an empty one."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as handle:
        json.dump(value, handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


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

    def _read_owner(self) -> tuple[dict, float, str | None]:
        """The lock's owner, its age, and its raw text (None when the lock is gone)."""
        try:
            text = self.path.read_text()
            age = time.time() - self.path.stat().st_mtime
        except OSError:
            return {}, STALE_AFTER_SECONDS + 1, None
        try:
            owner = json.loads(text or "{}")
        except ValueError:
            owner = {}  # half-written by an owner killed at that moment: not a live owner
        return owner if isinstance(owner, dict) else {}, age, text

    def _take_over_if_stale(self, me: dict) -> None:
        owner, age, text = self._read_owner()
        same_host = owner.get("host") == me["host"]
        live = ((owner.get("pid") != me["pid"] and _alive(int(owner.get("pid", 0) or 0))) if same_host
                else age < STALE_AFTER_SECONDS)
        if live:
            raise RuntimeError(
                f"Another process (pid {owner.get('pid')} on {owner.get('host')}) is writing into {self.path.parent}. "
                "Two runs in one output_dir would overwrite each other's checkpoints and metrics: wait for it to end, "
                f"or pass another output_dir. If that process is gone, delete {self.path}.")
        if text is None:
            return  # gone meanwhile: try to create it again
        # Check and unlink are two steps: two processes seeing the same stale lock could both remove it and the
        # second would remove the first one's new lock. A takeover file, created with O_EXCL, lets one at a time
        # re-read the lock and remove it only if it is still the stale one it judged.
        guard = self.path.with_name(LOCK_FILE + ".takeover")
        try:
            descriptor = os.open(guard, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            with contextlib.suppress(OSError):
                if time.time() - guard.stat().st_mtime > TAKEOVER_STALE_SECONDS:
                    guard.unlink()  # left by a process killed during its takeover
            time.sleep(0.02)
            return
        try:
            if self._read_owner()[2] == text:
                if owner.get("pid") != me["pid"]:
                    warnings.warn(f"Taking over the lock of a run that is no longer alive (pid {owner.get('pid')} on "
                                  f"{owner.get('host')}) in {self.path.parent}.", UserWarning, stacklevel=4)
                with contextlib.suppress(FileNotFoundError):
                    self.path.unlink()
        finally:
            os.close(descriptor)
            with contextlib.suppress(FileNotFoundError):
                guard.unlink()

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

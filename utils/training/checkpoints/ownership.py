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
from ..warn import caller_stacklevel

RUN_FILE = "run.json"
LOCK_FILE = ".lock"
HEARTBEAT_SECONDS = 20  # the lock's owner touches it this often
# ... and checks this often that it is still there and still its own: a lock removed under a live run (a cleanup
# script, a user's rm) is restored before another process can start a run there (a start-up takes seconds).
CHECK_SECONDS = 1.0
STALE_AFTER_SECONDS = 90  # a lock from another machine untouched this long belongs to a dead run (Colab VM gone)
TAKEOVER_STALE_SECONDS = 10  # a takeover takes milliseconds; a takeover file this old was left by a killed process


class OutputDirTaken(RuntimeError):
    """Another process took the lock of the ``output_dir`` this run writes into."""


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
                      "checkpoints in this folder are still used when resuming.",
                      UserWarning, stacklevel=caller_stacklevel())
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
        self.lost: str | None = None  # why this run no longer owns output_dir (another process took the lock)
        self._holding = threading.Lock()

    def __enter__(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # The token tells this lock from one another process (or a later run of this process) wrote.
        me = {"pid": os.getpid(), "host": socket.gethostname(), "token": uuid.uuid4().hex}
        while not self._create(me):
            self._take_over_if_stale(me)
        self.me, self.folder = me, FolderWatch(self.path.parent)
        _HELD[str(self.path.parent.resolve())] = self
        self._thread = threading.Thread(target=self._heartbeat, daemon=True)
        self._thread.start()
        return self

    def _create(self, owner: dict) -> bool:
        """Create the lock holding ``owner``, unless one exists. A hard link of a complete file makes it appear
        whole: a process reading it at that moment never sees it empty (and takes no live owner for a dead one).
        Where links are not supported (some network mounts), O_EXCL and a write."""
        tmp = self.path.with_name(f"{LOCK_FILE}.{owner['token']}.tmp")
        tmp.write_text(json.dumps(owner))
        try:
            os.link(tmp, self.path)
            return True
        except FileExistsError:
            return False
        except OSError:
            try:
                descriptor = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                return False
            with os.fdopen(descriptor, "w") as handle:
                json.dump(owner, handle)
            return True
        finally:
            with contextlib.suppress(OSError):
                tmp.unlink()

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
                                  f"{owner.get('host')}) in {self.path.parent}.",
                                  UserWarning, stacklevel=caller_stacklevel())
                with contextlib.suppress(FileNotFoundError):
                    self.path.unlink()
        finally:
            os.close(descriptor)
            with contextlib.suppress(FileNotFoundError):
                guard.unlink()

    def _heartbeat(self) -> None:
        last_touch = time.monotonic()
        while not self._stop.wait(CHECK_SECONDS) and self.lost is None:
            try:
                if self._hold() and time.monotonic() - last_touch >= HEARTBEAT_SECONDS:
                    os.utime(self.path)
                    last_touch = time.monotonic()
            except OSError:
                pass  # a folder that cannot be reached now (a Drive mount reconnecting): try again next time

    def _hold(self) -> bool:
        """Whether the lock is still this run's, restoring it when it was removed; sets ``lost`` when another
        process holds it now."""
        with self._holding:  # the heartbeat and the training thread (at a checkpoint) never restore it both
            return self._hold_unlocked()

    def _hold_unlocked(self) -> bool:
        replaced = self.folder.warn_if_replaced()
        owner, _, text = self._read_owner()
        if text is not None:
            if owner.get("token") == self.me["token"]:
                return True
            self.lost = (f"another process (pid {owner.get('pid')} on {owner.get('host')}) took {self.path} while this "
                         f"run (pid {self.me['pid']}) was writing into {self.path.parent}")
            return False
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if not self._create(self.me):  # another process created it meanwhile: theirs, and this run stops writing
            return self._hold_unlocked()
        if not replaced:  # a deleted output_dir took the lock with it: warned as such
            warnings.warn(f"{self.path} was removed while this run (pid {self.me['pid']}) writes into "
                          f"{self.path.parent}; it is restored, so no other run starts there meanwhile. Remove it "
                          "only after the run ends.", UserWarning, stacklevel=caller_stacklevel())
        return True

    def __exit__(self, *exc) -> None:
        self._stop.set()
        _HELD.pop(str(self.path.parent.resolve()), None)
        if self._thread is not None:  # a check stalled on a hung network mount must not hold up the run's end
            self._thread.join(timeout=5 * CHECK_SECONDS)
        if self.lost is None and self._read_owner()[0].get("token") == self.me["token"]:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()


_HELD: dict[str, OutputDirLock] = {}  # output_dir -> the lock this process holds there


def lost_ownership(output_dir) -> str | None:
    """Why this process may no longer write into ``output_dir`` (another process took its lock), else None."""
    held = _HELD.get(str(Path(output_dir).resolve()))
    if held is None:
        return None
    if held.lost is None:
        held._hold()  # now, not at the next heartbeat: nothing is written into a folder another run owns
    return held.lost


class FolderWatch:
    """Notices an ``output_dir`` deleted under a live run (its files then come back in a new, empty folder):
    the folder missing, another folder in its place, or its ``run.json`` gone. Warns once a run."""

    def __init__(self, folder: Path):
        self.folder, self.warned = Path(folder), False
        self.identity, self.had_run_file = self._identity(), (self.folder / RUN_FILE).exists()

    def _identity(self):
        try:
            found = self.folder.stat()
        except OSError:
            return None
        return found.st_dev, found.st_ino

    def warn_if_replaced(self) -> bool:
        self.had_run_file = self.had_run_file or (self.folder / RUN_FILE).exists()
        identity = self._identity()
        replaced = identity != self.identity or (self.had_run_file and not (self.folder / RUN_FILE).exists())
        if not replaced or self.identity is None or self.warned:
            return replaced
        self.warned = True
        warnings.warn(f"output_dir {self.folder} was deleted while this run was writing into it: the checkpoints and "
                      "metrics files written before are gone, and the run goes on writing into a new, recreated folder "
                      "(its checkpoints from here on). If that was not meant, stop the run and restore the folder.",
                      UserWarning, stacklevel=caller_stacklevel())
        return True

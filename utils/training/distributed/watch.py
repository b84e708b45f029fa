"""Under torchrun: a process that stops responding is named, with its rank and step, within
``process_timeout_minutes``, instead of leaving the others silent inside a collective for torch's timeout (30 min
on gloo, 10 on NCCL).

Every process runs a :class:`ProcessWatch` thread. Every ``heartbeat_period`` seconds it publishes a heartbeat in
the launch's key-value store (torchrun's TCPStore at ``MASTER_ADDR:MASTER_PORT``, through a client of its own with a
short timeout): a counter, the process's optimizer step and the checkpoint write it waits for, if any; and it
reads the others'. A process whose heartbeat has not changed for the limit has stopped (SIGSTOP, a frozen or
swapped-out VM, a lost node): every watch says so on stderr at once. When the package starts the process group,
the group's timeout is the limit plus three periods, so the collective the others wait in raises soon after; the
run then ends as after any error (metrics files written, rank 0's write in flight completed, the checkpoints
before it intact) and :meth:`ProcessWatch.error_for` turns the collective's error into a
:class:`ProcessStalledError` naming the process and the step.

The heartbeat comes from a thread, so a process whose main thread is only busy (rank 0 waiting for a slow
checkpoint write while the others wait for rank 0) still beats: when a collective times out with every process
alive, the error names what each one waits for.
"""
from __future__ import annotations

import itertools
import json
import os
import sys
import threading
import time
import warnings
from datetime import timedelta

import torch.distributed as dist

from .processes import DistContext
from ..warn import caller_stacklevel

KEY_PREFIX = "tier3-heartbeat"
# Every process counts its runs alike (each fine_tune call builds one watch on every rank): the heartbeats of an
# earlier run in the same launch, whose threads have stopped, are never read as this run's.
_run_numbers = itertools.count()


class ProcessStalledError(RuntimeError):
    """A process of the run stopped responding; the checkpoints written before it stopped are intact."""


def heartbeat_period(limit_s: float) -> float:
    """Seconds between heartbeats: a tenth of the limit, at least 0.2 s and at most 15 s."""
    return min(max(limit_s / 10, 0.2), 15.0)


def group_timeout_s(limit_s: float) -> float:
    """The process group's timeout for a limit: long enough that a stopped process's silence is seen first."""
    return limit_s + 3 * heartbeat_period(limit_s)


def _timed_out(error: BaseException) -> bool:
    text = str(error).lower()
    return "timed out" in text or "timeout" in text


class ProcessWatch:
    """The heartbeat thread of one process for one run (a context manager; nothing in one process)."""

    def __init__(self, ctx: DistContext, limit_minutes: float, *, progress, waiting_for=lambda: None,
                 run_key: str | None = None):
        self.ctx, self.limit_minutes, self.limit = ctx, limit_minutes, 60.0 * limit_minutes
        self.period = heartbeat_period(self.limit)
        self.progress, self.waiting_for = progress, waiting_for  # () -> optimizer step; () -> a write in words
        # The run's keys: the same on every process of the run (``run_key``, else this process's run count).
        self.key = f"{KEY_PREFIX}/{run_key if run_key is not None else next(_run_numbers)}"
        self.store_failures = 0
        self.store, self.thread, self.stopped = None, None, threading.Event()
        self.beats, self.started = 0, time.monotonic()
        self.seen: dict[int, tuple] = {}  # rank -> (heartbeat, step, waiting for, when it last changed here)
        self.store_answered = self.started
        self.reported: set = set()

    # -- the thread ------------------------------------------------------------------------------------
    def __enter__(self) -> ProcessWatch:
        address = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
        if not self.ctx.enabled or None in address:
            return self
        try:  # a client of its own: its short timeout never touches the process group's use of the store
            self.store = dist.TCPStore(address[0], int(address[1]), is_master=False, wait_for_workers=False,
                                       timeout=timedelta(seconds=max(2 * self.period, 1.0)))
        except Exception as error:  # noqa: BLE001 - the run goes on; only the early naming of a stall is lost
            warnings.warn(f"The process watch cannot reach torchrun's store at {address[0]}:{address[1]} "
                          f"({type(error).__name__}: {error}); a stopped process is then found only by the "
                          "process group's timeout, without its name.", UserWarning, stacklevel=caller_stacklevel())
            return self
        self.started = self.store_answered = time.monotonic()
        self.thread = threading.Thread(target=self._run, name="tier3-process-watch", daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc) -> bool:
        self.stopped.set()
        if self.thread is not None:
            # Joined (a store call in flight ends within its own short timeout): a daemon thread still inside a
            # store call when the interpreter exits aborted the process ("terminate called without an active
            # exception", SIGABRT) after a run that had completed.
            # A beat is at most three store calls, each ending within the client's timeout.
            self.thread.join(timeout=3 * max(2 * self.period, 1.0) + 1.0)
        # The client is closed here, while the interpreter is whole, not by whichever finaliser reaches it at exit.
        self.store = None
        return False

    def _run(self) -> None:
        # After failed store calls the pause doubles (up to 8 periods): torch logs every failed call with its
        # stack, and a store that is gone stays gone.
        while not self.stopped.wait(0 if not self.beats else self.period * min(2 ** self.store_failures, 8)):
            self.beat()

    def beat(self) -> None:
        """Publish this process's heartbeat, read the others', and say at once when one has stopped."""
        self.beats += 1
        now = time.monotonic()
        try:
            self.store.set(f"{self.key}/{self.ctx.rank}", json.dumps([self.beats, self.progress(), self.waiting_for()]))
            for rank in range(self.ctx.world_size):
                key = f"{self.key}/{rank}"
                if rank != self.ctx.rank and self.store.check([key]):
                    beat, step, waiting = json.loads(self.store.get(key))
                    before = self.seen.get(rank)
                    changed = now if before is None or before[0] != beat else before[3]
                    self.seen[rank] = (beat, step, waiting, changed)
            self.store_answered, self.store_failures = now, 0
        except Exception:  # noqa: BLE001 - the store did not answer in time: judged below by how long
            self.store_failures += 1
        stalled = self.stalled_ranks(now)
        if stalled and not self.reported.issuperset(stalled):
            self.reported.update(stalled)
            sys.stderr.write(f"[rank {self.ctx.rank}] {self.describe(stalled, now)} The run stops when the "
                             "collective this process waits in times out.\n")
            sys.stderr.flush()

    # -- what it found ----------------------------------------------------------------------------------
    def stalled_ranks(self, now: float) -> list:
        """Ranks silent for longer than the limit (``"store"``: the store itself did not answer that long)."""
        if self.thread is None:
            return []
        if now - self.store_answered > self.limit:
            return ["store"]
        return [rank for rank in range(self.ctx.world_size) if rank != self.ctx.rank
                and now - self.seen.get(rank, (None, None, None, self.started))[3] > self.limit]

    def describe(self, stalled: list, now: float) -> str:
        limit = f"process_timeout_minutes={self.limit_minutes:g}"
        if stalled == ["store"]:
            return (f"torchrun's store at {os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')} has not "
                    f"answered for {now - self.store_answered:.0f} s ({limit}): the process that holds it (torchrun's "
                    "agent, or rank 0) stopped, or the network between the machines is down.")
        silent = max(now - self.seen.get(rank, (None, None, None, self.started))[3] for rank in stalled)
        names = ", ".join(map(str, stalled))
        return (f"Process rank {names} (of {self.ctx.world_size}) stopped responding after optimizer step "
                f"{self.progress()}: no heartbeat for {silent:.0f} s ({limit}) while rank {self.ctx.rank} waited for "
                "it.")

    def error_for(self, error: BaseException, checkpoints: str) -> ProcessStalledError | None:
        """The error to raise instead of ``error`` (a collective that failed), or None when no process stalled.
        ``checkpoints`` says where the intact checkpoints are."""
        if self.thread is None:
            return None
        now = time.monotonic()
        stalled = self.stalled_ranks(now)
        if stalled:
            return ProcessStalledError(
                f"{self.describe(stalled, now)} {checkpoints} Find why it stopped (a stopped or swapped-out process, "
                "a frozen VM, a hung GPU, a lost node), then resume with resume_from_checkpoint=True; raise "
                "process_timeout_minutes if the processes are slow but alive.")
        if not _timed_out(error):
            return None
        states = {rank: (step, waiting) for rank, (_, step, waiting, _) in self.seen.items()}
        states[self.ctx.rank] = (self.progress(), self.waiting_for())
        waits = [f"rank {rank} at optimizer step {step}" + (f", waiting for {waiting}" if waiting else "")
                 for rank, (step, waiting) in sorted(states.items())]
        return ProcessStalledError(
            f"A collective between the processes timed out (process_timeout_minutes={self.limit_minutes:g}) while "
            f"every process still sent heartbeats: {'; '.join(waits)}. {checkpoints} A process that waits for a slow "
            "checkpoint write holds the others: give it faster storage or raise process_timeout_minutes, then "
            "resume with resume_from_checkpoint=True.")

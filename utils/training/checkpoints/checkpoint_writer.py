"""Checkpoints that do not stop training: the loop takes a host snapshot, one background thread writes it.

At a checkpoint the training thread only copies what ``Trainer.state_dict()`` returns into host memory: into
buffers kept from one checkpoint to the next (no fresh allocation, no page faults after the first), pinned on
CUDA so that the device-to-host copies queue on the stream and the thread does not wait for them. On CPU the copy
is required: training updates the weights and the optimizer's moments in place. One thread then does the rest
(serialisation with each file's sha256, fsyncs, renames, ``best/``, pruning; with a staging folder also the copy
to ``output_dir``) in the order :mod:`checkpoint` defines, so a kill at any moment leaves the newest complete
checkpoint as it was. It gives way to training (``WRITER_NICENESS``) until training waits for it.

At most one write is in flight: the next checkpoint first waits for the previous one (its buffers are reused).
When the first snapshot would take more than half the memory still available, checkpoints are written
synchronously instead (a note says so): a snapshot may double the state in host memory, and running out of it
would end the run. A failed write warns when it fails and is raised at the next checkpoint or at the run's end.

A wait for the write in flight (the run's end, or the next checkpoint) that lasts says so: after
``WAIT_NOTICE_AFTER_S`` and then every ``WAIT_NOTICE_EVERY_S`` a message names the checkpoint, what the writer is
doing and where (writing files, copying from staging into ``output_dir``, pruning), and for how long, and that
Ctrl-C stops the wait (a hung network mount, e.g. Google Drive, otherwise shows nothing but a still progress bar).
"""
from __future__ import annotations

import copy
import ctypes
import errno
import os
import shutil
import threading
import time
import warnings
import weakref
from collections import OrderedDict
from pathlib import Path

import torch

from . import checkpoint as ckpt
from ..warn import caller_stacklevel

# The writer runs below the training threads' priority on Linux (threads have their own nice value): on a
# machine with few cores its serialisation and hashing give way to the training step instead of slowing it.
WRITER_NICENESS = 10
WRITER_THREAD_PREFIX = "checkpoint-writer"  # the writer thread's name: checkpoint-writer-step-<N>
_ATOMS = (int, float, str, bool, bytes, type(None))
# A checkpoint's write usually ends within a second or two here (README: the stall table); one still running after
# this long is slow storage or a hung mount, and whoever waits for it is told, then again at this interval.
WAIT_NOTICE_AFTER_S = 5.0
WAIT_NOTICE_EVERY_S = 30.0


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written; the checkpoints written before it are intact."""


class SnapshotChanged(Exception):
    """The model's forward changed a deferred tensor in place while the snapshot was being taken."""

    def __init__(self, changed: list[tuple[tuple, torch.Tensor]]):
        super().__init__(", ".join("/".join(map(str, path)) for path, _ in changed))
        self.storages = {value.untyped_storage().data_ptr() for _, value in changed}


class HostSnapshot:
    """Copies of a nested state (dicts, lists, tuples of tensors and plain values) in reusable host buffers."""

    def __init__(self, pin: bool):
        self.pin = pin
        self.buffers: dict[tuple, torch.Tensor] = {}
        self.judged, self.changed, self.versions = threading.Event(), [], []
        self.judged.set()

    def new_bytes(self, state) -> int:
        """Host memory a snapshot of ``state`` would allocate beyond the buffers it already has."""
        return sum(t.numel() * t.element_size() for path, t in _tensors(state, ())
                   if not _fits(self.buffers.get(path), t))

    def take(self, state, deferrable=frozenset()):
        """A copy of ``state`` that training can no longer change, once :meth:`ready` returned.

        Host tensors whose storage is in ``deferrable`` (the trained weights and the optimizer's moments: only the
        optimizer update changes them) are copied later by :meth:`copy_deferred`, in the writer thread while the
        next step's forward and backward run; the update first calls :meth:`wait_copied`. A forward that changes
        one of them in place (an embedding's ``max_norm``, a hand-written EMA) is found by its version counter
        (:meth:`judge`): that snapshot may hold the next step's value and is not published. On CUDA the copies are
        queued on the stream (pinned buffers): later kernels, the update's too, run after them."""
        shared: dict[tuple, torch.Tensor] = {}  # tied weights (one storage, two names) stay one tensor
        self.event, self.deferred, self.copied = None, [], threading.Event()
        self.judged, self.changed = threading.Event(), []
        copied = self._copy(state, (), shared, deferrable)
        if any(t.is_cuda for _, t in _tensors(state, ())):
            self.event = torch.cuda.Event()
            self.event.record()  # after every copy on the current stream
        # Version counters as the step left them: an in-place write after this (the next forward's) bumps them.
        self.versions = [(path, value, value._version) for path, _, value in self.deferred]
        if not self.deferred:
            self.copied.set()
            self.judged.set()
        return copied

    def copy_deferred(self) -> None:
        try:
            for _, buffer, value in self.deferred:
                _memcpy(buffer, value)
        finally:
            self.deferred = []
            self.copied.set()

    def wait_copied(self) -> None:
        self.copied.wait()

    def judge(self) -> None:
        """In the training thread, once the deferred copies are complete and before the update: which deferred
        tensors changed since :meth:`take` (the forward and backward in between are complete, so every in-place
        write of theirs has bumped its counter). A change during the copy cannot be told from one after it, so
        any change counts. The writer publishes the snapshot only after this verdict (:meth:`unchanged`)."""
        if self.judged.is_set():
            return
        self.wait_copied()
        self.changed = [(path, value) for path, value, version in self.versions if value._version != version]
        self.versions = []
        self.judged.set()

    def unchanged(self) -> None:
        """In the writer thread, before the snapshot is published: wait for the verdict; raise
        :class:`SnapshotChanged` naming what the forward changed."""
        self.judged.wait()
        if self.changed:
            raise SnapshotChanged(self.changed)

    def ready(self) -> None:
        self.copy_deferred()
        if self.event is not None:
            self.event.synchronize()

    def _copy(self, value, path, shared, deferrable):
        if isinstance(value, torch.Tensor):
            key = (value.untyped_storage().data_ptr(), value.storage_offset(), tuple(value.shape),
                   tuple(value.stride()), value.dtype, value.device)
            if key in shared:
                return shared[key]
            buffer = self.buffers.get(path)
            if not _fits(buffer, value):
                buffer = torch.empty(value.shape, dtype=value.dtype, pin_memory=self.pin and value.is_cuda)
                self.buffers[path] = buffer
            if value.device.type == "cpu" and value.is_contiguous():
                if value.untyped_storage().data_ptr() in deferrable:
                    self.deferred.append((path, buffer, value))
                else:
                    _memcpy(buffer, value)
            else:
                buffer.copy_(value.detach(), non_blocking=value.is_cuda and buffer.is_pinned())
            shared[key] = buffer
            return buffer
        if isinstance(value, dict):
            copied = OrderedDict() if isinstance(value, OrderedDict) else {}
            for key, item in value.items():
                copied[key] = self._copy(item, path + (key,), shared, deferrable)
            if hasattr(value, "_metadata"):  # a module state_dict's versions, read by load_state_dict
                copied._metadata = copy.deepcopy(value._metadata)
            return copied
        if isinstance(value, list):
            return [self._copy(item, path + (i,), shared, deferrable) for i, item in enumerate(value)]
        if isinstance(value, tuple) and not hasattr(value, "_fields"):
            return tuple(self._copy(item, path + (i,), shared, deferrable) for i, item in enumerate(value))
        return value if isinstance(value, _ATOMS) else copy.deepcopy(value)


def _memcpy(buffer: torch.Tensor, value: torch.Tensor) -> None:
    """One plain memcpy (without the GIL): ``copy_`` splits even small tensors over the intra-op threads, and on
    busy cores each split waited for a preempted thread (a 256x256 copy took 50 ms; a whole state 1 GB/s)."""
    ctypes.memmove(buffer.data_ptr(), value.data_ptr(), value.numel() * value.element_size())


def _fits(buffer, tensor) -> bool:
    return buffer is not None and buffer.shape == tensor.shape and buffer.dtype == tensor.dtype


def _tensors(value, path):
    if isinstance(value, torch.Tensor):
        yield path, value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _tensors(item, path + (key,))
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            yield from _tensors(item, path + (i,))


def state_bytes(state) -> int:
    """The bytes of the tensors in a nested state: about what its files take (the pickled rest is small)."""
    return sum(t.numel() * t.element_size() for _, t in _tensors(state, ()))


def _free_bytes(folder: Path) -> int | None:
    for place in (folder, *folder.parents):  # the folder itself may not exist yet (or any more)
        try:
            return shutil.disk_usage(place).free
        except OSError:
            continue
    return None


def write_failure(step: int, folder: Path, error: BaseException, needed: int, *, staging: bool, keep: int) -> str:
    """What stopped a checkpoint write, for the user. A full disk is named by the folder on it and the bytes the
    checkpoint needs: torch reports it as "[enforce fail at inline_container.cc] unexpected pos", which names
    neither (its zip writer sees a short write); ENOSPC/EDQUOT, or less free space than needed, tell it."""
    causes, cause = [], error
    while cause is not None and len(causes) < 8:
        causes.append(cause)
        cause = cause.__cause__ or cause.__context__
    free = _free_bytes(Path(folder))
    full = (any(getattr(c, "errno", None) in (errno.ENOSPC, errno.EDQUOT) for c in causes)
            or (free is not None and free < needed))
    if not full:
        return (f"checkpoint step-{step} could not be written to {folder} ({type(error).__name__}: {error}); the "
                "checkpoints before it are intact")
    advice = ("free space there, or pass checkpoint_staging_dir= a folder on a disk with room (None writes straight "
              "into output_dir)" if staging else
              f"free space there, keep fewer checkpoints (keep_checkpoints={keep}: each takes about this much), "
              "or pass another output_dir")
    return (f"checkpoint step-{step} could not be written: the disk holding {folder} is full "
            f"({'unknown' if free is None else format(free, ',')} bytes free; the checkpoint needs about "
            f"{needed:,} bytes). To go on: {advice}. The checkpoints before it are intact")


def _set_niceness(thread_id: int, niceness: int | None) -> None:
    if niceness is None:
        return
    try:
        os.setpriority(os.PRIO_PROCESS, thread_id, niceness)  # Linux: per thread
    except (AttributeError, OSError, TypeError):
        pass  # not Linux, or not allowed to raise a priority again: the write just goes on as it is


def _own_niceness() -> int | None:
    """The calling thread's nice value (Linux: per thread), None where there is none."""
    try:
        return os.getpriority(os.PRIO_PROCESS, 0)
    except (AttributeError, OSError):
        return None


def available_memory_bytes() -> int | None:
    """Linux's estimate of memory available without swapping; None where it cannot be read."""
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


# Checkpoints folder -> the last writer of this process there; weak: a writer (and its snapshot's host buffers)
# lives on only while its thread runs.
_WRITERS: weakref.WeakValueDictionary = weakref.WeakValueDictionary()


class CheckpointWriter:
    """Writes checkpoints of one run (rank 0 only), in a background thread unless ``asynchronous=False``.

    ``staging_dir``: folders are written there first and copied into ``checkpoints_dir`` by the same thread
    (``checkpoint.publish_folder``), so a slow or stalling ``output_dir`` (Google Drive) never holds up a step.
    A checkpoint counts once it is in ``checkpoints_dir``; the staging copy is removed after it.
    """

    def __init__(self, checkpoints_dir: Path, keep: int, *, staging_dir: Path | None = None, asynchronous: bool = True,
                 pin: bool = False, note=print, notice_times: tuple[float, float] = (WAIT_NOTICE_AFTER_S,
                                                                                     WAIT_NOTICE_EVERY_S)):
        self.checkpoints_dir, self.keep, self.staging_dir = Path(checkpoints_dir), keep, staging_dir
        self.asynchronous, self.note = asynchronous, note
        # Seconds until a wait for the write in flight is first named, then between its repeats.
        self.notice_after_s, self.notice_every_s = notice_times
        self.snapshot = HostSnapshot(pin)
        self.thread: threading.Thread | None = None
        # Set by the writer thread when its write ends. Waited on instead of Thread.join(): Python 3.11's join,
        # interrupted by Ctrl-C, marks a thread that still runs as stopped (is_alive() False).
        self.done = threading.Event()
        # Whether training waits for the write in flight, and its priority: the writer gives way to training
        # only until then (the lock orders that decision against the wait's).
        self.waited, self.training_niceness, self.priority = False, None, threading.Lock()
        self.error: str | None = None
        self.writing_step: int | None = None
        self.forward_written: set[int] = set()  # storages a forward changed in place: copied at once from then on
        # What the write in flight is doing now (set by the writer thread) and since when it was handed over.
        self.activity, self.submitted_at = "", 0.0
        # A write that Ctrl-C left running in this process (a notebook's earlier call) into the same folder ends
        # first: two writers would share the staging folder and prune each other's checkpoints.
        previous = _WRITERS.get(self.checkpoints_dir.resolve())
        if previous is not None and previous.in_flight():
            previous.wait("This run's start")
        _WRITERS[self.checkpoints_dir.resolve()] = self
        if staging_dir is not None:
            shutil.rmtree(staging_dir, ignore_errors=True)  # a killed run's half-written folders: never published

    def submit(self, step: int, files: dict, meta: dict, best: bool, on_written, deferrable=frozenset()) -> None:
        """Write ``files`` as ``step-<step>`` (and ``best/``); ``on_written(step folder, best folder or None)``
        runs once they are complete in ``checkpoints_dir``. Call :meth:`wait` first (one write in flight), and
        :meth:`before_update` before the next optimizer update (``deferrable``: see ``HostSnapshot.take``)."""
        assert self.thread is None, "wait() for the previous checkpoint first"
        if self.asynchronous and not self._snapshot_fits(files):
            self.asynchronous = False
        if not self.asynchronous:
            self._write(step, files, meta, best, on_written)  # errors raise here
            return
        files, meta = self.snapshot.take(files, set(deferrable) - self.forward_written), copy.deepcopy(meta)
        self.writing_step, self.waited, self.training_niceness = step, False, _own_niceness()
        self.activity, self.submitted_at = "copying its tensors into host memory", time.monotonic()
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._write_in_background, args=(step, files, meta, best, on_written),
                                       name=f"{WRITER_THREAD_PREFIX}-step-{step}", daemon=True)
        # The write is published once the training thread judged the snapshot (before the next update, or in
        # wait()): a caller that joins this thread from the training thread otherwise (a test's forward that
        # waits for writes before it changes anything) gives that verdict first.
        self.thread.before_join = self.snapshot.judge
        self.thread.start()

    def before_update(self) -> None:
        """The snapshot's deferred copies of the weights and moments are complete (they are about to change)."""
        if self.thread is not None:
            self.snapshot.judge()

    def wait(self, waiter: str = "The run's end") -> str | None:
        """Wait for the write in flight; the error it met (a message), or None. Ctrl-C while waiting raises
        ``KeyboardInterrupt``; the write then goes on in the background (:meth:`in_flight` describes it).

        ``waiter`` names who waits, in the notices a long wait prints (after ``notice_times[0]`` seconds, then
        every ``notice_times[1]``: by default ``WAIT_NOTICE_AFTER_S`` and ``WAIT_NOTICE_EVERY_S``)."""
        if self.thread is not None:
            self.snapshot.judge()  # no forward runs any more before this write: the writer may publish
            with self.priority:  # training waits for it now: back to training's priority (where allowed)
                self.waited = True
                if not self.done.is_set():
                    _set_niceness(self.thread.native_id, self.training_niceness)
            notice_at = time.monotonic() + self.notice_after_s
            while not self.done.wait(timeout=min(0.2, self.notice_every_s)):  # a bare wait() would not let Ctrl-C in
                if time.monotonic() >= notice_at:
                    self.note(f"{waiter} waits for {self.in_flight()}. A stalled disk or network mount (e.g. Google "
                              "Drive) holds it; Ctrl-C stops waiting (the checkpoints before it are intact).")
                    notice_at = time.monotonic() + self.notice_every_s
            self.thread, self.writing_step = None, None
        error, self.error = self.error, None
        return error

    def in_flight(self) -> str | None:
        """The write in flight in words (which checkpoint, what it is doing where, for how long), or None."""
        if self.thread is None or self.done.is_set():
            return None
        return (f"checkpoint step-{self.writing_step}, {self.activity} "
                f"({time.monotonic() - self.submitted_at:.0f} s since it was handed to the writer)")

    def _snapshot_fits(self, files) -> bool:
        needed, available = self.snapshot.new_bytes(files), available_memory_bytes()
        if available is None or needed <= available // 2:
            return True
        self.note(f"Checkpoints are written synchronously (training waits for each): a host snapshot needs "
                  f"{needed / 2**30:.1f} GiB, more than half of the {available / 2**30:.1f} GiB of memory available.")
        return False

    def _write_in_background(self, step, files, meta, best, on_written) -> None:
        try:
            self.snapshot.ready()  # at training's priority: the next update waits for these copies
            with self.priority:  # the run's end waits at once, often while the copies above are still running
                if not self.waited and self.training_niceness is not None:
                    _set_niceness(threading.get_native_id(), self.training_niceness + WRITER_NICENESS)
            self._write(step, files, meta, best, on_written, before_publish=self.snapshot.unchanged)
        except SnapshotChanged as changed:
            self._drop_unpublished(step)
            self.forward_written |= changed.storages
            warnings.warn(f"Checkpoint step-{step} was not written: the model's forward changed {changed} in place "
                          "while the step's snapshot was being copied, so it could hold the next step's values. "
                          "These tensors are copied at once from now on; the next checkpoint holds them.",
                          UserWarning, stacklevel=caller_stacklevel())
        except BaseException as error:  # noqa: BLE001 - kept and raised in the training thread
            self.error = (str(error) if isinstance(error, CheckpointWriteError) else
                          f"checkpoint step-{step} could not be written to {self.staging_dir or self.checkpoints_dir}"
                          f" ({type(error).__name__}: {error}); the checkpoints before it are intact")
            warnings.warn(f"Background write failed: {self.error}.", UserWarning, stacklevel=caller_stacklevel())
        finally:
            self.done.set()

    def _drop_unpublished(self, step: int) -> None:
        local = self.staging_dir if self.staging_dir is not None else self.checkpoints_dir
        for name in (f"{ckpt.STEP_PREFIX}{step}", "best"):
            shutil.rmtree(local / (".tmp-" + name), ignore_errors=True)

    def _write(self, step, files, meta, best, on_written, before_publish=None) -> None:
        """Errors raise as :class:`CheckpointWriteError` naming the folder; a full disk with the bytes needed."""
        local = self.staging_dir if self.staging_dir is not None else self.checkpoints_dir
        self.activity = f"writing its files into {local}"
        try:
            step_folder, best_folder = ckpt.save_step(local, step, files, meta, best, before_publish=before_publish)
        except SnapshotChanged:
            raise
        except Exception as error:
            self._drop_unpublished(step)  # the partial files would hold the space a resume needs
            needed = state_bytes(files) + (state_bytes(files.get("model.pt")) if best else 0)
            raise CheckpointWriteError(write_failure(step, local, error, needed, staging=local != self.checkpoints_dir,
                                                     keep=self.keep)) from error
        if self.staging_dir is not None:  # best/ first here too: a step folder's best/ exists after any kill
            self.activity = f"copying it from {local} into {self.checkpoints_dir}"
            try:
                if best_folder is not None:
                    best_folder = ckpt.publish_folder(best_folder, self.checkpoints_dir)
                step_folder = ckpt.publish_folder(step_folder, self.checkpoints_dir)
            except Exception as error:
                for name in (step_folder.name, "best"):
                    shutil.rmtree(self.checkpoints_dir / (".tmp-" + name), ignore_errors=True)
                needed = sum(f.stat().st_size for folder in (step_folder, best_folder) if folder is not None
                             and folder.parent == local for f in folder.iterdir())
                raise CheckpointWriteError(write_failure(step, self.checkpoints_dir, error, needed, staging=False,
                                                         keep=self.keep)) from error
            shutil.rmtree(local, ignore_errors=True)
        self.activity = f"removing older checkpoints from {self.checkpoints_dir} (keep_checkpoints={self.keep})"
        ckpt.prune_checkpoints(self.checkpoints_dir, self.keep)
        on_written(step_folder, best_folder)

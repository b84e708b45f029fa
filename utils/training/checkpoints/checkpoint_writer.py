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
"""
from __future__ import annotations

import copy
import ctypes
import os
import shutil
import threading
import warnings
from collections import OrderedDict
from pathlib import Path

import torch

from . import checkpoint as ckpt

# The writer runs below the training threads' priority on Linux (threads have their own nice value): on a
# machine with few cores its serialisation and hashing give way to the training step instead of slowing it.
WRITER_NICENESS = 10
WRITER_THREAD_PREFIX = "checkpoint-writer"  # the writer thread's name: checkpoint-writer-step-<N>
_ATOMS = (int, float, str, bool, bytes, type(None))


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written; the checkpoints written before it are intact."""


class HostSnapshot:
    """Copies of a nested state (dicts, lists, tuples of tensors and plain values) in reusable host buffers."""

    def __init__(self, pin: bool):
        self.pin = pin
        self.buffers: dict[tuple, torch.Tensor] = {}

    def new_bytes(self, state) -> int:
        """Host memory a snapshot of ``state`` would allocate beyond the buffers it already has."""
        return sum(t.numel() * t.element_size() for path, t in _tensors(state, ())
                   if not _fits(self.buffers.get(path), t))

    def take(self, state, deferrable=frozenset()):
        """A copy of ``state`` that training can no longer change, once :meth:`ready` returned.

        Host tensors whose storage is in ``deferrable`` (the weights and the optimizer's moments: only the
        optimizer update changes them) are copied later by :meth:`copy_deferred`, in the writer thread while the
        next step's forward and backward run; the update first calls :meth:`wait_copied`. On CUDA the copies are
        queued on the stream (pinned buffers): later kernels, the update's too, run after them."""
        shared: dict[tuple, torch.Tensor] = {}  # tied weights (one storage, two names) stay one tensor
        self.event, self.deferred, self.copied = None, [], threading.Event()
        copied = self._copy(state, (), shared, deferrable)
        if any(t.is_cuda for _, t in _tensors(state, ())):
            self.event = torch.cuda.Event()
            self.event.record()  # after every copy on the current stream
        if not self.deferred:
            self.copied.set()
        return copied

    def copy_deferred(self) -> None:
        try:
            for buffer, value in self.deferred:
                _memcpy(buffer, value)
        finally:
            self.deferred = []
            self.copied.set()

    def wait_copied(self) -> None:
        self.copied.wait()

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
                    self.deferred.append((buffer, value))
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


class CheckpointWriter:
    """Writes checkpoints of one run (rank 0 only), in a background thread unless ``asynchronous=False``.

    ``staging_dir``: folders are written there first and copied into ``checkpoints_dir`` by the same thread
    (``checkpoint.publish_folder``), so a slow or stalling ``output_dir`` (Google Drive) never holds up a step.
    A checkpoint counts once it is in ``checkpoints_dir``; the staging copy is removed after it.
    """

    def __init__(self, checkpoints_dir: Path, keep: int, *, staging_dir: Path | None = None, asynchronous: bool = True,
                 pin: bool = False, note=print):
        self.checkpoints_dir, self.keep, self.staging_dir = Path(checkpoints_dir), keep, staging_dir
        self.asynchronous, self.note = asynchronous, note
        self.snapshot = HostSnapshot(pin)
        self.thread: threading.Thread | None = None
        # Whether training waits for the write in flight, and its priority: the writer gives way to training
        # only until then (the lock orders that decision against the wait's).
        self.waited, self.training_niceness, self.priority = False, None, threading.Lock()
        self.error: str | None = None
        self.writing_step: int | None = None
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
        files, meta = self.snapshot.take(files, deferrable), copy.deepcopy(meta)
        self.writing_step, self.waited, self.training_niceness = step, False, _own_niceness()
        self.thread = threading.Thread(target=self._write_in_background, args=(step, files, meta, best, on_written),
                                       name=f"{WRITER_THREAD_PREFIX}-step-{step}", daemon=True)
        self.thread.start()

    def before_update(self) -> None:
        """The snapshot's deferred copies of the weights and moments are complete (they are about to change)."""
        if self.thread is not None:
            self.snapshot.wait_copied()

    def wait(self) -> str | None:
        """Wait for the write in flight; the error it met (a message), or None. Ctrl-C while waiting raises
        ``KeyboardInterrupt``; the write then goes on in the background."""
        if self.thread is not None:
            with self.priority:  # training waits for it now: back to training's priority (where allowed)
                self.waited = True
                if self.thread.is_alive():
                    _set_niceness(self.thread.native_id, self.training_niceness)
            while self.thread.is_alive():
                self.thread.join(timeout=0.2)  # a bare join() would not let Ctrl-C through
            self.thread, self.writing_step = None, None
        error, self.error = self.error, None
        return error

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
            self._write(step, files, meta, best, on_written)
        except BaseException as error:  # noqa: BLE001 - kept and raised in the training thread
            self.error = (f"checkpoint step-{step} could not be written to {self.staging_dir or self.checkpoints_dir}"
                          f" ({type(error).__name__}: {error}); the checkpoints before it are intact")
            warnings.warn(f"Background write failed: {self.error}.", UserWarning, stacklevel=1)

    def _write(self, step, files, meta, best, on_written) -> None:
        local = self.staging_dir if self.staging_dir is not None else self.checkpoints_dir
        step_folder, best_folder = ckpt.save_step(local, step, files, meta, best)
        if self.staging_dir is not None:  # best/ first here too: a step folder's best/ exists after any kill
            if best_folder is not None:
                best_folder = ckpt.publish_folder(best_folder, self.checkpoints_dir)
            step_folder = ckpt.publish_folder(step_folder, self.checkpoints_dir)
            shutil.rmtree(local, ignore_errors=True)
        ckpt.prune_checkpoints(self.checkpoints_dir, self.keep)
        on_written(step_folder, best_folder)

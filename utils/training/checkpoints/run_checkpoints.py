"""A run's checkpoints: when they are due (steps or the clock), the hand-off of ``Trainer.state_dict()`` to the
background writer (or FSDP's sharded save), and the run's end, which waits for the last write.

What a checkpoint carries is :meth:`Trainer.state_dict`; the files themselves are :mod:`checkpoint`'s and the
thread that writes them :mod:`checkpoint_writer`'s. This module only decides when, and keeps which folders are
complete (``last_checkpoint``, ``best_checkpoint``).
"""
from __future__ import annotations

import time
import warnings
from pathlib import Path

import torch

from . import checkpoint as ckpt, sharded_checkpoint
from .checkpoint_settings import CheckpointSettings
from .checkpoint_writer import CheckpointWriteError, CheckpointWriter
from .ownership import OutputDirTaken, lost_ownership
from ..distributed import DistContext, any_rank, barrier, is_sharded, local_weights_of
from ..outcome import Outcome, OutcomeKind
from ..warn import caller_stacklevel


class RunCheckpoints:
    def __init__(self, settings: CheckpointSettings, ctx: DistContext, device: torch.device, *, sharded: bool,
                 note=print):
        self.settings, self.ctx, self.device, self.sharded = settings, ctx, device, sharded
        self.folder = ckpt.checkpoints_folder(settings.output_dir)
        # Rank 0 writes, in a background thread while training goes on; FSDP's sharded saves are collectives.
        self.writer = CheckpointWriter(
            self.folder, settings.keep_checkpoints, staging_dir=settings.checkpoint_staging_folder(),
            asynchronous=settings.async_checkpoints, pin=device.type == "cuda",
            note=note) if ctx.is_main and settings.writes_checkpoints and not sharded else None
        self.last_checkpoint = self.best_checkpoint = None  # complete folders only (named once written)
        self.error = None  # a failed last write when the run ended for another reason
        self.pending = None  # the write still in flight when Ctrl-C stopped the run's end from waiting for it
        self.last_clock = time.monotonic()

    def resume_from(self, loaded: dict, state, model) -> dict | None:
        """A resumed run stands on the loaded folder (its last checkpoint); ``best/`` counts only if intact and the
        best the checkpoint recorded, else the checkpoint's own weights may be the best. Returns the best weights
        to restore at the end (``load_best_model_at_end``), else None."""
        self.last_checkpoint = str(loaded["folder"])
        best, want_weights = self.folder / "best", self.settings.load_best_model_at_end
        if state.best_epoch is None:
            return None
        try:
            best_meta = ckpt.verify_folder(best)
            matches = ((best_meta.get("best_epoch"), best_meta.get("best_val_loss"))
                       == (state.best_epoch, state.best_val_loss))
        except OSError as error:
            matches = False
            if best.exists():
                warnings.warn(f"Skipping {best}: it is damaged ({error}).", UserWarning, stacklevel=caller_stacklevel())
        if matches:
            self.best_checkpoint = str(best)
            return saved_weights(model, ckpt.load_checkpoint(best)) if want_weights else None
        if state.best_epoch == state.epoch and state.step_in_epoch == 0:
            # The checkpoint ends the best epoch: its own weights are the best.
            self.best_checkpoint = str(loaded["folder"])
            return saved_weights(model, loaded) if want_weights else None
        if want_weights:
            warnings.warn(f"{best} does not hold the best epoch ({state.best_epoch}) that {loaded['folder']} records; "
                          "the best weights are lost unless a later epoch improves on them.", UserWarning,
                          stacklevel=caller_stacklevel())
        return None

    def due(self, global_step: int, at_sync_point: bool) -> bool:
        """A step-count checkpoint (``checkpoint_every``) or one by the clock (``checkpoint_every_minutes``)."""
        every = self.settings.checkpoint_every
        return bool(every) and global_step % every == 0 or self.clock_due(at_sync_point)

    def clock_due(self, at_sync_point: bool) -> bool:
        """Has ``checkpoint_every_minutes`` of wall time passed since the last checkpoint (or the start)?"""
        minutes = self.settings.checkpoint_every_minutes
        if not minutes:
            return False
        if self.ctx.enabled and not at_sync_point:  # under torchrun: only where the step rows are read anyway
            return False
        due = time.monotonic() - self.last_clock >= 60 * minutes
        # Clocks differ between processes: rank 0's decides for all (a broadcast; no rank may checkpoint alone,
        # state_dict() is a collective).
        return any_rank(due and self.ctx.is_main, self.ctx, self.device)

    def before_update(self) -> None:
        """The optimizer update is about to change the weights and moments: the writer's copy completes first."""
        if self.writer:
            self.writer.before_update()

    def save(self, trainer, best: bool = False) -> None:
        """Only at optimizer-step boundaries, after pending steps are recorded. Every rank takes part (each one's
        RNG state is gathered); rank 0 hands a host snapshot to the background writer and training goes on."""
        self.check_ownership()
        step = trainer.state.global_step
        if not self.sharded:
            # At most one write in flight. Waited for before this checkpoint's metrics files are written: a previous
            # write that filled the disk is named as such, not as the metrics file that found no room after it.
            failed = self.writer.wait(f"Checkpoint step-{step}") if self.writer else None
            # All ranks learn that rank 0's previous write failed and stop together (one flag; a checkpoint is a
            # sync point anyway), instead of the others waiting forever in the next collective.
            if any_rank(failed is not None, self.ctx, self.device):
                raise CheckpointWriteError(f"Training stopped: {failed or 'rank 0 could not write a checkpoint'}. "
                                           "Resume (resume_from_checkpoint=True) once the cause is fixed.")
        trainer.tracker.before_checkpoint()  # the rows the checkpoint counts are in the metrics files first
        self.last_clock = time.monotonic()
        if self.sharded:  # every process writes its shards, synchronously (not through the background writer)
            sharded_checkpoint.save_checkpoint(trainer, best)
            return
        files = trainer.state_dict()
        if self.writer:
            # Only the optimizer update changes the trained weights and moments: the writer copies them meanwhile.
            # Frozen parameters are copied at once (a forward may update them: an EMA); so are buffers.
            optimizer = trainer.optimizer
            updated = [p for group in optimizer.param_groups for p in group["params"] if p.requires_grad] + [
                t for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t)]
            self.writer.submit(step, files, trainer.checkpoint_meta(), best, self.written,
                               {t.untyped_storage().data_ptr() for t in updated})

    def check_ownership(self) -> None:
        """Stop (all ranks) before writing when another process took ``output_dir``'s lock (it was removed under
        this run and someone started there): two runs would overwrite each other's checkpoints and metrics."""
        lost = lost_ownership(self.settings.output_dir) if self.ctx.is_main else None  # the lock is rank 0's
        if any_rank(lost is not None, self.ctx, self.device):
            raise OutputDirTaken(f"Training stopped: {lost or 'rank 0 lost the lock of output_dir'}. Its checkpoints "
                                 "written before are intact; resume there (resume_from_checkpoint=True) once the "
                                 "other run has ended, or let that run go on alone.")

    def written(self, step_folder: Path, best_folder: Path | None) -> None:
        """Called by the writer once a checkpoint is complete: only then do results name it."""
        self.last_checkpoint = str(step_folder)
        if best_folder is not None:
            self.best_checkpoint = str(best_folder)

    def waiting_for(self) -> str | None:
        """The write this process waits for or writes in the background, in words (for the process watch)."""
        return self.writer.in_flight() if self.writer else None

    def finish(self, outcome: Outcome | None) -> None:
        """The run's end: wait for the write in flight, so that results name only complete checkpoints. Call it after
        the metrics files are written: a write that stalls must not hold them back.

        A failed write raises when the run ended as planned (completed, stopped early, pruned), as a synchronous
        write would have; when it ended for another reason (Ctrl-C, a non-finite loss, an error: ``outcome`` None)
        that reason is kept, and the failure is warned about and returned in ``results["checkpoint_error"]``.
        Ctrl-C during this wait is not a failure: the write goes on in the background while the process lives, the
        results say so in ``results["checkpoint_pending"]`` and name the checkpoints complete so far.
        """
        failed = None
        if self.writer:
            try:
                failed = self.writer.wait()
            except KeyboardInterrupt:
                self.pending = (f"{self.writer.in_flight() or f'checkpoint step-{self.writer.writing_step}'}: Ctrl-C "
                                "stopped the wait for it. It completes in the background while this Python process "
                                "lives; until then the newest complete checkpoint is "
                                f"{self.last_checkpoint or 'none'}")
                warnings.warn(f"Not waiting for the last checkpoint: {self.pending}.", UserWarning,
                              stacklevel=caller_stacklevel())
        together = outcome is not None and outcome.kind is not OutcomeKind.INTERRUPTED  # all ranks end at this point
        if together:  # they agree on a failure, and return only once rank 0's last write is complete
            if any_rank(failed is not None, self.ctx, self.device):
                failed = failed or "rank 0 could not write the last checkpoint"
            barrier(self.ctx)
        if failed and together and outcome.kind is not OutcomeKind.NON_FINITE:
            raise CheckpointWriteError(f"{failed}. Resume from the last checkpoint under {self.folder} once "
                                       "the cause is fixed.")
        if failed:
            warnings.warn(f"The last checkpoint was not written: {failed}.",
                          UserWarning, stacklevel=caller_stacklevel())
        self.error = failed

    def result_keys(self) -> dict:
        """The results' checkpoint keys, once :meth:`finish` returned."""
        return {"best_checkpoint": self.best_checkpoint, "last_checkpoint": self.last_checkpoint,
                "checkpoint_error": self.error,  # a failed last write when the run ended for another reason
                "checkpoint_pending": self.pending}


def load_model_and_optimizer(model, optimizer, files: dict) -> None:
    """A loaded checkpoint's weights and AdamW state into this run's model and optimizer."""
    try:
        if "model.pt" in files:
            model.load_state_dict(files["model.pt"])
        else:  # a sharded checkpoint (fsdp=True): model and optimizer from its shards, on any number of processes
            sharded_checkpoint.load_model_and_optimizer(model, optimizer, files["folder"])
    except RuntimeError as error:
        raise ValueError(f"Cannot resume: the checkpoint's parameters do not match this model ({error}). "
                         "Build the same architecture, or start fresh.") from error
    if "optimizer.pt" in files:
        optimizer.load_state_dict(files["optimizer.pt"])


def saved_weights(model, loaded: dict) -> dict:
    """The model weights of a loaded checkpoint folder (``checkpoint.load_checkpoint``), as
    :func:`restore_weights` takes them."""
    if "model.pt" in loaded:
        return loaded["model.pt"]
    weights = sharded_checkpoint.load_model_weights(model, loaded["folder"])
    return local_weights_of(weights) if is_sharded(model) else weights

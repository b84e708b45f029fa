"""One fine-tuning run as one object: ``Trainer`` owns the model, optimizer, schedule, scaler, data and progress.

``fit()`` runs the epochs and returns how they ended (an :class:`Outcome`). ``state_dict()`` says in one
place what a checkpoint carries and ``load_state_dict()`` takes it back; :mod:`checkpoint` only writes
and reads the files. Building a trainer from a user's arguments is :mod:`engine`'s job.
"""
from __future__ import annotations

import contextlib
import math
import time
import warnings
from itertools import islice
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .checkpoint_writer import CheckpointWriteError, CheckpointWriter
from .batch_plans import PlanSettings
from .collate import to_device
from .checkpoint_format import FORMAT_VERSION, META_KEY as FORMAT_KEY
from .distributed import DistContext, all_reduce_sum, any_rank, barrier, wrap_model
from . import fsdp, sharded_checkpoint
from .evaluation import evaluate
from .source_contract import BatchSource
from .sources import run_length
from .loss import TokenSums, count_real_targets
from .gradient_stats import GradientStats
from .loss_path import chunked, choose_loss_path
from .metrics import MetricRows
from .model_call import ModelCaller, mask_free_is_exact
from .optim import build_optimizer, build_scheduler, rate_from_schedule
from .outcome import COMPLETED, Outcome, OutcomeKind, StopTraining
from .precision import Precision
from .reproducibility import rng_state
from .settings import FineTuneSettings
from .train_state import TrainState

@dataclass
class RunData:
    """The prepared, checked data of a run and the pad id it was prepared with."""

    train: BatchSource
    val: BatchSource
    pad_token_id: int
    pad_source: str
    vocab_size: int


def forward_backward(model, batch, pad_token_id, *, caller, loss_divisor=None, autocast=contextlib.nullcontext,
                     scaler=None) -> TokenSums:
    """Forward one micro-batch, backward ``loss_sum / loss_divisor``; returns the batch's detached sums.

    ``loss_divisor`` is the real-target count of the whole optimizer step (all micro-batches, all
    processes), so accumulated gradients equal those of the one large batch. Default: this batch's.
    """
    with autocast():
        sums = caller.loss_sums(model, batch, pad_token_id)
    divisor = sums.real_targets.clamp(min=1) if loss_divisor is None else loss_divisor
    loss = sums.loss_sum / divisor
    (scaler.scale(loss) if scaler is not None else loss).backward()
    sums.loss_sum = sums.loss_sum.detach()
    return sums


class Trainer:
    def __init__(self, model, settings: FineTuneSettings, data: RunData, *, ctx: DistContext, device: torch.device,
                 tracker: MetricRows, run_id: str = "", on_evaluation=None, gradient_stats: GradientStats | None = None):
        self.model, self.settings, self.data, self.ctx, self.device = model, settings, data, ctx, device
        self.tracker, self.run_id = tracker, run_id  # the metric rows (the sinks that consume them are rank 0's)
        self.gradient_stats = gradient_stats  # W&B's per-layer gradient norms and histograms, when it logs them
        self.on_evaluation = on_evaluation  # (step, val loss, final) -> a reason to prune the search trial, or None
        self.caller = ModelCaller(model)
        probe = to_device(data.train.padded_batch(), device)  # one batch with padding for both start-up probes
        # Only on CUDA, where it unlocks the flash kernel; on CPU it was not measured to help.
        self.caller.mask_free = device.type == "cuda" and mask_free_is_exact(model, self.caller, probe)
        # Losses from hidden states and the head's weight (no full logits) only where that is the model's own loss
        # by construction and saves memory; the bound on a micro-batch's positions is for the memory rule.
        positions = max(settings.batch_size, probe["input_ids"].shape[0]) * probe["input_ids"].shape[1]
        self.loss_path = choose_loss_path(model, self.caller, probe, data.pad_token_id, requested=settings.loss_path,
                                          micro_batch_positions=max(positions, settings.max_tokens_per_batch or 0))
        self.plan_spec = PlanSettings(settings.batch_size, settings.shuffle, settings.group_by_length, settings.random_seed,
                                      settings.gradient_accumulation_steps, ctx.world_size, ctx.rank,
                                      settings.max_tokens_per_batch)
        self.steps_per_epoch, self.n_epochs, self.total_steps = run_length(data.train, self.plan_spec, settings)
        self.precision = settings.autocast_dtype(device)  # None: float32
        self.sharded = settings.fsdp  # FSDP2: sharded in place before the optimizer sees its (DTensor) parameters
        if self.sharded:
            self.precision = fsdp.check_precision(device, self.precision, settings.requested_precision)
            fsdp.shard_model(model, device, self.precision)
            # The linear path calls the body and reads the head's weight outside the root's forward, where FSDP
            # has not gathered the root's shards: the chunked loss over the model's own logits.
            self.caller.output_layer = None
            self.loss_path = chunked("FSDP: the head's weight is sharded outside the root's forward")
        self.optimizer = build_optimizer(model, settings.learning_rate, settings.weight_decay)
        self.scheduler = build_scheduler(self.optimizer, settings.lr_schedule, self.total_steps, settings.warmup_steps_for(self.total_steps))
        # Autocast and GradScaler on this device's type (CPU autocast too, when asked for): one code path. Sharded:
        # FSDP's MixedPrecisionPolicy casts instead of autocast.
        self.amp = Precision(self.precision, device.type, use_autocast=not self.sharded)
        self.scaler, self.autocast = self.amp.scaler, self.amp.autocast
        self.train_model = model if self.sharded else wrap_model(torch.compile(model) if settings.compile else model, ctx, device)
        if self.train_model is not model and self.loss_path.path == "linear":
            self.caller.output_layer = None  # one path for training and validation: the wrapper's own forward
            self.loss_path = chunked("a DDP or torch.compile wrapper goes through its own forward")
        self.fingerprints = {"train": data.train.fingerprint(), "val": data.val.fingerprint()}
        self.state = TrainState()
        # Sticky on the device: set by the first non-finite step, it makes every later update a no-op (fused
        # AdamW's found_inf) until the host reads it with the step rows. No host read per step.
        self.stop_flag = torch.zeros((), device=device)
        self.best_weights = self.best_checkpoint = self.last_checkpoint = None
        # Rank 0 writes checkpoints, in a background thread while training goes on (checkpoint_writer).
        self.checkpoint_writer = CheckpointWriter(
            self.checkpoints_dir, settings.keep_checkpoints, staging_dir=settings.checkpoint_staging_folder(),
            asynchronous=settings.async_checkpoints, pin=device.type == "cuda",
            note=tracker.message) if ctx.is_main and settings.writes_checkpoints and not self.sharded else None
        self.last_checkpoint_clock, self.checkpoint_error = time.monotonic(), None

    # -- the loop ----------------------------------------------------------------------------------
    def fit(self) -> Outcome:
        """The epoch loop; returns why it ended. Ctrl-C and a non-finite loss end it with results kept."""
        settings, state = self.settings, self.state
        started = time.perf_counter() - state.run_seconds
        if state.global_step and self.nothing_left():
            return self.already_complete()
        try:
            for epoch in range(state.epoch, self.n_epochs):
                epoch_started = time.perf_counter()
                self.train_epoch(epoch)
                val = self.validate()
                self.record_epoch(epoch, val, time.perf_counter() - epoch_started)
                improved = self.track_best(epoch, val)
                if not self.cut_short_by_max_steps(epoch):  # else the position stays: a raised max_steps continues here
                    state.start_epoch(epoch + 1)
                state.run_seconds = time.perf_counter() - started
                if settings.writes_checkpoints:
                    self.save_checkpoint(best=improved)
                stop = self.after_validation(val, final=self.run_finished(epoch), when=f"epoch {epoch + 1}")
                if stop or (stop := self.early_stopping(epoch)) or self.run_finished(epoch):
                    return stop or COMPLETED
            return COMPLETED
        except KeyboardInterrupt:
            self.tracker.message(f"Interrupted at optimizer step {state.global_step}; returning the metrics so far.")
            return Outcome(OutcomeKind.INTERRUPTED, "interrupted (KeyboardInterrupt)")
        except StopTraining as stop:
            self.tracker.message(stop.outcome.reason)
            return stop.outcome
        except Exception as error:
            self.finish_checkpoints(None)  # the write in flight completes; a failure of it is warned about
            self.tracker.finish({})  # an unexpected failure still writes the CSVs and closes the W&B run
            if isinstance(error, torch.OutOfMemoryError):
                raise torch.OutOfMemoryError(
                    f"Out of GPU memory at optimizer step {state.global_step} with batch_size={settings.batch_size}. "
                    "Use a smaller batch_size and raise gradient_accumulation_steps to keep the effective batch "
                    f"(e.g. batch_size={max(1, settings.batch_size // 2)}, gradient_accumulation_steps="
                    f"{settings.gradient_accumulation_steps * 2}), or precision='bf16'.") from error
            raise
        finally:
            state.run_seconds = time.perf_counter() - started

    def nothing_left(self) -> bool:
        """Whether a resumed run has already trained every step and epoch it is asked for."""
        return self.state.epoch >= self.n_epochs or self.state.global_step >= (self.settings.max_steps or math.inf)

    def already_complete(self) -> Outcome:
        limit = (f"max_steps={self.settings.max_steps}" if self.settings.max_steps is not None
                 else f"n_epochs={self.settings.n_epochs}")
        outcome = Outcome(OutcomeKind.COMPLETED, (
            f"Nothing to train: the checkpoint already completed this run ({limit}, optimizer step "
            f"{self.state.global_step}); the results are the checkpoint's. Raise max_steps or n_epochs to train further."),
            already_complete=True)
        self.tracker.message(outcome.reason)
        return outcome

    def cut_short_by_max_steps(self, epoch: int) -> bool:
        """Whether ``max_steps`` ended the run before the end of this epoch's plan (a stream: before its end)."""
        if self.settings.max_steps is None or self.state.global_step < self.settings.max_steps:
            return False
        planned_steps = self.data.train.steps_in_epoch(self.plan_spec, epoch)  # None: a stream's
        return planned_steps is None or self.state.step_in_epoch < planned_steps

    def run_finished(self, epoch: int) -> bool:
        return epoch + 1 >= self.n_epochs or self.state.global_step >= (self.settings.max_steps or math.inf)

    def train_epoch(self, epoch: int) -> None:
        settings, state = self.settings, self.state
        steps = self.data.train.steps(self.plan_spec, epoch, state.step_in_epoch)
        steps_in_epoch = self.steps_per_epoch[epoch] if epoch < len(self.steps_per_epoch) else None  # None: a stream's
        self.train_model.train()
        pending = []
        started = time.perf_counter()
        try:
            left = max(0, settings.max_steps - state.global_step) if settings.max_steps else None  # max_steps ends the run
            for step_in_epoch, micro_batches in islice(steps, left):
                pending.append(self.optimizer_step([to_device(batch, self.device) for batch in micro_batches]))
                state.global_step += 1
                state.step_in_epoch = step_in_epoch + 1
                last_of_run = state.global_step >= (settings.max_steps or math.inf)
                last_of_epoch = state.step_in_epoch == steps_in_epoch or last_of_run
                # Not at an epoch's last step: the epoch-end checkpoint follows its validation (a second write of the
                # same step, which would wait for the first).
                checkpoint_due = not last_of_epoch and (
                    bool(settings.checkpoint_every) and state.global_step % settings.checkpoint_every == 0
                    or self.checkpoint_clock_due(len(pending) >= settings.log_every))
                eval_due = bool(settings.eval_every) and state.global_step % settings.eval_every == 0 and not last_of_epoch
                if checkpoint_due or eval_due or len(pending) >= settings.log_every or last_of_epoch:
                    flushing, pending = pending, []
                    self.record_steps(flushing, epoch)
                if checkpoint_due or eval_due:  # the checkpoint carries the training time so far; writes and
                    state.train_seconds += time.perf_counter() - started  # validation are not training time
                    if eval_due:  # before the checkpoint, which then counts its row (a resume does not redo it)
                        self.evaluate_mid_epoch(epoch)
                    if checkpoint_due:
                        self.save_checkpoint()
                    started = time.perf_counter()
            self.record_steps(pending, epoch)  # a stream's epoch ends when it does: its last steps are still pending
        except BaseException:
            self.record_steps(pending, epoch)  # Ctrl-C, a stop or any error: every completed step stays in the history
            raise
        finally:
            state.train_seconds += time.perf_counter() - started  # training steps only: no validation

    def optimizer_step(self, batches: list[dict]) -> dict:
        """One optimizer step over its micro-batches; the loss is normalised by the step's global real targets."""
        settings, ctx = self.settings, self.ctx
        # Counted before any backward, over all micro-batches and processes: token-weighted, not mean of means.
        real_in_step = all_reduce_sum(torch.stack([count_real_targets(b, self.data.pad_token_id) for b in batches])
                                      .sum().float(), ctx)
        # DDP (and FSDP's reduce-scatter) average gradients over processes; undo it
        divisor = real_in_step.clamp(min=1) / ctx.world_size
        sums = TokenSums()
        for i, batch in enumerate(batches):
            last = i == len(batches) - 1
            if self.sharded:
                fsdp.set_gradient_sync(self.model, last)
            sync = self.train_model.no_sync() if ctx.enabled and not last and not self.sharded else contextlib.nullcontext()
            with sync:
                sums += forward_backward(self.train_model, batch, self.data.pad_token_id, caller=self.caller,
                                         loss_divisor=divisor, autocast=self.autocast, scaler=self.scaler)
        self.note_shapes(batches)
        self.amp.unscale_(self.optimizer)
        stats = self.gradient_stats
        if stats is not None and stats.enabled and (self.state.global_step + 1) % settings.log_grad_dist_every == 0:
            stats.record(self.model, self.state.global_step + 1, histograms=settings.log_grad_histogram)
        max_norm = settings.max_grad_norm if settings.max_grad_norm is not None else math.inf
        # The norm before clipping; over shards it is one all-reduce, and a replicated DTensor made plain here.
        grad_norm = fsdp.replicated_value(torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm))
        learning_rate = self.optimizer.param_groups[0]["lr"]
        # Under fp16 the GradScaler skips inf gradients itself (and lowers its scale); only the loss decides there.
        not_finite = ~torch.isfinite(sums.loss_sum) | (~torch.isfinite(grad_norm) & (not self.scaler.is_enabled()))
        # All processes take the same decision, or the ones that go on would wait forever for one that stopped.
        not_finite = all_reduce_sum(not_finite.float(), ctx).clamp(max=1)
        self.stop_flag = torch.maximum(self.stop_flag, not_finite)
        if self.checkpoint_writer:  # a checkpoint's copy of the weights and moments is complete before they change
            self.checkpoint_writer.before_update()
        self.apply_update(grad_norm)
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return {"sums": sums, "grad_norm": grad_norm.detach().double(), "not_finite": not_finite,
                "learning_rate": learning_rate}

    def apply_update(self, grad_norm: torch.Tensor) -> None:
        """The optimizer step, skipped on the device once ``stop_flag`` is set: a non-finite loss or gradient
        never reaches the weights. Under fp16 an overflowed gradient skips only its own step."""
        self.amp.step(self.optimizer, self.amp.skip_update(self.stop_flag, grad_norm))

    def note_shapes(self, batches: list[dict]) -> None:
        for batch in batches:  # each new shape costs a warm-up (a recompile under compile=True) on a GPU
            shape = list(batch["input_ids"].shape)
            if shape not in self.state.batch_shapes:
                self.state.batch_shapes.append(shape)

    # -- recording ---------------------------------------------------------------------------------
    def record_steps(self, pending: list[dict], epoch: int) -> None:
        """Read pending steps from the device in one sync (one all-reduce under torchrun) and record them;
        the first step flagged non-finite ends the run with the weights of the step before it."""
        if not pending:
            return
        sums = all_reduce_sum(torch.stack([p["sums"].as_tensor(self.device) for p in pending]), self.ctx)
        extras = torch.stack([torch.stack([p["grad_norm"], p["not_finite"].double()]) for p in pending])
        sums, extras = sums.cpu(), extras.cpu().tolist()  # the sync point of the training loop
        first_step, rows = self.state.global_step - len(pending) + 1, []
        for k, (step_sums, (grad_norm, not_finite)) in enumerate(zip(map(TokenSums.from_tensor, sums), extras)):
            if not_finite:
                self.tracker.log_steps(rows)
                self.stop_non_finite(first_step + k, step_sums, grad_norm, pending[k]["learning_rate"], len(pending) - k)
            self.state.epoch_sums += step_sums
            self.state.train_sequences += int(step_sums.sequences)
            rows.append({"step": first_step + k, "epoch": epoch + 1, "train/step_loss_excl_padding": step_sums.loss,
                         "train/learning_rate": pending[k]["learning_rate"], "train/grad_norm": grad_norm,
                         "train/step_real_tokens": int(step_sums.real_targets)})
        self.tracker.log_steps(rows)

    def stop_non_finite(self, step: int, sums: TokenSums, grad_norm: float, learning_rate: float, skipped: int):
        self.state.global_step -= skipped  # the flagged step and those after it were not applied
        self.state.step_in_epoch -= skipped
        settings = self.settings
        raise StopTraining(Outcome(OutcomeKind.NON_FINITE, (
            f"Training stopped before optimizer step {step}: its loss ({sums.loss_sum:g} summed) or gradient norm "
            f"({grad_norm:g}) is not finite, so the update was not applied; the model holds the weights of step "
            f"{step - 1}. Likely causes: a learning_rate too high (now {learning_rate:g}), weight_decay="
            f"{settings.weight_decay:g}, clipping off (max_grad_norm={settings.max_grad_norm}), or fp16 overflow "
            "(use precision='bf16').")))

    def validate(self) -> dict:
        return evaluate(self.model, self.data.val, self.data.pad_token_id, batch_size=self.settings.batch_size,
                        device=self.device, caller=self.caller, ctx=self.ctx, autocast=self.autocast)

    def evaluate_mid_epoch(self, epoch: int) -> None:
        """``eval_every``: validate inside the epoch (eval mode draws no random numbers: training is unchanged)."""
        val = self.validate()
        self.tracker.log_eval({"step": self.state.global_step, "epoch": epoch + 1, "val/loss_excl_padding": val["loss"],
                               "val/perplexity": val["perplexity"], "val/accuracy_excl_padding": val["accuracy"]})
        stop = self.after_validation(val, final=False, when=f"optimizer step {self.state.global_step}")
        if stop:
            raise StopTraining(stop)
        self.train_model.train()

    def after_validation(self, val: dict, final: bool, when: str) -> Outcome | None:
        """A non-finite validation loss stops the run; else a search trial's pruner is asked."""
        if not math.isfinite(val["loss"]):
            best = (f"the best so far is epoch {self.state.best_epoch} ({self.state.best_val_loss:.4f})"
                    if self.state.best_epoch else "no epoch had a finite validation loss")
            return Outcome(OutcomeKind.NON_FINITE, (
                f"Training stopped: the validation loss (excl. padding) at {when} is not finite ({val['loss']}); {best}. "
                "The model's weights are finite but produce non-finite logits: lower learning_rate or use precision='fp32'."))
        reason = self.on_evaluation(self.state.global_step, val["loss"], final) if self.on_evaluation else None
        return Outcome(OutcomeKind.PRUNED, reason) if reason else None

    def record_epoch(self, epoch: int, val: dict, seconds: float) -> None:
        sums, state = self.state.epoch_sums, self.state
        steps = [r for r in self.tracker.step_rows if r["epoch"] == epoch + 1]
        row = self.tracker.log_epoch({
            "epoch": epoch + 1, "global_step": state.global_step,
            "train/loss_excl_padding": sums.loss, "val/loss_excl_padding": val["loss"], "val/perplexity": val["perplexity"],
            "train/accuracy_excl_padding": sums.accuracy, "val/accuracy_excl_padding": val["accuracy"],
            "learning_rate": steps[-1]["train/learning_rate"] if steps else None,  # the rate the last step used
            "train/real_tokens": int(sums.real_targets), "train/padded_tokens": int(sums.padded_positions),
            "train/pad_fraction": sums.pad_fraction, "val/real_tokens": val["real_tokens"],
            "val/padded_tokens": val["padded_tokens"],
            "train/real_tokens_per_sec": float(sums.real_targets) / max(state.train_seconds, 1e-9),  # training phase only
            "epoch_time_s": seconds,  # training and validation of this epoch (after a resume: only the part run now)
            "train/distinct_batch_shapes": len(state.batch_shapes),  # so far in the run
        })
        self.tracker.message(f"epoch {epoch + 1}{'' if None in self.steps_per_epoch else f'/{self.n_epochs}'}: train loss (excl. padding) {sums.loss:.4f} | "
                             f"val loss (excl. padding) {val['loss']:.4f} | val perplexity {val['perplexity']:.2f} | "
                             f"padded positions {row['train/pad_fraction']:.1%}")

    def track_best(self, epoch: int, val: dict) -> bool:
        """Remember the best validation epoch (and its weights when they are to be restored). NaN never improves."""
        state = self.state
        if not val["loss"] < state.best_val_loss:
            state.epochs_without_improvement += 1
            return False
        state.best_val_loss, state.best_epoch, state.epochs_without_improvement = val["loss"], epoch + 1, 0
        if self.settings.load_best_model_at_end:
            self.best_weights = (fsdp.local_weights(self.model) if self.sharded else
                                 {k: v.detach().to("cpu", copy=True) for k, v in self.model.state_dict().items()})
        return True

    def early_stopping(self, epoch: int) -> Outcome | None:
        state, patience = self.state, self.settings.early_stopping_patience
        if patience and state.epochs_without_improvement >= patience and not self.run_finished(epoch):
            return Outcome(OutcomeKind.STOPPED_EARLY,
                           f"early stopping: validation loss (excl. padding) did not improve for {patience} epoch(s); "
                           f"best {state.best_val_loss:.4f} at epoch {state.best_epoch}")
        return None

    # -- checkpoints -------------------------------------------------------------------------------
    @property
    def checkpoints_dir(self) -> Path:
        return Path(self.settings.output_dir) / "checkpoints"

    def state_dict(self) -> dict:
        """What a checkpoint carries, one entry per file. Called on every process: it gathers each one's RNG state."""
        rng_states = self.gathered(rng_state())
        return {"model.pt": self.model.state_dict(), "optimizer.pt": self.optimizer.state_dict(),
                "trainer_state.pt": {"state": asdict(self.state), "scheduler": self.scheduler.state_dict(),
                                     "scaler": self.amp.state_dict(), "rng": rng_states,
                                     "tracker": self.tracker.state_dict(),
                                     "data": {"train": self.gathered(self.data.train.state_dict()),
                                              "val": self.gathered(self.data.val.state_dict())}}}

    def load_state_dict(self, files: dict) -> None:
        try:
            if "model.pt" in files:
                self.model.load_state_dict(files["model.pt"])
            else:  # a sharded checkpoint (fsdp=True): model and optimizer from its shards, on any number of processes
                sharded_checkpoint.load_model_and_optimizer(self.model, self.optimizer, files["folder"])
        except RuntimeError as error:
            raise ValueError(f"Cannot resume: the checkpoint's parameters do not match this model ({error}). "
                             "Build the same architecture, or start fresh.") from error
        if "optimizer.pt" in files:
            self.optimizer.load_state_dict(files["optimizer.pt"])
        trainer_state = files["trainer_state.pt"]
        self.scheduler.load_state_dict(trainer_state["scheduler"])
        rate_from_schedule(self.optimizer, self.scheduler)
        self.amp.load_state_dict(trainer_state["scaler"])
        self.state = TrainState.from_dict(trainer_state["state"])
        # The rows are read back from the metrics files of the run the checkpoint belongs to (rank 0 reads them).
        run_dir = Path(files["folder"]).parent.parent if "folder" in files else Path(self.settings.output_dir)
        self.tracker.load_state_dict(trainer_state["tracker"], ctx=self.ctx, run_dir=run_dir)
        # Each source takes back its own state and refuses, naming the example, when its data changed.
        sources = trainer_state.get("data") or {"train": trainer_state.get("stream")}  # "stream": before the contract
        for name, source in (("train", self.data.train), ("val", self.data.val)):
            if sources.get(name):
                source.load_state_dict(sources[name][self.ctx.rank])

    def gathered(self, value) -> list:
        """``value`` of every process, in rank order (all processes take part)."""
        if not self.ctx.enabled:
            return [value]
        values = [None] * self.ctx.world_size
        torch.distributed.all_gather_object(values, value)
        return values

    def checkpoint_meta(self) -> dict:
        """What identifies the run a checkpoint belongs to (compared on resume) and where it stands."""
        return {FORMAT_KEY: FORMAT_VERSION, "settings": self.settings.as_dict(), "data_fingerprint": self.fingerprints["train"],
                "val_fingerprint": self.fingerprints["val"], "run_id": self.run_id, "world_size": self.ctx.world_size,
                "epoch": self.state.epoch, "step_in_epoch": self.state.step_in_epoch,
                "best_epoch": self.state.best_epoch, "best_val_loss": self.state.best_val_loss}

    def load_weights(self, weights: dict) -> None:
        """Weights kept by ``track_best`` or read by :meth:`saved_weights` back into the model."""
        if self.sharded:
            fsdp.load_local_weights(self.model, weights)
        else:
            self.model.load_state_dict(weights)

    def saved_weights(self, loaded: dict) -> dict:
        """The model weights of a loaded checkpoint folder (``checkpoint.load_checkpoint``), as ``load_weights`` takes them."""
        if "model.pt" in loaded:
            return loaded["model.pt"]
        weights = sharded_checkpoint.load_model_weights(self.model, loaded["folder"])
        return fsdp.local_weights_of(weights) if self.sharded else weights

    def save_checkpoint(self, best: bool = False) -> None:
        """Only at optimizer-step boundaries, after pending steps are recorded. Every rank takes part (each one's RNG
        state is gathered); rank 0 hands a host snapshot to the background writer and training goes on."""
        self.tracker.before_checkpoint()  # the rows the checkpoint counts are in the metrics files first
        self.last_checkpoint_clock = time.monotonic()
        if self.sharded:  # every process writes its shards, synchronously (not through the background writer)
            sharded_checkpoint.save_checkpoint(self, best)
            return
        files = self.state_dict()
        failed = self.checkpoint_writer.wait() if self.checkpoint_writer else None  # at most one write in flight
        # All ranks learn that rank 0's previous write failed and stop together (one flag; a checkpoint is a sync
        # point anyway), instead of the others waiting forever in the next collective.
        if any_rank(failed is not None, self.ctx, self.device):
            raise CheckpointWriteError(f"Training stopped: {failed or 'rank 0 could not write a checkpoint'}. Check "
                                       f"free space and access under {self.settings.output_dir}, then resume.")
        if self.checkpoint_writer:
            # Only the optimizer update changes the weights and moments: the writer copies them meanwhile.
            updated = [p for p in self.model.parameters()] + [t for s in self.optimizer.state.values()
                                                              for t in s.values() if torch.is_tensor(t)]
            self.checkpoint_writer.submit(self.state.global_step, files, self.checkpoint_meta(), best,
                                          self.checkpoint_written, {t.untyped_storage().data_ptr() for t in updated})

    def checkpoint_written(self, step_folder: Path, best_folder: Path | None) -> None:
        """Called by the writer once a checkpoint is complete: only then do results name it."""
        self.last_checkpoint = str(step_folder)
        if best_folder is not None:
            self.best_checkpoint = str(best_folder)

    def checkpoint_clock_due(self, at_sync_point: bool) -> bool:
        """``checkpoint_every_minutes``: has that much wall time passed since the last checkpoint (or the start)?"""
        minutes = self.settings.checkpoint_every_minutes
        if not minutes:
            return False
        if self.ctx.enabled and not at_sync_point:  # under torchrun: only where the step rows are read anyway
            return False
        due = time.monotonic() - self.last_checkpoint_clock >= 60 * minutes
        # Clocks differ between processes: rank 0's decides for all (a broadcast; no rank may checkpoint alone,
        # state_dict() is a collective).
        return any_rank(due and self.ctx.is_main, self.ctx, self.device)

    def finish_checkpoints(self, outcome: Outcome | None) -> None:
        """The run's end: wait for the write in flight, so that results name only complete checkpoints.

        A failed write raises when the run ended as planned (completed, stopped early, pruned), as a synchronous
        write would have; when it ended for another reason (Ctrl-C, a non-finite loss, an error: ``outcome`` None)
        that reason is kept, and the failure is warned about and returned in ``results["checkpoint_error"]``.
        """
        failed = None
        if self.checkpoint_writer:
            try:
                failed = self.checkpoint_writer.wait()
            except KeyboardInterrupt:
                failed = (f"interrupted while checkpoint step-{self.checkpoint_writer.writing_step} was being written; "
                          "it completes in the background while this Python process lives")
        together = outcome is not None and outcome.kind is not OutcomeKind.INTERRUPTED  # all ranks end at this point
        if together:  # they agree on a failure, and return only once rank 0's last write is complete
            if any_rank(failed is not None, self.ctx, self.device):
                failed = failed or "rank 0 could not write the last checkpoint"
            barrier(self.ctx)
        if failed and together and outcome.kind is not OutcomeKind.NON_FINITE:
            raise CheckpointWriteError(f"{failed}. Resume from the last checkpoint under {self.checkpoints_dir} once "
                                       "the cause is fixed (free space, access to output_dir).")
        if failed:
            warnings.warn(f"The last checkpoint was not written: {failed}.", UserWarning, stacklevel=2)
        self.checkpoint_error = failed

"""One fine-tuning run as one object: ``Trainer`` owns the model, optimizer, schedule, scaler, data and progress.

``fit()`` runs the epochs and returns how they ended (an :class:`Outcome`). ``state_dict()`` says in one
place what a checkpoint carries and ``load_state_dict()`` takes it back; :mod:`run_checkpoints` decides when one
is taken, :mod:`checkpoint` writes and reads the files. How the model is called and wrapped is
:mod:`model_setup`'s; building a trainer from a user's arguments is :mod:`engine`'s job.
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import asdict, dataclass, field
from itertools import islice

import torch

from .data import BatchSource, PlanSettings, run_length, to_device
from .checkpoints import FORMAT_VERSION, META_KEY as FORMAT_KEY, RunCheckpoints, load_model_and_optimizer, run_folder_of
from .distributed import DistContext, all_gather_objects, all_reduce_sum, local_weights, replicated_value
from .evaluation import EvalCall, evaluate
from .metrics import GradientStats, MetricRows, epoch_line, epoch_row, eval_row, step_row
from .loss import TokenSums, count_real_targets
from .model import set_up_model
from .optim import build_optimizer, build_scheduler, rate_from_schedule
from .outcome import (COMPLETED, Outcome, OutcomeKind, StopTraining, early_stopped, non_finite_step,
                      non_finite_validation, nothing_to_train, out_of_memory_message)
from .reproducibility import rng_state, set_rng_state
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
    val_held_out: bool = False  # validation held out of train_data by val_fraction (val_data=None)
    token_bytes: torch.Tensor | None = None  # bytes of text per token id on the run's device (bits per byte), or None
    model_checks: dict = field(default_factory=dict)  # what the start-up probes of the model found (model/probes.py)


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


@dataclass
class RunRecord:
    """Where a run's facts go: its metric rows (the sinks that consume them are rank 0's), the run id its
    checkpoints carry, and W&B's per-layer gradient statistics when it logs them."""

    tracker: MetricRows
    run_id: str = ""
    gradient_stats: GradientStats | None = None


def batch_plan_of(settings: FineTuneSettings, ctx: DistContext) -> PlanSettings:
    """What decides each epoch's batches: the data group's batching, the seed, the accumulation, this process."""
    data, optimisation = settings.data, settings.optimisation
    return PlanSettings(data.batch_size, data.shuffle, data.group_by_length, settings.run.random_seed,
                        optimisation.gradient_accumulation_steps, ctx.world_size, ctx.rank, data.max_tokens_per_batch)


class Trainer:
    def __init__(self, model, settings: FineTuneSettings, data: RunData, *, ctx: DistContext, device: torch.device,
                 record: RunRecord, on_evaluation=None):
        self.model, self.settings, self.data, self.ctx, self.device = model, settings, data, ctx, device
        self.tracker, self.run_id, self.gradient_stats = record.tracker, record.run_id, record.gradient_stats
        self.on_evaluation = on_evaluation  # (step, val loss, final) -> a reason to prune the search trial, or None
        probe = to_device(data.train.padded_batch(), device)  # one batch with padding for the start-up probes
        self.setup = set_up_model(model, settings.numerics, probe, (data.pad_token_id, data.vocab_size),
                                  data=settings.data, sharded=settings.distributed.fsdp, ctx=ctx, device=device)
        self.caller, self.amp, self.train_model = self.setup.caller, self.setup.amp, self.setup.train_model
        self.plan_spec, run, optimisation = batch_plan_of(settings, ctx), settings.run, settings.optimisation
        self.length = run_length(data.train, self.plan_spec, run.n_epochs, run.max_steps)
        self.optimizer = build_optimizer(model, optimisation.learning_rate, optimisation.weight_decay)
        self.scheduler = build_scheduler(self.optimizer, optimisation.lr_schedule, self.length.total_steps,
                                         optimisation.warmup_steps_for(self.length.total_steps))
        self.fingerprints = {"train": data.train.fingerprint(), "val": data.val.fingerprint()}
        self.state = TrainState()
        # Sticky on the device: set by the first non-finite step, it makes every later update a no-op (fused
        # AdamW's found_inf) until the host reads it with the step rows. No host read per step.
        self.stop_flag = torch.zeros((), device=device)
        self.best_weights = None  # the best epoch's weights on the CPU, when load_best_model_at_end
        self.checkpoints = RunCheckpoints(settings.checkpoints, ctx, device, sharded=self.setup.sharded,
                                          note=self.tracker.message)

    # -- the loop ----------------------------------------------------------------------------------
    def fit(self) -> Outcome:
        """The epoch loop; returns why it ended. Ctrl-C and a non-finite loss end it with results kept."""
        settings, state = self.settings, self.state
        started = time.perf_counter() - state.run_seconds
        if state.global_step and self.length.nothing_left(state.epoch, state.global_step):
            outcome = nothing_to_train(settings.run.max_steps, settings.run.n_epochs, state.global_step)
            self.tracker.message(outcome.reason)
            return outcome
        try:
            for epoch in range(state.epoch, self.length.n_epochs):
                epoch_started = time.perf_counter()
                self.train_epoch(epoch)
                val = self.validate()
                self.record_epoch(epoch, val, time.perf_counter() - epoch_started)
                improved = self.track_best(epoch, val)
                # Cut short by max_steps: the position stays in the epoch (a raised max_steps continues there).
                if not self.length.cut_short(state, lambda: self.data.train.steps_in_epoch(self.plan_spec, epoch)):
                    state.start_epoch(epoch + 1)
                state.run_seconds = time.perf_counter() - started
                if settings.checkpoints.writes_checkpoints:
                    self.checkpoints.save(self, best=improved)
                finished = self.length.ends_after(epoch, state.global_step)
                stop = self.after_validation(val, final=finished, when=f"epoch {epoch + 1}")
                if stop or (stop := early_stopped(state, settings.run.early_stopping_patience, finished)) or finished:
                    return stop or COMPLETED
            return COMPLETED
        except KeyboardInterrupt:
            self.tracker.message(f"Interrupted at optimizer step {state.global_step}; returning the metrics so far.")
            return Outcome(OutcomeKind.INTERRUPTED, "interrupted (KeyboardInterrupt)")
        except StopTraining as stop:
            self.tracker.message(stop.outcome.reason)
            return stop.outcome
        except Exception as error:
            self.tracker.finish({})  # an unexpected failure still writes the CSVs and closes the W&B run, first
            self.checkpoints.finish(None)  # the write in flight completes; a failure of it is warned about
            if isinstance(error, torch.OutOfMemoryError):
                raise torch.OutOfMemoryError(out_of_memory_message(
                    state.global_step, self.plan_spec.batch_size, self.plan_spec.accumulation)) from error
            raise
        finally:
            state.run_seconds = time.perf_counter() - started

    def train_epoch(self, epoch: int) -> None:
        run, logging, state = self.settings.run, self.settings.logging, self.state
        steps = self.data.train.steps(self.plan_spec, epoch, state.step_in_epoch)
        steps_in_epoch = self.length.steps_in(epoch)  # None: a stream's (its epoch ends with the data)
        self.train_model.train()
        pending = []
        started = time.perf_counter()
        try:
            # max_steps ends the run
            left = max(0, run.max_steps - state.global_step) if run.max_steps else None
            for step_in_epoch, micro_batches in islice(steps, left):
                pending.append(self.optimizer_step([to_device(batch, self.device) for batch in micro_batches]))
                state.global_step += 1
                state.step_in_epoch = step_in_epoch + 1
                last_of_epoch = state.step_in_epoch == steps_in_epoch or self.length.steps_done(state.global_step)
                # Not at an epoch's last step: the epoch-end checkpoint follows its validation (a second write of the
                # same step, which would wait for the first).
                checkpoint_due = not last_of_epoch and self.checkpoints.due(state.global_step,
                                                                            len(pending) >= logging.log_every)
                eval_due = bool(run.eval_every) and state.global_step % run.eval_every == 0 and not last_of_epoch
                if checkpoint_due or eval_due or len(pending) >= logging.log_every or last_of_epoch:
                    flushing, pending = pending, []
                    self.record_steps(flushing, epoch)
                if checkpoint_due or eval_due:  # the checkpoint carries the training time so far; writes and
                    state.train_seconds += time.perf_counter() - started  # validation are not training time
                    if eval_due:  # before the checkpoint, which then counts its row (a resume does not redo it)
                        self.evaluate_mid_epoch(epoch)
                    if checkpoint_due:
                        self.checkpoints.save(self)
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
            with self.setup.gradient_sync(self.model, ctx, last):
                sums += forward_backward(self.train_model, batch, self.data.pad_token_id, caller=self.caller,
                                         loss_divisor=divisor, autocast=self.amp.autocast, scaler=self.amp.scaler)
        self.state.note_shapes(batches)
        self.amp.unscale_(self.optimizer)
        if self.gradient_stats is not None:
            self.gradient_stats.record_if_due(self.model, self.state.global_step + 1, settings.logging)
        max_norm = settings.optimisation.max_grad_norm or math.inf  # None: no clipping (it is > 0 when set)
        # The norm before clipping; over shards it is one all-reduce, and a replicated DTensor made plain here.
        grad_norm = replicated_value(torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm))
        learning_rate = self.optimizer.param_groups[0]["lr"]
        # Under fp16 the GradScaler skips inf gradients itself (and lowers its scale); only the loss decides there.
        not_finite = ~torch.isfinite(sums.loss_sum) | (~torch.isfinite(grad_norm) & (not self.amp.scaler.is_enabled()))
        # All processes take the same decision, or the ones that go on would wait forever for one that stopped.
        not_finite = all_reduce_sum(not_finite.float(), ctx).clamp(max=1)
        self.stop_flag = torch.maximum(self.stop_flag, not_finite)
        self.checkpoints.before_update()  # a checkpoint's copy of the weights and moments completes before they change
        loss_scale = self.amp.scale_in_effect()  # before this step's update changes it
        self.apply_update(grad_norm)
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return {"sums": sums, "grad_norm": grad_norm.detach().double(), "not_finite": not_finite,
                "learning_rate": learning_rate, "loss_scale": loss_scale}

    def apply_update(self, grad_norm: torch.Tensor) -> None:
        """The optimizer step, skipped on the device once ``stop_flag`` is set: a non-finite loss or gradient
        never reaches the weights. Under fp16 an overflowed gradient skips only its own step."""
        self.amp.step(self.optimizer, self.amp.skip_update(self.stop_flag, grad_norm))

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
                self.amp.scale_at_stop = pending[k].get("loss_scale")  # what the last applied step left
                self.stop_non_finite(first_step + k, step_sums, grad_norm, pending[k]["learning_rate"],
                                     skipped=len(pending) - k)
            self.state.epoch_sums += step_sums
            self.state.train_sequences += int(step_sums.sequences)
            rows.append(step_row(first_step + k, epoch, step_sums, pending[k]["learning_rate"], grad_norm))
        self.tracker.log_steps(rows)

    def stop_non_finite(self, step: int, sums: TokenSums, grad_norm: float, learning_rate: float, skipped: int):
        self.state.global_step -= skipped  # the flagged step and those after it were not applied
        self.state.step_in_epoch -= skipped
        raise StopTraining(non_finite_step(step, sums.loss_sum, grad_norm, learning_rate,
                                           weight_decay=self.settings.optimisation.weight_decay,
                                           max_grad_norm=self.settings.optimisation.max_grad_norm))

    def validate(self) -> dict:
        return evaluate(self.model, self.data.val, self.data.pad_token_id, batch_size=self.settings.data.batch_size,
                        device=self.device, ctx=self.ctx,
                        call=EvalCall(self.caller, self.amp.autocast, self.data.token_bytes))

    def evaluate_mid_epoch(self, epoch: int) -> None:
        """``eval_every``: validate inside the epoch (eval mode draws no random numbers: training is unchanged)."""
        val = self.validate()
        self.tracker.log_eval(eval_row(self.state.global_step, epoch, val))
        stop = self.after_validation(val, final=False, when=f"optimizer step {self.state.global_step}")
        if stop:
            raise StopTraining(stop)
        self.train_model.train()

    def after_validation(self, val: dict, final: bool, when: str) -> Outcome | None:
        """A non-finite validation loss stops the run; else a search trial's pruner is asked."""
        if not math.isfinite(val["loss"]):
            return non_finite_validation(when, val["loss"], self.state.best_epoch, self.state.best_val_loss)
        reason = self.on_evaluation(self.state.global_step, val["loss"], final) if self.on_evaluation else None
        return Outcome(OutcomeKind.PRUNED, reason) if reason else None

    def record_epoch(self, epoch: int, val: dict, seconds: float) -> None:
        steps = [r for r in self.tracker.step_rows if r["epoch"] == epoch + 1]
        learning_rate = steps[-1]["train/learning_rate"] if steps else None
        row = self.tracker.log_epoch(epoch_row(epoch, self.state, val, epoch_seconds=seconds,
                                               learning_rate=learning_rate))
        self.tracker.message(epoch_line(row, None if None in self.length.steps_per_epoch else self.length.n_epochs))

    def track_best(self, epoch: int, val: dict) -> bool:
        """Remember the best validation epoch (and its weights when they are to be restored)."""
        improved = self.state.note_validation(epoch, val["loss"])
        if improved and self.settings.checkpoints.load_best_model_at_end:
            self.best_weights = local_weights(self.model)  # the CPU copy of every (local) weight
        return improved

    # -- what a checkpoint carries ----------------------------------------------------------------
    def state_dict(self) -> dict:
        """What a checkpoint carries, one entry per file. Called on every process: it gathers each one's RNG state."""
        rng_states = all_gather_objects(rng_state(), self.ctx)
        return {"model.pt": self.model.state_dict(), "optimizer.pt": self.optimizer.state_dict(),
                "trainer_state.pt": {"state": asdict(self.state), "scheduler": self.scheduler.state_dict(),
                                     "scaler": self.amp.state_dict(), "rng": rng_states,
                                     "tracker": self.tracker.state_dict(),
                                     "data": {"train": all_gather_objects(self.data.train.state_dict(), self.ctx),
                                              "val": all_gather_objects(self.data.val.state_dict(), self.ctx)}}}

    def load_state_dict(self, files: dict) -> None:
        """A loaded checkpoint folder back into this run, all of it: weights, optimizer, schedule, scaler, counters,
        rows, the sources' positions, the checkpoint folders and best weights, and last the random state."""
        load_model_and_optimizer(self.model, self.optimizer, files)
        trainer_state = files["trainer_state.pt"]
        self.scheduler.load_state_dict(trainer_state["scheduler"])
        rate_from_schedule(self.optimizer, self.scheduler)
        self.amp.load_state_dict(trainer_state["scaler"])
        self.state = state = TrainState.from_dict(trainer_state["state"])
        # The rows are read back from the metrics files of the run the checkpoint belongs to (rank 0 reads them).
        self.tracker.load_state_dict(trainer_state["tracker"], ctx=self.ctx, run_dir=run_folder_of(files["folder"]))
        # A run that max_steps ended inside an epoch recorded that epoch there; continued, its row comes again.
        if state.step_in_epoch and not self.length.nothing_left(state.epoch, state.global_step):
            self.tracker.drop_epoch_row(state.epoch + 1)
        # Each source takes back its own state and refuses, naming the example, when its data changed.
        sources = trainer_state.get("data") or {"train": trainer_state.get("stream")}  # "stream": before the contract
        for name, source in (("train", self.data.train), ("val", self.data.val)):
            if sources.get(name):
                source.load_state_dict(sources[name][self.ctx.rank])
        self.best_weights = self.checkpoints.resume_from(files, state, self.model)
        rng = trainer_state["rng"]  # one per process that wrote it; a changed world size reuses them in turn
        set_rng_state(rng[self.ctx.rank % len(rng)])

    def checkpoint_meta(self) -> dict:
        """What identifies the run a checkpoint belongs to (compared on resume) and where it stands."""
        return {FORMAT_KEY: FORMAT_VERSION, "settings": self.settings.as_dict(),
                "data_fingerprint": self.fingerprints["train"], "val_fingerprint": self.fingerprints["val"],
                "run_id": self.run_id, "world_size": self.ctx.world_size,
                "epoch": self.state.epoch, "step_in_epoch": self.state.step_in_epoch,
                "best_epoch": self.state.best_epoch, "best_val_loss": self.state.best_val_loss}

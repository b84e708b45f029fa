"""Public entry points: ``test_fine_tuning`` and ``evaluate_perplexity``.

This file is the orchestration: check inputs -> build data -> per epoch: train, validate,
record, checkpoint -> return results. The pieces live in ``utils/training/``. The rule that
holds everywhere: padding never counts. Every loss, accuracy and perplexity is a sum over
real target tokens divided by their number (see ``utils/training/loss.py``).
"""
from __future__ import annotations

import contextlib
import math
import random
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .training import checkpoint as ckpt
from .training.checks import check_logits, check_vocabulary
from .training.data import ExampleBatches, LoaderBatches, batch_source, split_train_val, synthetic_sequences, to_device
from .training.distributed import DistContext, all_reduce_sum, barrier, setup_distributed, wrap_model
from .training.loss import LossStats, count_real_targets, masked_lm_loss
from .training.metrics import MetricsTracker, safe_exp
from .training.model_io import ModelCaller, unwrap, vocab_size_of
from .training.optim import build_optimizer, build_scheduler
from .training.pad_id import detect_pad_token_id
from .training.settings import FineTuneSettings

__all__ = ["test_fine_tuning", "evaluate_perplexity"]


def _detect_pad_token_id(config, tokenizer=None) -> int:
    """Pad id from ``config.pad_token_id``, then the tokenizer's pad, then its eos (warned), else 0 (warned)."""
    return detect_pad_token_id(config, tokenizer)[0]


# ----------------------------------------------------------------------------------------------
# The shared train step and validation pass
# ----------------------------------------------------------------------------------------------
def _compute_loss_and_backward(model, batch, pad_token_id, *, caller=None, loss_divisor=None,
                               autocast=contextlib.nullcontext, scaler=None) -> LossStats:
    """Forward one micro-batch, backward ``loss_sum / loss_divisor``; returns detached sums.

    ``loss_divisor`` is the real-target count of the whole optimizer step (all micro-batches, all
    processes), so accumulated gradients equal those of the one large batch. Default: this batch's.
    """
    caller = caller or ModelCaller(model)
    with autocast():
        logits = caller(model, batch)
    stats = masked_lm_loss(logits, batch["input_ids"], batch.get("labels"), batch.get("attention_mask"), pad_token_id)
    divisor = stats.real_targets.clamp(min=1) if loss_divisor is None else loss_divisor
    loss = stats.loss_sum / divisor
    (scaler.scale(loss) if scaler is not None else loss).backward()
    return LossStats(stats.loss_sum.detach(), stats.real_targets, stats.correct, stats.target_positions)


def _run_validation_epoch(model, data, pad_token_id, *, batch_size=8, device=None, caller=None,
                          ctx: DistContext | None = None, autocast=contextlib.nullcontext) -> dict:
    """Token-weighted loss, perplexity and accuracy over all real targets of ``data``."""
    model = unwrap(model)  # DDP's forward would sync buffers; shards here may differ in batch count
    ctx = ctx or DistContext()
    source = data if isinstance(data, (ExampleBatches, LoaderBatches)) else batch_source(data, pad_token_id, what="validation data")
    device = device or next(model.parameters()).device
    caller = caller or ModelCaller(model)
    totals = torch.zeros(3, dtype=torch.float64, device=device)  # loss sum, real targets, correct
    positions = 0  # a Python int: known from shapes, no device round trip
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for planned in source.eval_plan(batch_size, world_size=ctx.world_size, rank=ctx.rank):
                batch = to_device(source.collate(planned), device)
                with autocast():
                    logits = caller(model, batch)
                stats = masked_lm_loss(logits, batch["input_ids"], batch.get("labels"), batch.get("attention_mask"), pad_token_id)
                totals += stats.device_sums()
                positions += stats.target_positions
    finally:
        model.train(was_training)
    totals = torch.cat([totals, totals.new_tensor([positions])])
    loss_sum, real, correct, positions = all_reduce_sum(totals, ctx).tolist()
    loss = loss_sum / max(real, 1.0)
    return {"loss": loss, "perplexity": safe_exp(loss), "accuracy": correct / max(real, 1.0),
            "real_tokens": int(real), "padded_tokens": int(positions - real)}


# ----------------------------------------------------------------------------------------------
# Run state
# ----------------------------------------------------------------------------------------------
@dataclass
class TrainState:
    """Everything about progress that a checkpoint must carry to continue exactly."""

    epoch: int = 0
    step_in_epoch: int = 0  # optimizer steps already done in ``epoch``
    global_step: int = 0
    epoch_sums: dict = field(default_factory=lambda: dict.fromkeys(("loss_sum", "real", "correct", "positions", "train_seconds"), 0.0))
    best_val_loss: float = math.inf
    best_epoch: int | None = None
    epochs_without_improvement: int = 0


@dataclass
class _Run:
    model: nn.Module  # the user's module (trained in place)
    train_model: nn.Module  # the same, DDP-wrapped under torchrun
    caller: ModelCaller
    settings: FineTuneSettings
    ctx: DistContext
    device: torch.device
    pad_token_id: int
    train: ExampleBatches | LoaderBatches
    val: ExampleBatches | LoaderBatches
    optimizer: torch.optim.Optimizer
    scheduler: object
    scaler: torch.amp.GradScaler
    tracker: MetricsTracker
    data_fingerprint: str
    state: TrainState = field(default_factory=TrainState)
    best_weights: dict | None = None
    best_checkpoint: str | None = None
    last_checkpoint: str | None = None

    @property
    def checkpoints_dir(self) -> Path:
        return Path(self.settings.output_dir) / "checkpoints"

    def autocast(self):
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.settings.mixed_precision)
        if dtype is None or self.device.type != "cuda":
            return contextlib.nullcontext()
        return torch.autocast("cuda", dtype=dtype)


class _NonFiniteLoss(Exception):
    pass


# ----------------------------------------------------------------------------------------------
# test_fine_tuning
# ----------------------------------------------------------------------------------------------
def test_fine_tuning(model, config, train_data=None, val_data=None, n_epochs=3, learning_rate=5e-5,
                     batch_size=4, use_wandb=False, *, gradient_accumulation_steps=1, weight_decay=0.01,
                     max_grad_norm=1.0, lr_schedule="cosine", warmup_ratio=0.1, shuffle=True, random_seed=42,
                     tokenizer=None, device=None, **options) -> dict:
    """Fine-tune ``model`` (in place) as a causal LM; padding never counts. Returns a results dict.

    Further keywords (see ``FineTuneSettings``): ``group_by_length``, ``pad_to_multiple_of``,
    ``mixed_precision``, ``output_dir``, ``checkpoint_every``, ``keep_checkpoints``,
    ``resume_from_checkpoint``, ``early_stopping_patience``, ``load_best_model_at_end``,
    ``wandb_project``, ``wandb_run_name``, ``wandb_mode``, ``progress``, ``log_every``, ``val_fraction``.
    """
    unknown = set(options) - FineTuneSettings.keyword_names()
    if unknown:
        raise TypeError(f"test_fine_tuning() got unknown keyword(s) {sorted(unknown)}; "
                        f"known: {sorted(FineTuneSettings.keyword_names())}.")
    settings = FineTuneSettings(
        n_epochs=n_epochs, learning_rate=learning_rate, batch_size=batch_size, use_wandb=use_wandb,
        gradient_accumulation_steps=gradient_accumulation_steps, weight_decay=weight_decay,
        max_grad_norm=max_grad_norm, lr_schedule=lr_schedule, warmup_ratio=warmup_ratio, shuffle=shuffle,
        random_seed=random_seed, **options)
    settings.validate()
    ctx, device = setup_distributed(torch.device(device) if device is not None else None)
    if settings.mixed_precision and device.type != "cuda":
        warnings.warn(f"mixed_precision={settings.mixed_precision!r} applies on CUDA only; training in float32 on "
                      f"{device.type}.", UserWarning, stacklevel=2)
    _seed_everything(settings.random_seed)
    pad_token_id, pad_source = detect_pad_token_id(config if config is not None else getattr(model, "config", None), tokenizer)
    model.to(device)

    train, val, vocab_size = _prepare_data(model, config, train_data, val_data, pad_token_id, settings, ctx,
                                           settings.padding_multiple(device))
    caller = ModelCaller(model)
    vocab_size = _check_model_output(model, caller, train, val, pad_token_id, device, vocab_size)

    steps_per_epoch = math.ceil(len(train.plan(settings.batch_size, shuffle=False, group_by_length=False, seed=0,
                                               epoch=0, world_size=ctx.world_size, rank=ctx.rank))
                                / settings.gradient_accumulation_steps)
    optimizer = build_optimizer(model, settings.learning_rate, settings.weight_decay)
    run = _Run(
        model=model, train_model=wrap_model(model, ctx, device), caller=caller, settings=settings, ctx=ctx,
        device=device, pad_token_id=pad_token_id, train=train, val=val, optimizer=optimizer,
        scheduler=build_scheduler(optimizer, settings.lr_schedule, settings.n_epochs * steps_per_epoch, settings.warmup_ratio),
        scaler=torch.amp.GradScaler("cuda", enabled=settings.mixed_precision == "fp16" and device.type == "cuda"),
        tracker=MetricsTracker(settings.output_dir, is_main=ctx.is_main, use_wandb=settings.use_wandb, progress=settings.progress),
        data_fingerprint=ckpt.data_fingerprint(train),
    )
    resumed = _resume(run)
    run_config = dict(settings.as_dict(), pad_token_id=pad_token_id, pad_token_id_source=pad_source,
                      n_parameters=sum(p.numel() for p in model.parameters()), vocab_size=vocab_size,
                      world_size=ctx.world_size, steps_per_epoch=steps_per_epoch, model_class=type(model).__name__)
    run.tracker.start(run_config, total_steps=settings.n_epochs * steps_per_epoch, wandb_project=settings.wandb_project,
                      wandb_run_name=settings.wandb_run_name, wandb_mode=settings.wandb_mode)
    if resumed is not None:
        ckpt.set_rng_state(resumed["trainer_state.pt"]["rng"][ctx.rank])  # last: nothing may draw random numbers after
        run.tracker.message(f"Resumed from {resumed['folder']} (optimizer step {run.state.global_step}).")

    outcome = _train(run)
    return _finish(run, outcome, resumed, pad_source, vocab_size)
test_fine_tuning.__test__ = False  # library API, not a pytest test


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _prepare_data(model, config, train_data, val_data, pad_token_id, settings, ctx, padding_multiple):
    vocab_size = vocab_size_of(model, config)
    if train_data is None:
        if vocab_size is None:
            raise ValueError("train_data=None needs the vocabulary size for synthetic data: set config.vocab_size.")
        warnings.warn("train_data=None: training on a SYNTHETIC set of 256 variable-length sequences (arithmetic "
                      "progressions of token ids). Pass your tokenized text as train_data for real fine-tuning.",
                      UserWarning, stacklevel=3)
        train_data = synthetic_sequences(vocab_size, pad_token_id, seed=settings.random_seed)
    train = batch_source(train_data, pad_token_id, padding_multiple, "training data")
    if val_data is None:
        if not isinstance(train, ExampleBatches):
            raise ValueError("val_data=None needs train_data as a list of examples to hold out from; pass val_data.")
        train_examples, val_examples = split_train_val(train.examples, settings.val_fraction, settings.random_seed)
        train, val = ExampleBatches(train_examples, train.collator), ExampleBatches(val_examples, train.collator)
    else:
        val = batch_source(val_data, pad_token_id, padding_multiple, "validation data")
    if ctx.enabled and not (train.plannable and val.plannable):
        raise ValueError("Under torchrun, pass train_data and val_data as lists of examples (not DataLoaders): the "
                         "package shards them across processes itself so that no example counts twice.")
    if vocab_size is not None:
        check_vocabulary(vocab_size, pad_token_id, {"training data": train, "validation data": val})
    return train, val, vocab_size


def _check_model_output(model, caller, train, val, pad_token_id, device, vocab_size) -> int:
    """One forward pass in eval mode (draws no random numbers) to check the logits; returns the vocab size.

    When neither the config nor the model named the vocabulary, the logits' width is it, and the
    token-id checks that ``_prepare_data`` could not run yet run now.
    """
    planned = train.plan(2, shuffle=False, group_by_length=False, seed=0, epoch=0)[0]
    batch = to_device(train.collate(planned), device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            logits = caller(model, batch)
    finally:
        model.train(was_training)
    check_logits(logits, batch, vocab_size if vocab_size is not None else logits.shape[-1])
    if vocab_size is None:
        vocab_size = logits.shape[-1]
        check_vocabulary(vocab_size, pad_token_id, {"training data": train, "validation data": val})
    return vocab_size


def _train(run: _Run) -> dict:
    """The epoch loop; returns why it ended. Ctrl-C and a non-finite loss end it with results kept."""
    settings, state = run.settings, run.state
    try:
        for epoch in range(state.epoch, settings.n_epochs):
            started = time.perf_counter()
            _train_epoch(run, epoch)
            val = _run_validation_epoch(run.model, run.val, run.pad_token_id, batch_size=settings.batch_size,
                                        device=run.device, caller=run.caller, ctx=run.ctx, autocast=run.autocast)
            _record_epoch(run, epoch, val, time.perf_counter() - started)
            stop_reason = _after_epoch(run, epoch, val)
            if stop_reason:
                return {"stopped_early": True, "stop_reason": stop_reason, "interrupted": False}
        return {"stopped_early": False, "stop_reason": None, "interrupted": False}
    except KeyboardInterrupt:
        run.tracker.message(f"Interrupted at optimizer step {state.global_step}; returning the metrics so far.")
        return {"stopped_early": True, "stop_reason": "interrupted (KeyboardInterrupt)", "interrupted": True}
    except _NonFiniteLoss as error:
        run.tracker.message(str(error))
        return {"stopped_early": True, "stop_reason": str(error), "interrupted": False}
    except Exception as error:
        run.tracker.finish({})  # an unexpected failure still writes the CSVs and closes the W&B run
        if isinstance(error, torch.OutOfMemoryError):
            raise torch.OutOfMemoryError(
                f"Out of GPU memory at optimizer step {state.global_step} with batch_size={settings.batch_size}. Use "
                f"a smaller batch_size and raise gradient_accumulation_steps to keep the effective batch "
                f"(e.g. batch_size={max(1, settings.batch_size // 2)}, gradient_accumulation_steps="
                f"{settings.gradient_accumulation_steps * 2}), or mixed_precision='bf16'.") from error
        raise


def _train_epoch(run: _Run, epoch: int) -> None:
    settings, state = run.settings, run.state
    accum = settings.gradient_accumulation_steps
    plan = run.train.plan(settings.batch_size, shuffle=settings.shuffle, group_by_length=settings.group_by_length,
                          seed=settings.random_seed, epoch=epoch, accumulation=accum, world_size=run.ctx.world_size,
                          rank=run.ctx.rank)
    groups = [plan[i:i + accum] for i in range(0, len(plan), accum)]
    run.train_model.train()
    pending = []
    started = time.perf_counter()
    try:
        for step_in_epoch in range(state.step_in_epoch, len(groups)):  # a resume skips the steps already done
            batches = [to_device(run.train.collate(planned), run.device) for planned in groups[step_in_epoch]]
            pending.append(_optimizer_step(run, batches))
            state.global_step += 1
            state.step_in_epoch = step_in_epoch + 1
            checkpoint_due = bool(settings.checkpoint_every) and state.global_step % settings.checkpoint_every == 0
            if checkpoint_due or len(pending) >= settings.log_every or state.step_in_epoch == len(groups):
                flushing, pending = pending, []
                _flush_steps(run, flushing, epoch)
            if checkpoint_due:
                _save_checkpoint(run)
    except KeyboardInterrupt:
        _flush_steps(run, pending, epoch)  # every completed step stays in the history
        raise
    finally:
        state.epoch_sums["train_seconds"] += time.perf_counter() - started  # training only, no validation


def _optimizer_step(run: _Run, batches: list[dict]) -> dict:
    """One optimizer step over its micro-batches; the loss is normalised by the step's global real targets."""
    # Counted before any backward, over all micro-batches and processes: token-weighted, not mean of means.
    real_in_step = all_reduce_sum(torch.stack([count_real_targets(b, run.pad_token_id) for b in batches]).sum().float(), run.ctx)
    divisor = real_in_step.clamp(min=1) / run.ctx.world_size  # DDP averages gradients over processes; undo it
    sums = torch.zeros(3, dtype=torch.float64, device=run.device)  # loss sum, real targets, correct
    positions = 0
    for i, batch in enumerate(batches):
        last = i == len(batches) - 1
        sync = run.train_model.no_sync() if run.ctx.enabled and not last else contextlib.nullcontext()
        with sync:
            stats = _compute_loss_and_backward(run.train_model, batch, run.pad_token_id, caller=run.caller,
                                               loss_divisor=divisor, autocast=run.autocast, scaler=run.scaler)
        sums += stats.device_sums()
        positions += stats.target_positions
    run.scaler.unscale_(run.optimizer)
    max_norm = run.settings.max_grad_norm if run.settings.max_grad_norm is not None else math.inf
    grad_norm = torch.nn.utils.clip_grad_norm_(run.model.parameters(), max_norm)  # returns the norm before clipping
    learning_rate = run.optimizer.param_groups[0]["lr"]
    run.scaler.step(run.optimizer)
    run.scaler.update()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    return {"sums": sums, "positions": positions, "grad_norm": grad_norm.detach().double(), "learning_rate": learning_rate}


def _flush_steps(run: _Run, pending: list[dict], epoch: int) -> None:
    """Read pending steps from the device in one sync (one all-reduce under torchrun) and record them."""
    if not pending:
        return
    device_sums = torch.stack([p["sums"] for p in pending])
    positions = device_sums.new_tensor([[p["positions"]] for p in pending])
    sums = all_reduce_sum(torch.cat([device_sums, positions], dim=1), run.ctx).cpu().tolist()
    norms = torch.stack([p["grad_norm"] for p in pending]).cpu().tolist()
    first_step = run.state.global_step - len(pending) + 1
    rows = []
    for k, ((loss_sum, real, correct, positions), grad_norm) in enumerate(zip(sums, norms)):
        step_loss = loss_sum / max(real, 1.0)
        if not math.isfinite(step_loss):
            run.tracker.log_steps(rows)
            raise _NonFiniteLoss(f"Training stopped: the loss became {step_loss} at optimizer step {first_step + k} "
                                 f"(epoch {epoch + 1}). Lower the learning_rate (now {run.settings.learning_rate:g}) "
                                 "or keep max_grad_norm clipping on; the results up to that step are returned.")
        for key, value in zip(("loss_sum", "real", "correct", "positions"), (loss_sum, real, correct, positions)):
            run.state.epoch_sums[key] += value
        rows.append({"step": first_step + k, "epoch": epoch + 1, "train/step_loss_excl_padding": step_loss,
                     "train/learning_rate": pending[k]["learning_rate"], "train/grad_norm": grad_norm,
                     "train/step_real_tokens": int(real)})
    run.tracker.log_steps(rows)


def _record_epoch(run: _Run, epoch: int, val: dict, seconds: float) -> None:
    sums = run.state.epoch_sums
    train_loss = sums["loss_sum"] / max(sums["real"], 1.0)
    steps = [r for r in run.tracker.step_rows if r["epoch"] == epoch + 1]
    row = run.tracker.log_epoch({
        "epoch": epoch + 1, "global_step": run.state.global_step,
        "train/loss_excl_padding": train_loss, "val/loss_excl_padding": val["loss"], "val/perplexity": val["perplexity"],
        "train/accuracy_excl_padding": sums["correct"] / max(sums["real"], 1.0), "val/accuracy_excl_padding": val["accuracy"],
        "learning_rate": steps[-1]["train/learning_rate"] if steps else None,  # the rate the last step used
        "train/real_tokens": int(sums["real"]), "train/padded_tokens": int(sums["positions"] - sums["real"]),
        "train/pad_fraction": (sums["positions"] - sums["real"]) / max(sums["positions"], 1.0),
        "val/real_tokens": val["real_tokens"], "val/padded_tokens": val["padded_tokens"],
        "train/real_tokens_per_sec": sums["real"] / max(sums["train_seconds"], 1e-9),  # training phase only
        "epoch_time_s": seconds,  # training and validation of this epoch (after a resume: only the part run now)
    })
    run.tracker.message(f"epoch {epoch + 1}/{run.settings.n_epochs}: train loss (excl. padding) {train_loss:.4f} | "
                        f"val loss (excl. padding) {val['loss']:.4f} | val perplexity {val['perplexity']:.2f} | "
                        f"padded positions {row['train/pad_fraction']:.1%}")


def _after_epoch(run: _Run, epoch: int, val: dict) -> str | None:
    """Best model, early stopping and the end-of-epoch checkpoint; returns a stop reason or None."""
    state, settings = run.state, run.settings
    improved = val["loss"] < state.best_val_loss
    if improved:
        state.best_val_loss, state.best_epoch, state.epochs_without_improvement = val["loss"], epoch + 1, 0
        if settings.load_best_model_at_end:
            run.best_weights = {k: v.detach().to("cpu", copy=True) for k, v in run.model.state_dict().items()}
    else:
        state.epochs_without_improvement += 1
    state.epoch, state.step_in_epoch = epoch + 1, 0
    state.epoch_sums = TrainState().epoch_sums
    if settings.checkpoint_every or settings.resume_from_checkpoint or settings.load_best_model_at_end:
        _save_checkpoint(run, best=improved)
    patience = settings.early_stopping_patience
    if patience and state.epochs_without_improvement >= patience and epoch + 1 < settings.n_epochs:
        return (f"early stopping: validation loss (excl. padding) did not improve for {patience} epoch(s); "
                f"best {state.best_val_loss:.4f} at epoch {state.best_epoch}")
    return None


def _save_checkpoint(run: _Run, best: bool = False) -> None:
    """Only at optimizer-step boundaries, after pending steps are flushed. Rank 0 writes; all ranks wait."""
    rng_states = [ckpt.rng_state()]
    if run.ctx.enabled:
        rng_states = [None] * run.ctx.world_size
        torch.distributed.all_gather_object(rng_states, ckpt.rng_state())
    if run.ctx.is_main:
        meta = {"settings": run.settings.as_dict(), "data_fingerprint": run.data_fingerprint,
                "world_size": run.ctx.world_size, "epoch": run.state.epoch, "step_in_epoch": run.state.step_in_epoch}
        trainer_state = {"state": asdict(run.state), "scheduler": run.scheduler.state_dict(),
                         "scaler": run.scaler.state_dict(), "rng": rng_states, "tracker": run.tracker.state_dict()}
        folder = ckpt.save_checkpoint(run.checkpoints_dir, run.state.global_step, model_state=run.model.state_dict(),
                                      optimizer_state=run.optimizer.state_dict(), trainer_state=trainer_state, meta=meta)
        run.last_checkpoint = str(folder)
        if best:
            run.best_checkpoint = str(ckpt.save_best(run.checkpoints_dir, model_state=run.model.state_dict(),
                                                     meta=dict(meta, val_loss=run.state.best_val_loss, best_epoch=run.state.best_epoch)))
        ckpt.prune_checkpoints(run.checkpoints_dir, run.settings.keep_checkpoints)
    barrier(run.ctx)


def _resume(run: _Run) -> dict | None:
    target = run.settings.resume_from_checkpoint
    if not target:
        return None
    if target is True:
        loaded = ckpt.find_resumable(run.checkpoints_dir)
        if loaded is None:
            run.tracker.message(f"resume_from_checkpoint=True: no checkpoint under {run.checkpoints_dir}; starting fresh.")
            return None
    else:
        try:
            loaded = ckpt.load_checkpoint(Path(target))
        except Exception as error:  # noqa: BLE001
            raise ValueError(f"Cannot resume from {target}: {type(error).__name__}: {error}. Pass a checkpoint folder "
                             f"(…/checkpoints/step-N) or resume_from_checkpoint=True for the newest.") from error
    ckpt.check_compatible(loaded["meta"], settings=run.settings.as_dict(), fingerprint=run.data_fingerprint,
                          world_size=run.ctx.world_size)
    try:
        run.model.load_state_dict(loaded["model.pt"])
    except RuntimeError as error:
        raise ValueError(f"Cannot resume: the checkpoint's parameters do not match this model ({error}). "
                         "Build the same architecture, or start fresh.") from error
    run.optimizer.load_state_dict(loaded["optimizer.pt"])
    trainer_state = loaded["trainer_state.pt"]
    run.scheduler.load_state_dict(trainer_state["scheduler"])
    run.scaler.load_state_dict(trainer_state["scaler"])
    run.state = TrainState(**trainer_state["state"])
    run.tracker.load_state_dict(trainer_state["tracker"])
    run.last_checkpoint = str(loaded["folder"])
    best = run.checkpoints_dir / "best"
    if run.settings.load_best_model_at_end and (best / "model.pt").exists():
        run.best_checkpoint = str(best)
        run.best_weights = torch.load(best / "model.pt", map_location="cpu")
    return loaded


def _finish(run: _Run, outcome: dict, resumed: dict | None, pad_source: str, vocab_size) -> dict:
    tracker, state = run.tracker, run.state
    if state.step_in_epoch and state.epoch_sums["real"]:  # a partial epoch (interrupted or stopped)
        partial_train_loss = state.epoch_sums["loss_sum"] / state.epoch_sums["real"]
    else:
        partial_train_loss = None
    if run.settings.load_best_model_at_end and run.best_weights is not None:
        run.model.load_state_dict(run.best_weights)
        tracker.message(f"Loaded the best model (epoch {state.best_epoch}, val loss excl. padding {state.best_val_loss:.4f}).")
    frame = tracker.epochs_frame()
    last = frame.iloc[-1] if len(frame) else None
    results = {
        "final_train_loss": partial_train_loss if partial_train_loss is not None else (None if last is None else float(last["train/loss_excl_padding"])),
        "final_val_loss": None if last is None else float(last["val/loss_excl_padding"]),
        "val_perplexity": None if last is None else float(last["val/perplexity"]),
        "final_train_accuracy": None if last is None else float(last["train/accuracy_excl_padding"]),
        "final_val_accuracy": None if last is None else float(last["val/accuracy_excl_padding"]),
        "pad_token_id": run.pad_token_id, "pad_token_id_source": pad_source, "vocab_size": vocab_size,
        "loss_history": [r["train/step_loss_excl_padding"] for r in tracker.step_rows],
        "metrics_summary": frame, "steps_summary": tracker.steps_frame(),
        "global_step": state.global_step, "epochs_completed": len(frame),
        "best_val_loss": state.best_val_loss if state.best_epoch else None, "best_epoch": state.best_epoch,
        "best_checkpoint": run.best_checkpoint, "last_checkpoint": run.last_checkpoint,
        "resumed_from_step": None if resumed is None else resumed["meta"]["step"],
        "resumed_from_checkpoint": None if resumed is None else str(resumed["folder"]),
        "output_dir": run.settings.output_dir, "metrics_csv": str(tracker.epochs_csv), "steps_csv": str(tracker.steps_csv),
        "wandb_run_id": tracker.wandb_run_id, "settings": run.settings.as_dict(), **outcome,
    }
    tracker.finish({k: v for k, v in results.items() if k in ("final_train_loss", "final_val_loss", "val_perplexity",
                                                               "global_step", "stopped_early", "interrupted")})
    results["plot_paths"] = tracker.plot() if run.settings.save_plots else {}
    return results


# ----------------------------------------------------------------------------------------------
# evaluate_perplexity
# ----------------------------------------------------------------------------------------------
def evaluate_perplexity(model, data, config=None, batch_size=8, tokenizer=None, device=None) -> dict:
    """Exact token-weighted perplexity of ``model`` on ``data`` (padding excluded).

    Returns ``loss`` (mean cross-entropy per real target token, nats), ``perplexity`` (exp of it),
    ``accuracy`` (next-token argmax accuracy over real targets), ``tokens`` (real targets counted)
    and ``padded_tokens``.
    """
    config = config if config is not None else getattr(model, "config", None)
    pad_token_id = _detect_pad_token_id(config, tokenizer)
    source = batch_source(data, pad_token_id, what="evaluation data")
    vocab_size = vocab_size_of(model, config)
    if vocab_size is not None:
        check_vocabulary(vocab_size, pad_token_id, {"evaluation data": source})
    if device is not None:
        model.to(device)
    device = next(model.parameters()).device
    result = _run_validation_epoch(model, source, pad_token_id, batch_size=batch_size, device=device)
    return {"loss": result["loss"], "perplexity": result["perplexity"], "accuracy": result["accuracy"],
            "tokens": result["real_tokens"], "padded_tokens": result["padded_tokens"], "pad_token_id": pad_token_id}

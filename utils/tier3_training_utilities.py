"""Public entry points: ``test_fine_tuning``, ``test_hyperparameter_search`` and ``evaluate_perplexity``.

This file is the orchestration: settings -> data -> per epoch: train, validate, record,
checkpoint -> results. The pieces live in ``utils/training/``. The rule that holds everywhere:
padding never counts. Every loss, accuracy and perplexity is a sum over real target tokens
divided by their number (``utils/training/loss.py``).
"""
from __future__ import annotations

import contextlib
import importlib
import math
import os
import random
import time
import types
import warnings
from pathlib import Path

import numpy as np
import torch

from .training import checkpoint as ckpt
from .training.checks import check_lengths, check_vocabulary_and_logits, max_positions
from .training.data import batch_source, synthetic_sequences, to_device, train_and_val_sources
from .training.distributed import DistContext, all_reduce_sum, setup_distributed, wrap_model
from .training.legacy import CLIP_NORM_DEFAULT, build_settings, deterministic_algorithms, legacy_result_keys
from .training.loss import TokenSums, count_real_targets, masked_lm_loss
from .training.metrics import MetricsTracker, safe_exp
from .training.model_io import ModelCaller, eval_mode, mask_free_is_exact, unwrap, vocab_size_of
from .training.outcome import COMPLETED, Outcome, OutcomeKind, StopTraining
from .training.optim import build_optimizer, build_scheduler
from .training.ownership import OutputDirLock, claim_run_id
from .training.pad_id import detect_pad_token_id, pad_is_eos
from .training.run_state import Run
from .training.search import N_TRIALS_DEFAULT, run_search
from .training.settings import FineTuneSettings

__all__ = ["test_fine_tuning", "test_hyperparameter_search", "evaluate_perplexity"]


def __getattr__(name):
    # ``wandb`` as a module attribute, imported on first use: callers patch
    # ``utils.tier3_training_utilities.wandb`` with a mock, and the import stays lazy otherwise.
    if name == "wandb":
        return importlib.import_module("wandb")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _wandb_module():
    """A caller's mock of ``utils.tier3_training_utilities.wandb`` if there is one, else ``import wandb``
    (which honours a mock placed in ``sys.modules``)."""
    patched = globals().get("wandb")
    if patched is not None and not isinstance(patched, types.ModuleType):
        return patched
    return importlib.import_module("wandb")


def _detect_pad_token_id(config, tokenizer=None) -> int:
    """Pad id from ``config.pad_token_id``, then the tokenizer's pad, then its eos (warned), else 0 (warned)."""
    return detect_pad_token_id(config, tokenizer)[0]


# ----------------------------------------------------------------------------------------------
# The shared train step and validation pass
# ----------------------------------------------------------------------------------------------
def _compute_loss_and_backward(model, batch, pad_token_id, *, caller=None, loss_divisor=None,
                               autocast=contextlib.nullcontext, scaler=None) -> TokenSums:
    """Forward one micro-batch, backward ``loss_sum / loss_divisor``; returns the batch's detached sums.

    ``loss_divisor`` is the real-target count of the whole optimizer step (all micro-batches, all
    processes), so accumulated gradients equal those of the one large batch. Default: this batch's.
    """
    caller = caller or ModelCaller(model)
    with autocast():
        logits = caller(model, batch)
    sums = masked_lm_loss(logits, batch["input_ids"], batch.get("labels"), batch.get("attention_mask"), pad_token_id)
    divisor = sums.real_targets.clamp(min=1) if loss_divisor is None else loss_divisor
    loss = sums.loss_sum / divisor
    (scaler.scale(loss) if scaler is not None else loss).backward()
    sums.loss_sum = sums.loss_sum.detach()
    return sums


def _run_validation_epoch(model, data, pad_token_id, *, batch_size=8, device=None, caller=None,
                          ctx: DistContext | None = None, autocast=contextlib.nullcontext) -> dict:
    """Token-weighted loss, perplexity and accuracy over all real targets of ``data``."""
    model = unwrap(model)  # DDP's forward would sync buffers; shards here may differ in batch count
    ctx = ctx or DistContext()
    source = batch_source(data, pad_token_id, what="validation data")
    device = device or next(model.parameters()).device
    caller = caller or ModelCaller(model)
    totals = TokenSums()
    with eval_mode(model):
        for planned in source.eval_plan(batch_size, world_size=ctx.world_size, rank=ctx.rank):
            batch = to_device(source.collate(planned), device)
            with autocast():
                logits = caller(model, batch)
            totals += masked_lm_loss(logits, batch["input_ids"], batch.get("labels"), batch.get("attention_mask"), pad_token_id)
    totals = TokenSums.from_tensor(all_reduce_sum(totals.as_tensor(device), ctx))
    return {"loss": totals.loss, "perplexity": safe_exp(totals.loss), "accuracy": totals.accuracy,
            "real_tokens": int(totals.real_targets), "padded_tokens": int(totals.padded_positions)}


# ----------------------------------------------------------------------------------------------
# test_fine_tuning
# ----------------------------------------------------------------------------------------------
_D = FineTuneSettings.default


def test_fine_tuning(model, config, train_data=None, val_data=None, n_epochs=_D("n_epochs"),
                     learning_rate=_D("learning_rate"), weight_decay=_D("weight_decay"), batch_size=_D("batch_size"),
                     use_wandb=_D("use_wandb"), use_amp=_D("use_amp"),
                     gradient_accumulation_steps=_D("gradient_accumulation_steps"), gradient_clip_norm=CLIP_NORM_DEFAULT,
                     random_seed=_D("random_seed"), deterministic=_D("deterministic"),
                     use_lr_schedule=_D("use_lr_schedule"), log_grad_dist_every=_D("log_grad_dist_every"),
                     log_grad_histogram=_D("log_grad_histogram"), *, tokenizer=None, device=None, **options) -> dict:
    """Fine-tune ``model`` (in place) as a causal LM; padding never counts. Returns a results dict.

    The positional order is the previous module's. ``gradient_clip_norm`` is ``max_grad_norm``;
    ``use_amp=True`` is ``mixed_precision="fp16"``. Further keywords: see ``FineTuneSettings``.
    """
    settings = build_settings(
        dict(n_epochs=n_epochs, learning_rate=learning_rate, weight_decay=weight_decay, batch_size=batch_size,
             use_wandb=use_wandb, use_amp=use_amp, gradient_accumulation_steps=gradient_accumulation_steps,
             random_seed=random_seed, deterministic=deterministic, use_lr_schedule=use_lr_schedule,
             log_grad_dist_every=log_grad_dist_every, log_grad_histogram=log_grad_histogram),
        options, gradient_clip_norm=gradient_clip_norm)
    return _fine_tune(model, config, train_data, val_data, settings, tokenizer=tokenizer, device=device)


test_fine_tuning.__test__ = False  # library API, not a pytest test


def _fine_tune(model, config, train_data, val_data, settings: FineTuneSettings, *, tokenizer=None, device=None,
               on_evaluation=None) -> dict:
    """The engine behind ``test_fine_tuning`` and each search trial (which passes ``on_evaluation``)."""
    lock = OutputDirLock(Path(settings.output_dir)) if int(os.environ.get("RANK", 0)) == 0 else contextlib.nullcontext()
    with deterministic_algorithms(settings.deterministic), lock:
        run, resumed, pad_source = _start_run(model, config, train_data, val_data, settings, tokenizer, device, on_evaluation)
        outcome = _train(run)
        return _finish(run, outcome, resumed, pad_source)


def _start_run(model, config, train_data, val_data, settings, tokenizer, device, on_evaluation):
    ctx, device = setup_distributed(torch.device(device) if device is not None else None)
    if settings.requested_precision and device.type != "cuda":
        warnings.warn(f"Mixed precision ({settings.requested_precision}) applies on CUDA only; training in float32 on "
                      f"{device.type}.", UserWarning, stacklevel=4)
    _seed_everything(settings.random_seed)
    config = config if config is not None else getattr(model, "config", None)
    pad_token_id, pad_source = detect_pad_token_id(config, tokenizer)
    model.to(device)
    model.zero_grad(set_to_none=True)  # gradients a caller left on the model must not join the first step

    train, val, vocab_size = _prepare_data(model, config, train_data, val_data, pad_token_id,
                                           pad_is_eos(pad_token_id, config, tokenizer), settings, ctx, device)
    caller = ModelCaller(model)
    # Only on CUDA, where it unlocks the flash kernel; on CPU it was not measured to help, and numbers stay as they were.
    caller.mask_free = device.type == "cuda" and mask_free_is_exact(model, caller, to_device(train.padded_batch(), device))
    # Token-budget steps vary in number from epoch to epoch: count each epoch's plan (a pure function).
    steps_per_epoch = [_steps_in(_plan_epoch(train, settings, ctx, epoch), settings) for epoch in range(settings.n_epochs)]
    optimizer = build_optimizer(model, settings.learning_rate, settings.weight_decay)
    total_steps = sum(steps_per_epoch)
    run_id = claim_run_id(Path(settings.output_dir), resuming=bool(settings.resume_from_checkpoint),
                          writes_checkpoints=settings.writes_checkpoints,
                          has_checkpoints=bool(ckpt.step_folders(Path(settings.output_dir) / "checkpoints"))) if ctx.is_main else ""
    run = Run(
        model=model, train_model=wrap_model(torch.compile(model) if settings.compile else model, ctx, device),
        caller=caller, settings=settings, ctx=ctx, device=device, pad_token_id=pad_token_id, train=train, val=val, optimizer=optimizer,
        scheduler=build_scheduler(optimizer, settings.schedule, total_steps, settings.warmup_steps_for(total_steps)),
        scaler=torch.amp.GradScaler("cuda", enabled=settings.autocast_dtype(device) == "fp16"),
        tracker=MetricsTracker(settings.output_dir, is_main=ctx.is_main, use_wandb=settings.use_wandb,
                               progress=bool(settings.progress), wandb_module_getter=_wandb_module),
        data_fingerprint=ckpt.data_fingerprint(train), val_fingerprint=ckpt.data_fingerprint(val), run_id=run_id,
        on_evaluation=on_evaluation,
    )
    resumed = ckpt.resume_run(run)
    run_config = dict(settings.as_dict(), pad_token_id=pad_token_id, pad_token_id_source=pad_source,
                      precision_used=settings.autocast_dtype(device) or "fp32", attention_mask_free=caller.mask_free,
                      n_parameters=sum(p.numel() for p in model.parameters()), vocab_size=vocab_size,
                      world_size=ctx.world_size, steps_per_epoch=steps_per_epoch[0], model_class=type(model).__name__)
    run.tracker.start(run_config, total_steps=total_steps, wandb_project=settings.wandb_project,
                      wandb_run_name=settings.wandb_run_name, wandb_mode=settings.wandb_mode, wandb_group=settings.wandb_group)
    effective_batch_size = settings.batch_size * settings.gradient_accumulation_steps * ctx.world_size
    run.tracker.message(f"Effective batch size: {effective_batch_size}")
    run.tracker.message(f"Gradient accumulation steps: {settings.gradient_accumulation_steps}")
    run.tracker.log_config_lines({"config/effective_batch_size": effective_batch_size,
                                  "config/gradient_accumulation_steps": settings.gradient_accumulation_steps})
    if resumed is not None:
        ckpt.set_rng_state(resumed["trainer_state.pt"]["rng"][ctx.rank])  # last: nothing may draw random numbers after
        run.tracker.message(f"Resumed from {resumed['folder']} (optimizer step {run.state.global_step}).")
    return run, resumed, pad_source


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _prepare_data(model, config, train_data, val_data, pad_token_id, eos_is_pad, settings, ctx, device):
    vocab_size = vocab_size_of(model, config)  # for synthetic data only; checked below
    padding_multiple = settings.padding_multiple(device)
    if train_data is None:
        if vocab_size is None:
            raise ValueError("train_data=None needs the vocabulary size for synthetic data: set config.vocab_size.")
        warnings.warn("train_data=None: training on a SYNTHETIC set of 256 variable-length sequences (arithmetic "
                      "progressions of token ids). Pass your tokenized text as train_data for real fine-tuning.",
                      UserWarning, stacklevel=4)
        train_data = synthetic_sequences(vocab_size, pad_token_id, seed=settings.random_seed)
    train, val = train_and_val_sources(train_data, val_data, pad_token_id, padding_multiple, eos_is_pad,
                                       settings.val_fraction, settings.random_seed)
    if ctx.enabled and not (train.plannable and val.plannable):
        raise ValueError("Under torchrun, pass train_data and val_data as lists of examples (not DataLoaders): the "
                         "package shards them across processes itself so that no example counts twice.")
    sources = {"training data": train, "validation data": val}
    check_lengths(max_positions(model, config), sources)
    vocab_size = check_vocabulary_and_logits(model, config, sources, pad_token_id, device)
    return train, val, vocab_size


def _train(run: Run) -> dict:
    """The epoch loop; returns why it ended. Ctrl-C and a non-finite loss end it with results kept."""
    settings, state = run.settings, run.state
    started = time.perf_counter() - state.run_seconds
    try:
        for epoch in range(state.epoch, settings.n_epochs):
            epoch_started = time.perf_counter()
            _train_epoch(run, epoch)
            val = _validate(run)
            _record_epoch(run, epoch, val, time.perf_counter() - epoch_started)
            improved = _track_best(run, epoch, val)
            state.start_epoch(epoch + 1)
            state.run_seconds = time.perf_counter() - started
            if settings.writes_checkpoints:
                ckpt.save_run(run, best=improved)
            final = epoch + 1 == settings.n_epochs
            stop = _evaluation_stop(run, val, final=final) or _early_stopping(run, epoch)
            if stop:
                return stop
        return COMPLETED
    except KeyboardInterrupt:
        run.tracker.message(f"Interrupted at optimizer step {state.global_step}; returning the metrics so far.")
        return Outcome(OutcomeKind.INTERRUPTED, "interrupted (KeyboardInterrupt)")
    except StopTraining as stop:
        run.tracker.message(stop.outcome.reason)
        return stop.outcome
    except Exception as error:
        run.tracker.finish({})  # an unexpected failure still writes the CSVs and closes the W&B run
        if isinstance(error, torch.OutOfMemoryError):
            raise torch.OutOfMemoryError(
                f"Out of GPU memory at optimizer step {state.global_step} with batch_size={settings.batch_size}. Use "
                f"a smaller batch_size and raise gradient_accumulation_steps to keep the effective batch "
                f"(e.g. batch_size={max(1, settings.batch_size // 2)}, gradient_accumulation_steps="
                f"{settings.gradient_accumulation_steps * 2}), or precision='bf16'.") from error
        raise
    finally:
        state.run_seconds = time.perf_counter() - started


def _plan_epoch(source, settings: FineTuneSettings, ctx: DistContext, epoch: int):
    """This process's micro-batches of one epoch (a user's DataLoader: the loader itself)."""
    return source.plan(settings.batch_size, shuffle=settings.shuffle, group_by_length=settings.group_by_length,
                       seed=settings.random_seed, epoch=epoch, accumulation=settings.gradient_accumulation_steps,
                       world_size=ctx.world_size, rank=ctx.rank, max_tokens_per_batch=settings.max_tokens_per_batch)


def _steps_in(plan, settings: FineTuneSettings) -> int:
    return math.ceil(len(plan) / settings.gradient_accumulation_steps)


def _train_epoch(run: Run, epoch: int) -> None:
    settings, state = run.settings, run.state
    plan = _plan_epoch(run.train, settings, run.ctx, epoch)
    steps_in_epoch = _steps_in(plan, settings)
    run.train_model.train()
    pending = []
    started = time.perf_counter()
    try:
        for step_in_epoch, planned_batches in _optimizer_steps(plan, settings.gradient_accumulation_steps, state.step_in_epoch):
            batches = [to_device(run.train.collate(planned), run.device) for planned in planned_batches]
            pending.append(_optimizer_step(run, batches))
            state.global_step += 1
            state.step_in_epoch = step_in_epoch + 1
            last_of_epoch = state.step_in_epoch == steps_in_epoch
            checkpoint_due = bool(settings.checkpoint_every) and state.global_step % settings.checkpoint_every == 0
            eval_due = bool(settings.eval_every) and state.global_step % settings.eval_every == 0 and not last_of_epoch
            if checkpoint_due or eval_due or len(pending) >= settings.log_every or last_of_epoch:
                flushing, pending = pending, []
                _record_steps(run, flushing, epoch)
            if checkpoint_due:
                ckpt.save_run(run)
            if eval_due:
                _evaluate_mid_epoch(run, epoch)
    except BaseException:
        _record_steps(run, pending, epoch)  # Ctrl-C, a stop or any error: every completed step stays in the history
        raise
    finally:
        state.train_seconds += time.perf_counter() - started  # training only, no validation


def _optimizer_steps(plan, accumulation: int, skip: int):
    """``(step index, micro-batches)`` of one epoch, read lazily; a resume skips the first ``skip`` steps."""
    step, group = 0, []
    for planned in plan:
        group.append(planned)
        if len(group) == accumulation:
            if step >= skip:
                yield step, group
            step, group = step + 1, []
    if group and step >= skip:
        yield step, group


def _optimizer_step(run: Run, batches: list[dict]) -> dict:
    """One optimizer step over its micro-batches; the loss is normalised by the step's global real targets."""
    # Counted before any backward, over all micro-batches and processes: token-weighted, not mean of means.
    real_in_step = all_reduce_sum(torch.stack([count_real_targets(b, run.pad_token_id) for b in batches]).sum().float(), run.ctx)
    divisor = real_in_step.clamp(min=1) / run.ctx.world_size  # DDP averages gradients over processes; undo it
    sums = TokenSums()
    for i, batch in enumerate(batches):
        last = i == len(batches) - 1
        sync = run.train_model.no_sync() if run.ctx.enabled and not last else contextlib.nullcontext()
        with sync:
            sums += _compute_loss_and_backward(run.train_model, batch, run.pad_token_id, caller=run.caller,
                                               loss_divisor=divisor, autocast=run.autocast, scaler=run.scaler)
    run.state.train_sequences += sum(b["input_ids"].shape[0] for b in batches) * run.ctx.world_size
    for batch in batches:  # each new shape costs a warm-up (a recompile under compile=True) on a GPU
        shape = list(batch["input_ids"].shape)
        if shape not in run.state.batch_shapes:
            run.state.batch_shapes.append(shape)
    run.scaler.unscale_(run.optimizer)
    settings = run.settings
    if run.tracker.logs_gradients and (run.state.global_step + 1) % settings.log_grad_dist_every == 0:
        run.tracker.log_gradients(run.model, run.state.global_step + 1, histograms=settings.log_grad_histogram)
    max_norm = settings.max_grad_norm if settings.max_grad_norm is not None else math.inf
    grad_norm = torch.nn.utils.clip_grad_norm_(run.model.parameters(), max_norm)  # returns the norm before clipping
    learning_rate = run.optimizer.param_groups[0]["lr"]
    _stop_if_not_finite(run, sums, grad_norm, learning_rate)
    run.scaler.step(run.optimizer)
    run.scaler.update()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    return {"sums": sums, "grad_norm": grad_norm.detach().double(), "learning_rate": learning_rate}


def _stop_if_not_finite(run: Run, sums: TokenSums, grad_norm: torch.Tensor, learning_rate: float) -> None:
    """Before the update: a non-finite loss or gradient never reaches the weights (one host read per step;
    measured cost in CLAUDE.md). Under fp16 the GradScaler skips steps with inf gradients itself."""
    not_finite = ~torch.isfinite(sums.loss_sum) | (~torch.isfinite(grad_norm) & (not run.scaler.is_enabled()))
    # Every process must take the same decision, or the ones that go on wait forever for the one that stopped.
    if not bool(all_reduce_sum(not_finite.float(), run.ctx)):
        return
    run.optimizer.zero_grad(set_to_none=True)
    settings = run.settings
    raise StopTraining(Outcome(OutcomeKind.NON_FINITE,
        f"Training stopped before optimizer step {run.state.global_step + 1}: its loss ({float(sums.loss_sum):g} summed) or "
        f"gradient norm ({float(grad_norm):g}) is not finite, so the update was not applied; the model holds the "
        f"weights of step {run.state.global_step}. Likely causes: a learning_rate too high (now {learning_rate:g}), "
        f"weight_decay={settings.weight_decay:g}, clipping off (max_grad_norm={settings.max_grad_norm}), or fp16 overflow "
        "(use precision='bf16')."))


def _record_steps(run: Run, pending: list[dict], epoch: int) -> None:
    """Read pending steps from the device in one sync (one all-reduce under torchrun) and record them."""
    if not pending:
        return
    sums = all_reduce_sum(torch.stack([p["sums"].as_tensor(run.device) for p in pending]), run.ctx).cpu()
    norms = torch.stack([p["grad_norm"] for p in pending]).cpu().tolist()
    first_step = run.state.global_step - len(pending) + 1
    rows = []
    for k, (step_sums, grad_norm) in enumerate(zip(map(TokenSums.from_tensor, sums), norms)):
        run.state.epoch_sums += step_sums
        rows.append({"step": first_step + k, "epoch": epoch + 1, "train/step_loss_excl_padding": step_sums.loss,
                     "train/learning_rate": pending[k]["learning_rate"], "train/grad_norm": grad_norm,
                     "train/step_real_tokens": int(step_sums.real_targets)})
    run.tracker.log_steps(rows)


def _validate(run: Run) -> dict:
    return _run_validation_epoch(run.model, run.val, run.pad_token_id, batch_size=run.settings.batch_size,
                                 device=run.device, caller=run.caller, ctx=run.ctx, autocast=run.autocast)


def _evaluate_mid_epoch(run: Run, epoch: int) -> None:
    """``eval_every``: validate inside the epoch (eval mode draws no random numbers: training is unchanged)."""
    val = _validate(run)
    run.tracker.log_eval({"step": run.state.global_step, "epoch": epoch + 1, "val/loss_excl_padding": val["loss"],
                          "val/perplexity": val["perplexity"], "val/accuracy_excl_padding": val["accuracy"]})
    stop = _evaluation_stop(run, val, final=False)
    if stop:
        raise StopTraining(stop)
    run.train_model.train()


def _evaluation_stop(run: Run, val: dict, final: bool) -> Outcome | None:
    """A search trial's pruner is asked after each validation; a reason it returns prunes the trial."""
    reason = run.on_evaluation(run.state.global_step, val["loss"], final) if run.on_evaluation else None
    return Outcome(OutcomeKind.PRUNED, reason) if reason else None


def _record_epoch(run: Run, epoch: int, val: dict, seconds: float) -> None:
    sums, state = run.state.epoch_sums, run.state
    steps = [r for r in run.tracker.step_rows if r["epoch"] == epoch + 1]
    row = run.tracker.log_epoch({
        "epoch": epoch + 1, "global_step": state.global_step,
        "train/loss_excl_padding": sums.loss, "val/loss_excl_padding": val["loss"], "val/perplexity": val["perplexity"],
        "train/accuracy_excl_padding": sums.accuracy, "val/accuracy_excl_padding": val["accuracy"],
        "learning_rate": steps[-1]["train/learning_rate"] if steps else None,  # the rate the last step used
        "train/real_tokens": int(sums.real_targets), "train/padded_tokens": int(sums.padded_positions),
        "train/pad_fraction": sums.pad_fraction, "val/real_tokens": val["real_tokens"], "val/padded_tokens": val["padded_tokens"],
        "train/real_tokens_per_sec": float(sums.real_targets) / max(state.train_seconds, 1e-9),  # training phase only
        "epoch_time_s": seconds,  # training and validation of this epoch (after a resume: only the part run now)
        "train/distinct_batch_shapes": len(state.batch_shapes),  # so far in the run
    })
    run.tracker.message(f"epoch {epoch + 1}/{run.settings.n_epochs}: train loss (excl. padding) {sums.loss:.4f} | "
                        f"val loss (excl. padding) {val['loss']:.4f} | val perplexity {val['perplexity']:.2f} | "
                        f"padded positions {row['train/pad_fraction']:.1%}")


def _track_best(run: Run, epoch: int, val: dict) -> bool:
    """Remember the best validation epoch (and its weights when they are to be restored)."""
    state = run.state
    if val["loss"] >= state.best_val_loss:
        state.epochs_without_improvement += 1
        return False
    state.best_val_loss, state.best_epoch, state.epochs_without_improvement = val["loss"], epoch + 1, 0
    if run.settings.load_best_model_at_end:
        run.best_weights = {k: v.detach().to("cpu", copy=True) for k, v in run.model.state_dict().items()}
    return True


def _early_stopping(run: Run, epoch: int) -> Outcome | None:
    state, patience = run.state, run.settings.early_stopping_patience
    if patience and state.epochs_without_improvement >= patience and epoch + 1 < run.settings.n_epochs:
        return Outcome(OutcomeKind.STOPPED_EARLY,
                       f"early stopping: validation loss (excl. padding) did not improve for {patience} epoch(s); "
                       f"best {state.best_val_loss:.4f} at epoch {state.best_epoch}")
    return None


def _finish(run: Run, outcome: Outcome, resumed: dict | None, pad_source: str) -> dict:
    tracker, state = run.tracker, run.state
    partial_epoch = state.step_in_epoch and state.epoch_sums.real_targets  # interrupted or stopped mid-epoch
    if run.settings.load_best_model_at_end and run.best_weights is not None:
        run.model.load_state_dict(run.best_weights)
        tracker.message(f"Loaded the best model (epoch {state.best_epoch}, val loss excl. padding {state.best_val_loss:.4f}).")
    frame = tracker.epochs_frame()
    last = frame.iloc[-1] if len(frame) else None
    last_value = lambda column: None if last is None else float(last[column])  # noqa: E731
    results = {
        "final_train_loss": state.epoch_sums.loss if partial_epoch else last_value("train/loss_excl_padding"),
        "final_val_loss": last_value("val/loss_excl_padding"), "val_perplexity": last_value("val/perplexity"),
        "final_train_accuracy": last_value("train/accuracy_excl_padding"),
        "final_val_accuracy": last_value("val/accuracy_excl_padding"),
        "pad_token_id": run.pad_token_id, "pad_token_id_source": pad_source,
        "precision_used": run.settings.autocast_dtype(run.device) or "fp32", "attention_mask_free": run.caller.mask_free,
        "loss_history": [r["train/step_loss_excl_padding"] for r in tracker.step_rows],
        "metrics_summary": frame, "steps_summary": tracker.steps_frame(),
        "global_step": state.global_step, "epochs_completed": len(frame),
        "best_val_loss": state.best_val_loss if state.best_epoch else None, "best_epoch": state.best_epoch,
        "best_checkpoint": run.best_checkpoint, "last_checkpoint": run.last_checkpoint,
        "resumed_from_step": None if resumed is None else resumed["meta"]["step"],
        "resumed_from_checkpoint": None if resumed is None else str(resumed["folder"]),
        "output_dir": run.settings.output_dir, "metrics_csv": str(tracker.epochs_csv), "steps_csv": str(tracker.steps_csv),
        "wandb_run_id": tracker.wandb_run_id, "settings": run.settings.as_dict(), **outcome.as_result_keys(),
        **legacy_result_keys(tracker.steps_frame(), training_seconds=state.run_seconds, sequences=state.train_sequences,
                             amp_enabled=run.amp_enabled, loss_scale=run.scaler.get_scale() if run.scaler.is_enabled() else None),
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
    source = batch_source(data, pad_token_id, what="evaluation data", pad_is_eos=pad_is_eos(pad_token_id, config, tokenizer))
    if device is not None:
        model.to(device)
    device = next(model.parameters()).device
    check_vocabulary_and_logits(model, config, {"evaluation data": source}, pad_token_id, device)
    result = _run_validation_epoch(model, source, pad_token_id, batch_size=batch_size, device=device)
    return {"loss": result["loss"], "perplexity": result["perplexity"], "accuracy": result["accuracy"],
            "tokens": result["real_tokens"], "padded_tokens": result["padded_tokens"], "pad_token_id": pad_token_id}


def test_hyperparameter_search(model_factory=None, config=None, train_data=None, val_data=None, n_trials=N_TRIALS_DEFAULT,
                               *legacy_positionals, search_space=None, n_epochs=1, timeout=None, storage=None,
                               study_name=None, pruning=True, eval_every=None, random_seed=42, use_wandb=False,
                               tokenizer=None, model=None, **fine_tuning_kwargs) -> dict:
    """Optuna search over ``test_fine_tuning`` keywords; each trial's objective is its final validation loss
    excluding padding. ``storage`` ("sqlite:///study.db", any SQLAlchemy URL, or a ``*.log`` journal file) with
    ``study_name`` makes the study survive a disconnect and lets several processes share it. The previous
    positional form ``(model_factory, config, train_data, n_trials, search_space, random_seed, deterministic)``
    still works. Details: ``utils/training/search.py``.
    """
    return run_search(_fine_tune, model_factory, config, train_data, val_data, n_trials, *legacy_positionals,
                      search_space=search_space, n_epochs=n_epochs, timeout=timeout, storage=storage, study_name=study_name,
                      pruning=pruning, eval_every=eval_every, random_seed=random_seed, use_wandb=use_wandb,
                      tokenizer=tokenizer, model=model, **fine_tuning_kwargs)


test_hyperparameter_search.__test__ = False  # library API, not a pytest test

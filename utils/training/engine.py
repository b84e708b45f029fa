"""From a user's arguments to a finished run: prepare and check the data, build the ``Trainer``, fit, shape results.

``fine_tune`` is the engine behind ``test_fine_tuning`` and every search trial.
"""
from __future__ import annotations

import contextlib
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from .model import (check_model_against_data, check_parameter_values, detect_pad_token_id, pad_is_eos, probe_model,
                    tokenizer_size)
from .distributed import ProcessWatch, group_timeout_s, require_launch, restore_weights, setup_distributed
from .metrics import (LoggingSettings, MetricRows, MetricsFiles, MetricsSummary, Progress, WandbSink, import_wandb,
                      plot_rows, run_title, set_aside_earlier_outputs)
from .loss import byte_lengths_tensor, vocab_size_of
from .outcome import Outcome
from .checkpoints import OutputDirLock, checkpoints_folder, claim_run_id, resume, step_folders
from .previous_interface import previous_result_keys
from .reproducibility import deterministic_algorithms, random_state_kept, seed_everything
from .data import source_options, synthetic_sequences, train_and_val_sources
from .settings import FineTuneSettings
from .trainer import RunData, RunRecord, Trainer
from .warn import caller_stacklevel


@dataclass
class RunHooks:
    """What a caller plugs into a run: the search's pruner, and where ``wandb`` comes from (a caller's mock)."""

    on_evaluation: object = None  # (step, val loss, final) -> a reason to prune, or None
    wandb_module: object = import_wandb  # () -> the wandb module
    previous_keywords: dict | None = None  # the previous module's keywords as given, shown in results["settings"]
    token_bytes: object = None  # the caller's bytes per token id (bits per byte without a tokenizer that says)


def fine_tune(model, config, train_data, val_data, settings: FineTuneSettings, *, tokenizer=None, device=None,
              hooks: RunHooks | None = None) -> dict:
    hooks = hooks or RunHooks()
    output_dir = Path(settings.checkpoints.output_dir)
    lock = OutputDirLock(output_dir) if int(os.environ.get("RANK", 0)) == 0 else contextlib.nullcontext()
    with deterministic_algorithms(settings.numerics.deterministic), lock:
        trainer, resumed = build_trainer(model, config, (train_data, val_data), settings, tokenizer, device, hooks)
        # Under torchrun a process that stops is named (rank and step) within process_timeout_minutes.
        with ProcessWatch(trainer.ctx, settings.distributed.process_timeout_minutes,
                          progress=lambda: trainer.state.global_step,
                          waiting_for=trainer.checkpoints.waiting_for) as watch:
            try:
                return train_and_finish(trainer, resumed, hooks)
            except Exception as error:
                newest = trainer.checkpoints.last_checkpoint  # rank 0's: the others do not write
                stalled = watch.error_for(error, f"The checkpoints written before are intact under "
                                                 f"{trainer.checkpoints.folder}"
                                                 + (f" (newest: {Path(newest).name})." if newest else "."))
                if stalled is not None:
                    raise stalled from error
                raise


def train_and_finish(trainer: Trainer, resumed: dict | None, hooks: RunHooks) -> dict:
    """Train, then end the run: the metrics files first, then the wait for the last background write (a write that
    stalls, e.g. on a hung mount, must not hold back the metrics, and Ctrl-C during that wait returns the results)."""
    moved = _set_aside_earlier_outputs(trainer) if resumed is None else None
    outcome = trainer.fit()
    trainer.checkpoints.before_update()  # the snapshot's copy of the weights is complete before the best model's
    results = shape_results(trainer, outcome, resumed, hooks.previous_keywords or {})
    trainer.checkpoints.finish(outcome)  # the last write is complete, its failure reported, or Ctrl-C said
    results.update(trainer.checkpoints.result_keys())
    # Where this fresh run moved an earlier run's metrics and plots found in output_dir (None: there were none)
    results["earlier_outputs_moved_to"] = None if moved is None else str(moved)
    return results


def _set_aside_earlier_outputs(trainer: Trainer) -> Path | None:
    """A fresh run, before it writes anything: an earlier run's metrics and plots in output_dir are moved aside."""
    if not trainer.ctx.is_main:
        return None
    output_dir = Path(trainer.settings.checkpoints.output_dir)
    moved = set_aside_earlier_outputs(output_dir)
    if moved is not None:
        trainer.tracker.message(f"{output_dir} held an earlier run's metrics and plots: moved to {moved} (nothing is "
                                "overwritten; this run's files are at the top of output_dir).")
    return moved


def build_trainer(model, config, data, settings, tokenizer, device, hooks: RunHooks):
    """A ready trainer (resumed when asked) and the checkpoint it resumed from (None when fresh)."""
    if device is not None and torch.device(device).type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={str(device)!r} but CUDA is not available here. Pass device='cpu', or select a GPU "
                         "runtime (Colab: Runtime > Change runtime type).")
    distributed, numerics = settings.distributed, settings.numerics
    if distributed.fsdp:
        require_launch()  # before any work: a plain process is refused with the launch command
    ctx, device = setup_distributed(torch.device(device) if device is not None else None,
                                    join_single=distributed.fsdp,
                                    timeout_s=group_timeout_s(60 * distributed.process_timeout_minutes))
    if numerics.requested_precision and numerics.autocast_dtype(device) is None:
        if numerics.precision_from_previous_keyword:
            warnings.warn(f"use_amp/mixed_precision ({numerics.requested_precision}) apply on CUDA only, as in the "
                          f"previous module; training in float32 on {device.type}. For CPU autocast pass "
                          f"precision={numerics.requested_precision!r}.", UserWarning, stacklevel=caller_stacklevel())
        else:
            warnings.warn(f"precision={numerics.requested_precision!r} applies on CUDA and CPU only; training in "
                          f"float32 on {device.type}.", UserWarning, stacklevel=caller_stacklevel())
    seed_everything(settings.run.random_seed)
    config = config if config is not None else getattr(model, "config", None)
    _check_parameters(model, settings, device)
    model.to(device)
    model.zero_grad(set_to_none=True)  # gradients a caller left on the model must not join the first step
    run_data = prepare_data(model, config, data, settings, tokenizer, device)
    run_data.token_bytes = byte_lengths_tensor(tokenizer, hooks.token_bytes, run_data.vocab_size, device)
    if ctx.enabled and not (run_data.train.shards_itself and run_data.val.shards_itself):
        raise ValueError("Under torchrun, pass train_data and val_data as lists of examples (not DataLoaders): the "
                         "package shards them across processes itself so that no example counts twice.")
    output_dir = Path(settings.checkpoints.output_dir)
    run_id = claim_run_id(output_dir, resuming=bool(settings.checkpoints.resume_from_checkpoint),
                          writes_checkpoints=settings.checkpoints.writes_checkpoints,
                          has_checkpoints=bool(step_folders(checkpoints_folder(output_dir)))) if ctx.is_main else ""
    tracker, wandb = build_metrics(settings.logging, output_dir, ctx, hooks)
    # Sharded, each process holds a slice of every gradient: rank 0 alone cannot take a layer's norm, and asking
    # the others would put a collective into rank 0's step only (the processes then deadlock or abort).
    gradient_stats = wandb.gradients if wandb and not distributed.fsdp else None
    if wandb and distributed.fsdp:
        tracker.message("fsdp=True: per-layer gradient norms and histograms are not logged to W&B (each process "
                        "holds a shard of each gradient); train/grad_norm, the global norm, is.")
    trainer = Trainer(model, settings, run_data, ctx=ctx, device=device,
                      record=RunRecord(tracker, run_id, gradient_stats), on_evaluation=hooks.on_evaluation)
    resumed = resume(trainer)  # the whole state, the random state included
    with random_state_kept():  # the sinks' start (W&B) must not move the random state the run continues with
        _start_tracker(trainer, model)
    if resumed is not None:
        tracker.message(f"Resumed from {resumed['folder']} (optimizer step {trainer.state.global_step}).")
    return trainer, resumed


def build_metrics(logging: LoggingSettings, output_dir: Path, ctx, hooks: RunHooks) -> tuple[MetricRows,
                                                                                               WandbSink | None]:
    """The run's metric rows; on rank 0 with their sinks: progress, the metrics files in ``output_dir``, W&B when
    asked."""
    if not ctx.is_main:
        return MetricRows(), None
    # W&B's local run folder goes under output_dir, not the working directory (unless WANDB_DIR says).
    wandb = WandbSink(project=logging.wandb_project, name=logging.wandb_run_name, mode=logging.wandb_mode,
                      group=logging.wandb_group, directory=os.environ.get("WANDB_DIR") or str(output_dir),
                      module_getter=hooks.wandb_module) if logging.use_wandb else None
    sinks = [Progress(show_bar=bool(logging.progress)), MetricsFiles(output_dir)] + ([wandb] if wandb else [])
    return MetricRows(sinks), wandb


def _check_parameters(model, settings, device) -> None:
    parameters = [p for p in model.parameters()]
    if not parameters:
        raise ValueError(f"The model ({type(model).__name__}) has no parameters, so there is nothing to fine-tune. "
                         "Pass the model itself (an nn.Module with layers), not a wrapper without them.")
    check_parameter_values(model)
    dtype = parameters[0].dtype
    learning_rate, numerics = settings.optimisation.learning_rate, settings.numerics
    if dtype.is_floating_point and learning_rate > torch.finfo(dtype).max:
        raise ValueError(f"learning_rate={learning_rate:g} is not finite in the parameters' dtype ({dtype}): "
                         "the first update would make every weight inf. Typical values are 1e-5 to 5e-4.")
    half = sorted({str(p.dtype)[6:] for p in parameters if p.dtype in (torch.bfloat16, torch.float16)})  # "torch.x"
    if half and numerics.autocast_dtype(device) == "fp16":
        raise ValueError(f"The model's weights are {' and '.join(half)}, but precision={numerics.precision!r} runs "
                         f"{device.type} float16 autocast with a GradScaler, which needs float32 weights (it cannot "
                         "unscale half-precision gradients, and the step fails). Mixed precision keeps the weights in "
                         "float32 and computes in half: call model.float() before training, or pass precision='bf16' "
                         "(a GPU with bfloat16 support) or precision='fp32'.")


def prepare_data(model, config, data, settings, tokenizer, device) -> RunData:
    """Sources for training and validation, checked against the model before any step."""
    train_data, val_data = data
    pad_token_id, pad_source = detect_pad_token_id(config, tokenizer)
    vocab_size = vocab_size_of(model, config)  # for synthetic data only; checked below
    if train_data is None:
        if vocab_size is None:
            raise ValueError("train_data=None needs the vocabulary size for synthetic data: set config.vocab_size.")
        warnings.warn("train_data=None: training on a SYNTHETIC set of 256 variable-length sequences (arithmetic "
                      "progressions of token ids). Pass your tokenized text as train_data for real fine-tuning.",
                      UserWarning, stacklevel=caller_stacklevel())
        train_data = synthetic_sequences(vocab_size, pad_token_id, seed=settings.run.random_seed)
    options = source_options(settings.data, settings.run.random_seed, device, pad_token_id,
                             pad_is_eos(pad_token_id, config, tokenizer))
    train, val = train_and_val_sources(train_data, val_data, options)
    sizes = check_model_against_data(model, config, [train, val], pad_token_id, device, tokenizer)
    vocab_size = sizes.vocab_size
    # The model's behaviour on lines of the user's own data, before any step: causal, per example, padding-blind.
    model_checks = probe_model(model, train, vocab_size=vocab_size,
                               pad_token_id=pad_token_id, limit=sizes.positions,
                               skip=settings.model.skip_model_checks, seed=settings.run.random_seed)
    _warn_if_vocabulary_oversized(vocab_size, tokenizer)
    if pad_source == "default 0" and train.pad_id_inside_real_tokens(pad_token_id):
        warnings.warn("The pad id fell back to 0, but token 0 occurs inside the training sequences, so it is a real "
                      "token of your vocabulary: lines ending in it lose that token as a target. Set "
                      "config.pad_token_id (or tokenizer.pad_token_id) to an id the tokenizer never produces, e.g. a "
                      "new '<pad>' token.", UserWarning, stacklevel=caller_stacklevel())
    return RunData(train, val, pad_token_id, pad_source, vocab_size, model_checks=model_checks,
                   val_held_out=val_data is None)


_VOCABULARY_ROUNDING = 128  # HF configs pad the embedding to a multiple of 64 or 128 for faster matmuls
_warned_vocabularies: set = set()


def _warn_if_vocabulary_oversized(vocab_size: int, tokenizer) -> None:
    """Once per (model, tokenizer) size: a model with far more outputs than the tokenizer has tokens trains
    logits that are never a target (e.g. GPT2Config's default 50,257 for a 4,096-token tokenizer)."""
    tokens = tokenizer_size(tokenizer, None)
    if not tokens or vocab_size <= -(-tokens // _VOCABULARY_ROUNDING) * _VOCABULARY_ROUNDING:
        return
    if (vocab_size, tokens) in _warned_vocabularies:
        return
    _warned_vocabularies.add((vocab_size, tokens))
    warnings.warn(f"The model has {vocab_size:,} outputs but the tokenizer has {tokens:,} tokens: the other "
                  f"{vocab_size - tokens:,} logits are never a target, cost memory and time, and take "
                  "probability mass the perplexity pays for. Build the model with vocab_size=len(tokenizer) (e.g. "
                  "GPT2Config(vocab_size=len(tokenizer), ...)).", UserWarning, stacklevel=caller_stacklevel())


def _start_tracker(trainer: Trainer, model) -> None:
    settings, ctx, data = trainer.settings, trainer.ctx, trainer.data
    run_config = dict(settings.as_dict(), pad_token_id=data.pad_token_id, pad_token_id_source=data.pad_source,
                      precision_used=trainer.amp.used, attention_mask_free=trainer.caller.mask_free,
                      n_parameters=sum(p.numel() for p in model.parameters()), vocab_size=data.vocab_size,
                      world_size=ctx.world_size, steps_per_epoch=trainer.length.steps_per_epoch[0],
                      model_class=type(model).__name__)
    trainer.tracker.start(run_config, total_steps=trainer.length.total_steps)
    accumulation = settings.optimisation.gradient_accumulation_steps
    effective_batch_size = settings.data.batch_size * accumulation * ctx.world_size
    trainer.tracker.message(f"Effective batch size: {effective_batch_size}")
    trainer.tracker.message(f"Gradient accumulation steps: {accumulation}")
    trainer.tracker.log_config_lines({"config/effective_batch_size": effective_batch_size,
                                      "config/gradient_accumulation_steps": accumulation})


def shape_results(trainer: Trainer, outcome: Outcome, resumed: dict | None, previous_keywords: dict) -> dict:
    tracker, state, settings = trainer.tracker, trainer.state, trainer.settings
    files = MetricsFiles(settings.checkpoints.output_dir)  # where rank 0 writes them
    partial_epoch = state.step_in_epoch and state.epoch_sums.real_targets  # interrupted or stopped mid-epoch
    if settings.checkpoints.load_best_model_at_end and trainer.best_weights is not None:
        restore_weights(trainer.model, trainer.best_weights)
        tracker.message(f"Loaded the best model (epoch {state.best_epoch}, "
                        f"val loss excl. padding {state.best_val_loss:.4f}).")
    frame = MetricsSummary(tracker.epochs_frame())
    last = frame.iloc[-1] if len(frame) else None
    last_value = lambda column: None if last is None else float(last[column])  # noqa: E731
    results = {
        "final_train_loss": state.epoch_sums.loss if partial_epoch else last_value("train/loss_excl_padding"),
        "final_val_loss": last_value("val/loss_excl_padding"), "val_perplexity": last_value("val/perplexity"),
        # None when no tokenizer (or token_bytes) says how many bytes each token stands for
        "val_bits_per_byte": None if last is None else _finite_or_none(last.get("val/bits_per_byte")),
        "final_train_accuracy": last_value("train/accuracy_excl_padding"),
        "final_val_accuracy": last_value("val/accuracy_excl_padding"),
        "pad_token_id": trainer.data.pad_token_id, "pad_token_id_source": trainer.data.pad_source,
        "precision_used": trainer.amp.used, "attention_mask_free": trainer.caller.mask_free,
        # "linear": the full logits never existed; "chunked": the model's own forward and logits
        # (utils/training/loss/loss_path.py)
        "loss_path": trainer.setup.loss_path.path, "loss_path_reason": trainer.setup.loss_path.reason,
        # The start-up probes of the model's behaviour: which ran, what each found (utils/training/model/probes.py)
        "model_checks": trainer.data.model_checks,
        "loss_history": [r["train/step_loss_excl_padding"] for r in tracker.step_rows],
        "metrics_summary": frame, "steps_summary": tracker.steps_frame(),
        "global_step": state.global_step, "epochs_completed": len(frame),
        "best_val_loss": state.best_val_loss if state.best_epoch else None, "best_epoch": state.best_epoch,
        **trainer.checkpoints.result_keys(),  # completed by fine_tune once the last write ended
        "resumed_from_step": None if resumed is None else resumed["meta"]["step"],
        "resumed_from_checkpoint": None if resumed is None else str(resumed["folder"]),
        "output_dir": settings.checkpoints.output_dir, "metrics_csv": str(files.epochs_csv),
        "steps_csv": str(files.steps_csv),
        "wandb_run_id": tracker.wandb_run_id,
        # Rows of a stream the run went past or cut (bad_examples), and why; validation: its last pass.
        "bad_examples": {"training data": trainer.data.train.report(), "validation data": trainer.data.val.report()},
        "settings": dict(settings.as_dict(), **previous_keywords),
        **outcome.as_result_keys(),
        **previous_result_keys(tracker.steps_frame(), training_seconds=state.run_seconds,
                               sequences=state.train_sequences, amp_enabled=trainer.setup.precision is not None,
                               loss_scale=trainer.amp.loss_scale()),
    }
    _write_final_outputs(trainer, results)
    return results


def _finite_or_none(value):
    return None if value is None or value != value else float(value)  # a blank CSV cell reads back as NaN


def _write_final_outputs(trainer: Trainer, results: dict) -> None:
    """CSVs, W&B's summary and the plots. A Ctrl-C here still returns the results; what did not finish is named."""
    tracker, unfinished = trainer.tracker, []
    results["plot_paths"] = {}
    steps = [("the CSV files and W&B", lambda: tracker.finish(
        {k: v for k, v in results.items() if v is not None and k in (
            "final_train_loss", "final_val_loss", "val_perplexity", "val_bits_per_byte", "global_step", "stopped_early",
            "interrupted")}))]
    logging, output_dir = trainer.settings.logging, trainer.settings.checkpoints.output_dir
    if logging.save_plots and trainer.ctx.is_main:
        title = run_title(output_dir, logging.wandb_run_name)
        steps.append(("the plots", lambda: results.update(plot_paths=plot_rows(tracker, output_dir, title))))
    for what, write in steps:
        try:
            write()
        except KeyboardInterrupt:
            unfinished.append(what)
    if unfinished:
        warnings.warn(f"Interrupted while writing {' and '.join(unfinished)}; the results are returned without them "
                      f"(the CSVs of completed steps are in {trainer.settings.checkpoints.output_dir}).",
                      UserWarning, stacklevel=caller_stacklevel())
    results["unfinished_outputs"] = unfinished

"""Public entry points: ``test_fine_tuning``, ``test_hyperparameter_search`` and ``evaluate_perplexity``,
and the previous module's named helpers, which keep working for callers that import them.

The rule that holds everywhere: padding never counts. Every loss, accuracy and perplexity is a sum
over real target tokens divided by their number (``utils/training/loss/masked.py``). This file translates
arguments into settings and hands them to the engine (``utils/training/engine.py``).
"""
from __future__ import annotations

import contextlib
import importlib

import torch

from .training.engine import RunHooks, fine_tune
from .training.evaluation import EvalCall, evaluate
from .training.model import check_model_against_data, detect_pad_token_id, pad_is_eos
from .training.loss import ModelCaller, byte_lengths_tensor, vocab_size_of
from .training.previous_interface import CLIP_NORM_DEFAULT, PREVIOUS_DEFAULTS, settings_from_call
from .training.search import N_TRIALS_DEFAULT, SearchRequest, run_search
from .training.settings import FineTuneSettings
from .training.data import LoaderBatches, batch_source, to_device
from .training.trainer import forward_backward

__all__ = ["test_fine_tuning", "test_hyperparameter_search", "evaluate_perplexity"]


def __getattr__(name):
    # The previous module imported ``wandb`` here and its callers use (and patch) this attribute; it is imported
    # when first asked for, since importing wandb costs seconds and W&B is optional.
    if name == "wandb":
        return importlib.import_module("wandb")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _wandb_module():
    """The W&B module a run logs to: what a caller assigned to this module's ``wandb`` (or patched it with), else
    ``import wandb`` (which honours a module placed in ``sys.modules``)."""
    return globals().get("wandb") or importlib.import_module("wandb")


# ----------------------------------------------------------------------------------------------
# The previous module's named helpers
# ----------------------------------------------------------------------------------------------
def _detect_pad_token_id(config, tokenizer=None) -> int:
    """Pad id from ``config.pad_token_id``, then the tokenizer's pad, then its eos (warned), else 0 (warned)."""
    return detect_pad_token_id(config, tokenizer)[0]


def _compute_loss_and_backward(model, batch, pad_token_id, *, caller=None, loss_divisor=None,
                               autocast=contextlib.nullcontext, scaler=None, tokenizer=None):
    """Forward one micro-batch, backward ``loss_sum / loss_divisor``; returns the batch's detached ``TokenSums``.

    The batch is taken as training takes a user's DataLoader batch: without an attention mask the pad rule decides
    what is real (a line's final pad id is its EOS when the pad id is the EOS id of ``model.config`` or
    ``tokenizer``), and left padding is moved to the right.
    """
    config = getattr(model, "config", None)
    rule = LoaderBatches([batch], pad_token_id, pad_is_eos(pad_token_id, config, tokenizer), what="batch")
    # The rule's masks and index moves are built on the CPU (as a loader's batches are): one copy per call.
    batch = rule.collate({k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in batch.items()})
    batch = to_device(batch, next(model.parameters()).device)
    return forward_backward(model, batch, pad_token_id, caller=caller or ModelCaller(model), loss_divisor=loss_divisor,
                            autocast=autocast, scaler=scaler)


def _run_validation_epoch(model, data, pad_token_id, *, batch_size=8, device=None, caller=None, ctx=None,
                          autocast=contextlib.nullcontext, tokenizer=None) -> dict:
    """Token-weighted loss, perplexity and accuracy over all real targets of ``data``: ``evaluate_perplexity``'s
    numbers (the same source, pad rule and batches) for a given pad id."""
    source = batch_source(data, pad_token_id, what="validation data",
                          pad_is_eos=pad_is_eos(pad_token_id, getattr(model, "config", None), tokenizer))
    return evaluate(model, source, pad_token_id, batch_size=batch_size,
                    device=device or next(model.parameters()).device, ctx=ctx,
                    call=EvalCall(caller=caller, autocast=autocast))


# ----------------------------------------------------------------------------------------------
# test_fine_tuning
# ----------------------------------------------------------------------------------------------
_D = FineTuneSettings.default


def test_fine_tuning(model, config, train_data=None, val_data=None, n_epochs=_D("n_epochs"),
                     learning_rate=_D("learning_rate"), weight_decay=_D("weight_decay"), batch_size=_D("batch_size"),
                     use_wandb=_D("use_wandb"), use_amp=PREVIOUS_DEFAULTS["use_amp"],
                     gradient_accumulation_steps=_D("gradient_accumulation_steps"),
                     gradient_clip_norm=CLIP_NORM_DEFAULT, random_seed=_D("random_seed"),
                     deterministic=_D("deterministic"), use_lr_schedule=PREVIOUS_DEFAULTS["use_lr_schedule"],
                     log_grad_dist_every=_D("log_grad_dist_every"), log_grad_histogram=_D("log_grad_histogram"), *,
                     tokenizer=None, device=None, token_bytes=None, **options) -> dict:
    """Fine-tune ``model`` (in place) as a causal LM; padding never counts. Returns a results dict.

    The positional order is the previous module's. ``gradient_clip_norm`` is ``max_grad_norm``;
    ``use_amp=True`` is ``precision="fp16"``; ``use_lr_schedule=False`` is ``lr_schedule="constant"``
    without warmup. Further keywords: see ``FineTuneSettings``. Bits per byte (``val_bits_per_byte``,
    ``val/bits_per_byte``) are reported when ``tokenizer`` says what its tokens are, or ``token_bytes`` gives the
    bytes of text per token id.
    """
    settings, previous_keywords = settings_from_call(dict(
        options, n_epochs=n_epochs, learning_rate=learning_rate, weight_decay=weight_decay, batch_size=batch_size,
        use_wandb=use_wandb, use_amp=use_amp, gradient_accumulation_steps=gradient_accumulation_steps,
        random_seed=random_seed, deterministic=deterministic, use_lr_schedule=use_lr_schedule,
        log_grad_dist_every=log_grad_dist_every, log_grad_histogram=log_grad_histogram),
        gradient_clip_norm=gradient_clip_norm)
    return fine_tune(model, config, train_data, val_data, settings, tokenizer=tokenizer, device=device,
                     hooks=RunHooks(wandb_module=_wandb_module, previous_keywords=previous_keywords,
                                    token_bytes=token_bytes))


test_fine_tuning.__test__ = False  # library API, not a pytest test


def _fine_tune(model, config, train_data, val_data, settings, *, tokenizer=None, device=None, hooks=None):
    """The engine as the search calls it (one trial; ``hooks``: its pruning report and byte counts), with this
    module's W&B hook."""
    hooks = hooks or RunHooks()
    hooks.wandb_module = _wandb_module
    return fine_tune(model, config, train_data, val_data, settings, tokenizer=tokenizer, device=device, hooks=hooks)


# ----------------------------------------------------------------------------------------------
# evaluate_perplexity
# ----------------------------------------------------------------------------------------------
def evaluate_perplexity(model, data, config=None, batch_size=8, tokenizer=None, device=None, *,
                        token_bytes=None) -> dict:
    """Exact token-weighted perplexity of ``model`` on ``data`` (padding excluded).

    Returns ``loss`` (mean cross-entropy per real target token, nats), ``perplexity`` (exp of it),
    ``accuracy`` (next-token accuracy over real targets; a tie for the top logit counts as correct),
    ``tokens`` (real targets counted), ``padded_tokens`` (padding positions in the batches this call built: they
    depend on ``batch_size``, which ``padded_tokens_at_batch_size`` repeats; the loss and ``tokens`` do not) and
    ``pad_token_id``; ``bits_per_byte`` (None unless ``tokenizer`` says what its tokens are or ``token_bytes`` gives
    the bytes per token id). Every submodule's train/eval mode is restored.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}.")
    config = config if config is not None else getattr(model, "config", None)
    pad_token_id = _detect_pad_token_id(config, tokenizer)
    source = batch_source(data, pad_token_id, what="evaluation data",
                          pad_is_eos=pad_is_eos(pad_token_id, config, tokenizer))
    if device is not None:
        model.to(device)
    device = next(model.parameters()).device
    check_model_against_data(model, config, [source], pad_token_id, device, tokenizer)
    byte_lengths = byte_lengths_tensor(tokenizer, token_bytes, vocab_size_of(model, config), device)
    result = evaluate(model, source, pad_token_id, batch_size=batch_size, device=device,
                      call=EvalCall(token_bytes=byte_lengths))
    return {"loss": result["loss"], "perplexity": result["perplexity"], "accuracy": result["accuracy"],
            "bits_per_byte": result["bits_per_byte"],
            "tokens": result["real_tokens"], "padded_tokens": result["padded_tokens"],
            "padded_tokens_at_batch_size": batch_size, "pad_token_id": pad_token_id}


def test_hyperparameter_search(model_factory=None, config=None, train_data=None, val_data=None,
                               n_trials=N_TRIALS_DEFAULT, *legacy_positionals, search_space=None, n_epochs=1,
                               timeout=None, storage=None, study_name=None, pruning=True, eval_every=None,
                               random_seed=42, use_wandb=False, tokenizer=None, model=None, model_space=None,
                               model_constraints=None, objectives=None, token_bytes=None,
                               **fine_tuning_kwargs) -> dict:
    """Optuna search over ``test_fine_tuning`` keywords; each trial's objective is its final validation loss
    excluding padding. ``model_space`` searches the model too (``{"n_layer": ("int", 1, 4), "n_embd": [64, 128]}``):
    ``model_factory(params)`` is then called with the trial's model parameters as a dict, and the trial's config is a
    copy of ``config`` with them set; ``model_constraints(params) -> bool`` skips points no model can be built from.
    ``objectives`` (default ``"val_loss"``; ``"val_bits_per_byte"``, ``"n_parameters"``, ``"train_seconds"``,
    ``"flops_estimate"``; a tuple for a multi-objective study) are minimised; ``results["pareto"]`` holds the
    non-dominated trials. Rebuild the best model with ``model_factory(results["best_model_params"])`` and train it
    with ``test_fine_tuning(model, results["best_config"], ..., **results["best_params"])``.

    ``storage`` with ``study_name`` keeps the study across calls and disconnects: a ``*.db``
    SQLite file for one process at a time, a ``*.log`` journal file for several processes on one machine or a
    shared disk, a database URL ("postgresql://...") for several machines. A study records its set-up and refuses
    trials under another one. ``n_trials`` counts this call's trials; ``n_trials_in_study`` the study's. The
    previous positional form ``(model_factory, config, train_data, n_trials, search_space, random_seed,
    deterministic)`` still works. Details: ``utils/training/search/run.py``.
    """
    request = SearchRequest.from_call(dict(locals()))  # the signature above is the one list of keywords
    return run_search(_fine_tune, request)


test_hyperparameter_search.__test__ = False  # library API, not a pytest test

"""Hyperparameter search: Optuna over the same padding-correct engine as ``test_fine_tuning``.

Every trial's objective is the token-weighted validation loss excluding padding — exactly the
``final_val_loss`` that ``test_fine_tuning`` reports for the same settings and seed. The call's arguments
become one ``SearchRequest``; search spaces are parsed in ``search_space.py``, storages, studies and their
recorded set-up live in ``search_study.py``.
"""
from __future__ import annotations

import copy
import gc
import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch
from torch import nn

from ..distributed import launched_by_torchrun
from ..metrics import safe_exp
from ..outcome import OutcomeKind
from ..model import detect_pad_token_id, pad_is_eos
from ..previous_interface import DefaultInt, settings_from_call
from .search_space import DEFAULT_SEARCH_SPACE, parse_search_space, suggest  # noqa: F401 (DEFAULT_SEARCH_SPACE: API)
from .search_study import first_try_of, join_model, model_record, open_study, setup_record
from ..settings import FineTuneSettings
from ..data import train_and_val_sources

N_TRIALS_DEFAULT = DefaultInt(10)


# ----------------------------------------------------------------------------------------------
# The call, once
# ----------------------------------------------------------------------------------------------
@dataclass
class SearchRequest:
    """One search call: built once from ``test_hyperparameter_search``'s arguments, read everywhere after."""

    new_model: object  # () -> a fresh model for one trial
    config: object
    train_data: object
    val_data: object
    n_trials: int
    space: dict  # parsed: {name: (setting, kind, args)}
    fixed: dict  # the test_fine_tuning keywords every trial shares (n_epochs, eval_every, random_seed included)
    storage: object = None
    study_name: str | None = None
    timeout: float | None = None
    pruning: object = True
    tokenizer: object = None
    device: object = None
    heartbeat_interval: int = 60
    progress: bool | str = True
    prepared: tuple = field(default=(None, None), repr=False)  # (train, val) sources, filled by prepare()

    @classmethod
    def from_call(cls, arguments: dict) -> "SearchRequest":
        """From the entry point's own arguments (its signature is the one list of keywords); raises before any
        trial on a bad space, a keyword both searched and fixed, or a bad fixed keyword."""
        arguments = dict(arguments)
        keywords = dict(arguments.pop("fine_tuning_kwargs"))
        val_data, n_trials, positional = bind_legacy_positionals(arguments["val_data"], arguments["n_trials"],
                                                                 arguments["legacy_positionals"])
        if "deterministic" in positional:
            keywords["deterministic"] = positional["deterministic"]
        space = parse_search_space(positional.get("search_space", arguments["search_space"]))
        extras = {name: keywords.pop(name) for name in ("device", "heartbeat_interval", "progress") if name in keywords}
        clashing = {setting for setting, _, _ in space.values()} & set(keywords)
        if clashing:
            raise ValueError(f"{sorted(clashing)} are both searched and fixed by keyword; drop one of them.")
        # Trials draw no training plots unless asked: the search draws its own.
        fixed = dict(dict(save_plots=False), **keywords, n_epochs=arguments["n_epochs"],
                     eval_every=arguments["eval_every"],
                     random_seed=positional.get("random_seed", arguments["random_seed"]),
                     use_wandb=arguments["use_wandb"])
        settings = settings_from_call(dict(fixed, progress=False))[0]  # bad fixed keywords fail now
        if settings.fsdp or launched_by_torchrun():
            # Every process would draw its own trial and the collectives of two different trials would meet.
            raise ValueError("test_hyperparameter_search runs each trial in this one process, so it does not run "
                             "under torchrun or with fsdp=True. Search with fsdp=False in one process per GPU (several "
                             "processes may share one storage, see README), then train the best parameters with "
                             "test_fine_tuning under torchrun.")
        return cls(new_model=model_source(arguments["model_factory"], arguments["model"]), config=arguments["config"],
                   train_data=arguments["train_data"], val_data=val_data, n_trials=int(n_trials), space=space,
                   fixed=fixed, storage=arguments["storage"], study_name=arguments["study_name"],
                   timeout=arguments["timeout"], pruning=arguments["pruning"], tokenizer=arguments["tokenizer"],
                   **extras)

    @property
    def fixed_settings(self) -> FineTuneSettings:
        return settings_from_call(dict(self.fixed, progress=False))[0]

    @property
    def output_dir(self) -> Path:
        return Path(self.fixed.get("output_dir") or Path.cwd() / "outputs" / "search")

    def prepare(self) -> None:
        """Tokens to examples, checked and split once for the whole study (trials reuse them)."""
        if self.train_data is None:
            self.prepared = (None, self.val_data)  # each trial's test_fine_tuning makes its announced synthetic set
            return
        pad_token_id, _ = detect_pad_token_id(self.config, self.tokenizer)
        eos_is_pad = pad_is_eos(pad_token_id, self.config, self.tokenizer)
        device = torch.device(self.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        settings = self.fixed_settings
        self.prepared = train_and_val_sources(self.train_data, self.val_data, pad_token_id,
                                              settings.padding_multiple(device), eos_is_pad, settings.val_fraction,
                                              settings.random_seed, settings.stream_buffer_size,
                                              settings.bad_examples)


def bind_legacy_positionals(val_data, n_trials, legacy_args) -> tuple:
    """The previous form was ``(model_factory, config, train_data, n_trials, search_space, random_seed,
    deterministic)``: an int where ``val_data`` stands means that form.

    Returns ``(val_data, n_trials, {name: value})`` with the previous form's further positionals by name.
    """
    if not (isinstance(val_data, int) and not isinstance(val_data, bool)):
        if legacy_args:
            raise TypeError("test_hyperparameter_search() takes at most 5 positional arguments "
                            "(model_factory, config, train_data, val_data, n_trials); pass the rest by keyword.")
        return val_data, n_trials, {}
    positional = ([] if n_trials is N_TRIALS_DEFAULT else [n_trials]) + list(legacy_args)
    if len(positional) > 3:
        raise TypeError("test_hyperparameter_search() got too many positional arguments for the previous form "
                        "(model_factory, config, train_data, n_trials, search_space, random_seed, deterministic).")
    return None, val_data, dict(zip(("search_space", "random_seed", "deterministic"), positional))


def model_source(model_factory, model):
    """A function returning a fresh model per trial; an instance is deep-copied, never trained itself."""
    given = model if model is not None else model_factory
    if isinstance(given, nn.Module):
        return lambda: copy.deepcopy(given)
    if callable(given):
        return given
    raise TypeError("Pass model_factory (a function returning a fresh model) or model= (an instance to copy per "
                    "trial).")


# ----------------------------------------------------------------------------------------------
# The search
# ----------------------------------------------------------------------------------------------
def run_search(fine_tune, request: SearchRequest) -> dict:
    import optuna

    request.prepare()
    setup = setup_record(request.fixed_settings, request.space, *request.prepared)
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # the bar shows progress; Optuna's info lines would repeat it
    try:
        study = open_study(request.storage, request.heartbeat_interval, request.study_name, _pruner(request.pruning),
                           request.fixed["random_seed"], setup)
        _check_study_folder(request.output_dir / study.study_name, study)
        join_model(study, _first_model_record(request), request.storage)
        bar = _TrialBar(request.n_trials, enabled=bool(request.progress))
        try:
            _optimize(study, lambda trial: _objective(fine_tune, request, study, trial), request, bar)
        except KeyboardInterrupt:
            warnings.warn("Search interrupted; returning the trials so far.", UserWarning, stacklevel=3)
        finally:
            bar.close()
    finally:
        optuna.logging.set_verbosity(verbosity)
    return _results(study, bar.finished, request.output_dir)


def _optimize(study, objective, request: SearchRequest, bar) -> None:
    """``study.optimize`` for this call's trials, going on when a trial was taken from this process: on a shared
    storage another process's heartbeat check marks a trial failed when this process stalled past the grace period
    (a loaded machine, a Drive stall); Optuna then raises while recording the result, and the study retries the
    trial's parameters itself."""
    import optuna

    started, begun = [], time.monotonic()

    def counted(trial):
        started.append(trial.number)
        return objective(trial)

    while request.n_trials is None or len(started) < request.n_trials:
        timeout = None if request.timeout is None else request.timeout - (time.monotonic() - begun)
        if timeout is not None and timeout <= 0:
            return
        try:
            study.optimize(counted, n_trials=None if request.n_trials is None else request.n_trials - len(started),
                           timeout=timeout, catch=(Exception,), callbacks=[bar.update])
            return
        except (optuna.exceptions.UpdateFinishedTrialError, ValueError):  # the two ways Optuna refuses the result
            taken = [t for t in study.get_trials(deepcopy=False) if t.number == started[-1]] if started else []
            if not taken or taken[0].state != optuna.trial.TrialState.FAIL:
                raise
            bar.update(study, taken[0])  # it ran in this call (Optuna skipped the callbacks)
            warnings.warn(f"Trial {started[-1]} was marked failed by another process while this one still ran it (its "
                          "heartbeat stalled past the grace period); the study retries its parameters. Going on.",
                          UserWarning, stacklevel=4)


def _first_model_record(request: SearchRequest):
    """() -> the record of the model the first trial trains (built once; that trial then takes this instance)."""
    made = {}

    def record() -> dict:
        if "record" not in made:
            first, factory = request.new_model(), request.new_model
            made["record"] = model_record(first, request.config)
            waiting = [first]
            request.new_model = lambda: waiting.pop() if waiting else factory()
        return made["record"]

    return record


def _check_study_folder(folder: Path, study) -> None:
    """Trial folders with checkpoints that the study has no trial for belong to an earlier search of the same name
    (in memory, or a deleted database): new trials would start there and be refused one by one."""
    known = {trial.number for trial in study.get_trials(deepcopy=False)}
    foreign = sorted(path.name for path in folder.glob("trial-*")
                     if (path / "checkpoints").is_dir() and path.name[len("trial-"):] not in {str(n) for n in known})
    if foreign:
        raise ValueError(f"{folder} holds checkpoints of trials that study {study.study_name!r} does not have "
                         f"({', '.join(foreign[:3])}{' ...' if len(foreign) > 3 else ''}): they are from an earlier "
                         f"search of the same name. Pass another study_name (or none, in memory), or move {folder} "
                         "away.")


def _objective(fine_tune, request: SearchRequest, study, trial) -> float:
    params = {name: suggest(trial, name, kind, args) for name, (setting, kind, args) in request.space.items()}
    first_try = first_try_of(study, trial)
    # Per study, so a second study never meets the first's checkpoints; a retried trial continues in the folder
    # of the trial it retries, from that trial's last checkpoint.
    folder = request.output_dir / study.study_name / f"trial-{trial.number if first_try is None else first_try}"
    settings, _ = settings_from_call(dict(
        request.fixed, **{request.space[name][0]: value for name, value in params.items()}, output_dir=str(folder),
        resume_from_checkpoint=first_try is not None and request.fixed_settings.writes_checkpoints,
        progress=request.progress == "all", wandb_group=study.study_name,
        wandb_run_name=f"{study.study_name}-trial-{trial.number}"))
    return _run_trial(fine_tune, trial, request, settings)


def _pruner(pruning):
    import optuna

    if pruning is True:
        # Two finished trials are enough to call a trial hopeless on tiny searches (Optuna's default is 5).
        return optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=0)
    if pruning in (False, None):
        return optuna.pruners.NopPruner()
    return pruning  # an Optuna pruner instance


def _run_trial(fine_tune, trial, request: SearchRequest, settings: FineTuneSettings) -> float:
    import optuna

    def report(step, val_loss, final):
        trial.report(val_loss, step)
        if not final and trial.should_prune():  # a finished trial keeps its value
            return f"pruned by Optuna at optimizer step {step} (val loss excl. padding {val_loss:.4f})"
        return None

    model = None
    train, val = request.prepared
    try:
        model = request.new_model()
        results = fine_tune(model, request.config, train, val, settings, tokenizer=request.tokenizer,
                            device=request.device, on_evaluation=report)
    except Exception as error:
        reason = f"{type(error).__name__}: {error}"
        if isinstance(error, torch.OutOfMemoryError):
            reason = f"out of GPU memory with batch_size={settings.batch_size}"
        trial.set_user_attr("reason", reason[:500])
        raise
    finally:
        del model  # trial k+1 must not inherit trial k's memory
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    if results["resumed_from_step"] is not None:
        trial.set_user_attr("resumed_from_step", results["resumed_from_step"])
    outcome = results["outcome"]
    if outcome.kind is OutcomeKind.INTERRUPTED:
        raise KeyboardInterrupt
    if outcome.kind is OutcomeKind.PRUNED:
        trial.set_user_attr("reason", outcome.reason)
        raise optuna.TrialPruned(outcome.reason)
    loss = results["final_val_loss"]
    if outcome.kind is OutcomeKind.NON_FINITE or loss is None or not math.isfinite(loss):
        trial.set_user_attr("reason", f"non-finite loss: {results['stop_reason']}")
        return math.nan  # Optuna records a NaN objective as a failed trial
    trial.set_user_attr("val_perplexity", results["val_perplexity"])
    return loss


class _TrialBar:
    """The progress bar, and the count of trials this call ran (other processes add theirs to the study)."""

    def __init__(self, total: int, enabled: bool):
        self.bar, self.finished = None, 0
        if enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc="search", unit="trial", dynamic_ncols=True)

    def update(self, study, trial) -> None:
        self.finished += 1
        if self.bar is None:
            return
        self.bar.update(1)
        completed = [t for t in study.trials if t.value is not None and math.isfinite(t.value)]
        if completed:
            self.bar.set_postfix(best_val_loss=f"{min(t.value for t in completed):.4f}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def trials_frame(study) -> pd.DataFrame:
    rows = []
    for trial in study.trials:
        duration = ((trial.datetime_complete - trial.datetime_start).total_seconds()
                    if trial.datetime_complete and trial.datetime_start else None)
        rows.append({"number": trial.number, "state": trial.state.name, "value": trial.value,
                     **{f"params_{k}": v for k, v in trial.params.items()}, "duration_s": duration,
                     "reason": trial.user_attrs.get("reason"), "retry_of": trial.system_attrs.get("failed_trial")})
    return pd.DataFrame(rows)


def _results(study, trials_run: int, output_dir: Path) -> dict:
    import optuna

    frame = trials_frame(study)
    completed = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    best = min(completed, key=lambda t: t.value) if completed else None
    if best is None:
        warnings.warn("No trial of the search completed; see the 'reason' column of results['trials'].", UserWarning,
                      stacklevel=3)
    return {
        "best_params": dict(best.params) if best else None,
        "best_value": best.value if best else None,
        "best_val_perplexity": safe_exp(best.value) if best else None,
        "best_trial_number": best.number if best else None,
        "trials": frame, "trials_df": frame, "study": study, "study_name": study.study_name,
        "n_trials": trials_run, "n_trials_in_study": len(study.trials),
        "n_completed_in_study": len(completed),
        "all_trials": [{"number": t.number, "value": t.value, "params": dict(t.params)} for t in study.trials],
        "plot_paths": _plots(study, len(completed), output_dir),
    }


def _plots(study, n_completed: int, output_dir: Path) -> dict[str, str]:
    """The search's figures (``plots.search_figures``): trial values and best so far, each parameter against the
    objective, and importances once enough trials completed."""
    if n_completed == 0:
        return {}
    from ..metrics import save_search_plots

    try:
        return save_search_plots(study, output_dir)
    except Exception as error:  # noqa: BLE001 - a plot must never lose the search's results
        warnings.warn(f"Could not draw the search's plots ({type(error).__name__}: {error}).", UserWarning,
                      stacklevel=4)
        return {}

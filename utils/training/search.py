"""Hyperparameter search: Optuna over the same padding-correct engine as ``test_fine_tuning``.

Every trial's objective is the token-weighted validation loss excluding padding — exactly the
``final_val_loss`` that ``test_fine_tuning`` reports for the same settings and seed. Persistence
and parallelism are Optuna's own storages (RDB with heartbeats, or the journal file backend).
"""
from __future__ import annotations

import copy
import gc
import math
import warnings
from pathlib import Path

import pandas as pd
import torch
from torch import nn

from .previous_interface import DefaultInt, settings_from_call
from .sources import train_and_val_sources
from .outcome import OutcomeKind
from .pad_id import detect_pad_token_id, pad_is_eos
from .settings import FineTuneSettings

DEFAULT_SEARCH_SPACE = {
    "learning_rate": ("log", 1e-5, 1e-3),
    "batch_size": ("categorical", [4, 8, 16]),
    "warmup_ratio": ("float", 0.0, 0.2),
    "weight_decay": ("float", 0.0, 0.1),
}
# The previous module's search-space names.
LEGACY_NAMES = {"lr": "learning_rate", "wd": "weight_decay", "warmup": "warmup_steps"}
# A (low, high) range without a kind is searched on a log scale for these settings when low > 0:
# both span orders of magnitude. Every other range is linear.
LOG_SCALE_SETTINGS = ("learning_rate", "weight_decay")
KINDS = ("log", "float", "int", "categorical")
N_TRIALS_DEFAULT = DefaultInt(10)
NOT_SEARCHABLE = {"output_dir", "resume_from_checkpoint", "wandb_run_name", "wandb_group", "progress"}


# ----------------------------------------------------------------------------------------------
# Search space
# ----------------------------------------------------------------------------------------------
def parse_search_space(space: dict | None) -> dict[str, tuple[str, str, tuple]]:
    """``{name: (setting, kind, args)}``; raises ``ValueError`` naming a bad entry before any trial runs.

    Accepted specs: ``("log"|"float"|"int", low, high)``, ``("categorical", [choices])``, a plain list
    (categorical) or a ``(low, high)`` tuple (ints: an int range; floats: log scale for
    ``LOG_SCALE_SETTINGS`` when low > 0, else linear).
    """
    space = DEFAULT_SEARCH_SPACE if space is None else space
    if not isinstance(space, dict) or not space:
        raise ValueError(f"search_space must be a non-empty dict of name -> spec, got {space!r}.")
    parsed = {}
    for name, spec in space.items():
        setting = LEGACY_NAMES.get(name, name)
        if setting not in FineTuneSettings.keyword_names() or setting in NOT_SEARCHABLE:
            raise ValueError(f"search_space names {name!r}, which is not a searchable keyword of test_fine_tuning. "
                             f"Use one of: {sorted(FineTuneSettings.keyword_names() - NOT_SEARCHABLE)}.")
        kind, args = _parse_spec(name, setting, spec)
        for value in (args[0] if kind == "categorical" else args):
            _check_value(name, setting, value)
        parsed[name] = (setting, kind, args)
    return parsed


def _parse_spec(name, setting, spec):
    bad = ValueError(f"search_space[{name!r}] = {spec!r} is not a spec. Use ('log', low, high), ('float', low, high), "
                     "('int', low, high), ('categorical', [choices]), a list of choices or a (low, high) tuple.")
    if isinstance(spec, list):
        kind, args = "categorical", (spec,)
    elif isinstance(spec, tuple) and spec and spec[0] in KINDS:
        kind, args = spec[0], tuple(spec[1:])
    elif isinstance(spec, tuple) and len(spec) == 2 and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in spec):
        if all(isinstance(v, int) for v in spec):
            kind = "int"
        else:
            kind = "log" if setting in LOG_SCALE_SETTINGS and spec[0] > 0 else "float"
        args = tuple(spec)
    else:
        raise bad
    if kind == "categorical":
        if len(args) != 1 or not isinstance(args[0], (list, tuple)) or not args[0]:
            raise bad
        return kind, (list(args[0]),)
    if len(args) != 2 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in args):
        raise bad
    low, high = args
    if not low < high:
        raise ValueError(f"search_space[{name!r}]: low ({low}) must be below high ({high}).")
    if kind == "log" and low <= 0:
        raise ValueError(f"search_space[{name!r}]: a log range needs low > 0, got {low}. Use ('float', {low}, {high}).")
    if kind == "int" and not all(isinstance(v, int) for v in args):
        raise ValueError(f"search_space[{name!r}]: an int range needs int bounds, got {args}.")
    return kind, args


def _check_value(name, setting, value):
    try:
        FineTuneSettings(**{setting: value}).validate()
    except (TypeError, ValueError) as error:
        raise ValueError(f"search_space[{name!r}] can take {value!r}, which test_fine_tuning refuses: {error}") from None


def suggest(trial, name: str, kind: str, args: tuple):
    if kind == "categorical":
        return trial.suggest_categorical(name, args[0])
    if kind == "int":
        return trial.suggest_int(name, *args)
    return trial.suggest_float(name, *args, log=kind == "log")


# ----------------------------------------------------------------------------------------------
# Arguments (the new signature, and the previous positional form)
# ----------------------------------------------------------------------------------------------
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
    raise TypeError("Pass model_factory (a function returning a fresh model) or model= (an instance to copy per trial).")


# ----------------------------------------------------------------------------------------------
# Storage
# ----------------------------------------------------------------------------------------------
def open_storage(storage, heartbeat_interval: int):
    """None: in memory. A URL: RDB with a heartbeat, whose stale trials are retried. ``*.log``: a journal file."""
    import optuna

    if storage is None or isinstance(storage, optuna.storages.BaseStorage):
        return storage
    location = str(storage)
    if location.endswith(".log"):
        from optuna.storages.journal import JournalFileBackend

        Path(location).parent.mkdir(parents=True, exist_ok=True)
        return optuna.storages.JournalStorage(JournalFileBackend(location))
    if "://" in location:
        if location.startswith("sqlite:///"):
            Path(location[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
        # Optuna 4.9 renamed the callback (the old name warns); use whichever the installed version has.
        retry_class = getattr(optuna.storages, "RetryHeartbeatStaleTrialCallback", None) or optuna.storages.RetryFailedTrialCallback
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Optuna marks heartbeats "experimental" since 2.8
            retry = retry_class(max_retry=3)
            return optuna.storages.RDBStorage(location, heartbeat_interval=heartbeat_interval,
                                              grace_period=2 * heartbeat_interval, **{_stale_callback_keyword(): retry})
    raise ValueError(f"storage={storage!r} is neither a database URL (e.g. 'sqlite:///study.db') nor a journal file path "
                     "ending in '.log'.")


def _stale_callback_keyword() -> str:
    import inspect

    import optuna

    parameters = inspect.signature(optuna.storages.RDBStorage.__init__).parameters
    # Optuna 5 renamed failed_trial_callback; use whichever the installed version has.
    return "heartbeat_stale_trial_callback" if "heartbeat_stale_trial_callback" in parameters else "failed_trial_callback"


# ----------------------------------------------------------------------------------------------
# The search
# ----------------------------------------------------------------------------------------------
def run_search(fine_tune, model_factory=None, config=None, train_data=None, val_data=None, n_trials=N_TRIALS_DEFAULT,
               *legacy_args, search_space=None, n_epochs=1, timeout=None, storage=None, study_name=None, pruning=True,
               eval_every=None, random_seed=42, use_wandb=False, tokenizer=None, model=None, heartbeat_interval=60,
               progress=True, **fine_tuning_kwargs) -> dict:
    import optuna

    val_data, n_trials, positional = bind_legacy_positionals(val_data, n_trials, legacy_args)
    search_space = positional.get("search_space", search_space)
    random_seed = positional.get("random_seed", random_seed)
    if "deterministic" in positional:
        fine_tuning_kwargs["deterministic"] = positional["deterministic"]
    n_trials = int(n_trials)
    device = fine_tuning_kwargs.pop("device", None)
    space = parse_search_space(search_space)
    clashing = {setting for setting, _, _ in space.values()} & set(fine_tuning_kwargs)
    if clashing:
        raise ValueError(f"{sorted(clashing)} are both searched and fixed by keyword; drop one of them.")
    # Trials draw no training plots unless asked: the search draws its own.
    base = dict(dict(save_plots=False), **fine_tuning_kwargs, n_epochs=n_epochs, eval_every=eval_every,
                random_seed=random_seed, use_wandb=use_wandb)
    settings_from_call(dict(base, progress=False))  # bad fixed keywords fail now
    new_model = model_source(model_factory, model)
    train, val = _prepare_once(config, tokenizer, train_data, val_data, base, random_seed, device)
    output_dir = Path(fine_tuning_kwargs.get("output_dir") or Path.cwd() / "outputs" / "search")

    def objective(trial):
        params = {name: suggest(trial, name, kind, args) for name, (setting, kind, args) in space.items()}
        settings, _ = settings_from_call(dict(
            base, **{space[name][0]: value for name, value in params.items()},
            output_dir=str(output_dir / f"trial-{trial.number}"), progress=progress == "all",
            wandb_group=study.study_name, wandb_run_name=f"{study.study_name}-trial-{trial.number}"))
        return _run_trial(fine_tune, trial, new_model, config, train, val, settings, tokenizer, device)

    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # the bar shows progress; Optuna's info lines would repeat it
    try:
        study = optuna.create_study(
            storage=open_storage(storage, heartbeat_interval), sampler=optuna.samplers.TPESampler(seed=random_seed),
            pruner=_pruner(pruning), study_name=study_name or ("tier3-search" if storage is not None else None),
            direction="minimize", load_if_exists=True)
        started_with = len(study.trials)
        bar = _TrialBar(n_trials, enabled=bool(progress))
        try:
            study.optimize(objective, n_trials=n_trials, timeout=timeout, catch=(Exception,), callbacks=[bar.update])
        except KeyboardInterrupt:
            warnings.warn("Search interrupted; returning the trials so far.", UserWarning, stacklevel=3)
        finally:
            bar.close()
    finally:
        optuna.logging.set_verbosity(verbosity)
    return _results(study, len(study.trials) - started_with, output_dir)


def _prepare_once(config, tokenizer, train_data, val_data, base, random_seed, device):
    """Tokens to examples, checked and split once for the whole study (trials reuse them)."""
    if train_data is None:
        return None, val_data  # each trial's test_fine_tuning makes its announced synthetic set
    pad_token_id, _ = detect_pad_token_id(config, tokenizer)
    eos_is_pad = pad_is_eos(pad_token_id, config, tokenizer)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    settings = FineTuneSettings(**{k: v for k, v in base.items() if k in FineTuneSettings.keyword_names()})
    return train_and_val_sources(train_data, val_data, pad_token_id, settings.padding_multiple(device), eos_is_pad,
                                 settings.val_fraction, random_seed)


def _pruner(pruning):
    import optuna

    if pruning is True:
        # Two finished trials are enough to call a trial hopeless on tiny searches (Optuna's default is 5).
        return optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=0)
    if pruning in (False, None):
        return optuna.pruners.NopPruner()
    return pruning  # an Optuna pruner instance


def _run_trial(fine_tune, trial, new_model, config, train, val, settings, tokenizer, device) -> float:
    import optuna

    def report(step, val_loss, final):
        trial.report(val_loss, step)
        if not final and trial.should_prune():  # a finished trial keeps its value
            return f"pruned by Optuna at optimizer step {step} (val loss excl. padding {val_loss:.4f})"
        return None

    model = None
    try:
        model = new_model()
        results = fine_tune(model, config, train, val, settings, tokenizer=tokenizer, device=device, on_evaluation=report)
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
    def __init__(self, total: int, enabled: bool):
        self.bar = None
        if enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc="search", unit="trial", dynamic_ncols=True)

    def update(self, study, trial) -> None:
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
        duration = (trial.datetime_complete - trial.datetime_start).total_seconds() if trial.datetime_complete and trial.datetime_start else None
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
        warnings.warn("No trial of the search completed; see the 'reason' column of results['trials'].", UserWarning, stacklevel=3)
    return {
        "best_params": dict(best.params) if best else None,
        "best_value": best.value if best else None,
        "best_val_perplexity": math.exp(best.value) if best else None,
        "best_trial_number": best.number if best else None,
        "trials": frame, "trials_df": frame, "study": study, "n_trials": trials_run,
        "all_trials": [{"number": t.number, "value": t.value, "params": dict(t.params)} for t in study.trials],
        "plot_paths": _plots(study, len(completed), output_dir),
    }


def _plots(study, n_completed: int, output_dir: Path) -> dict[str, str]:
    if n_completed == 0:
        return {}
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as optuna_plots

    from .plots import show_inline

    output_dir.mkdir(parents=True, exist_ok=True)
    makers = {"history": optuna_plots.plot_optimization_history}
    if n_completed >= 3:
        makers["importances"] = optuna_plots.plot_param_importances
    paths = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Optuna marks its matplotlib plots experimental
        for name, make in makers.items():
            try:
                figure = make(study).figure
            except Exception as error:  # noqa: BLE001 - a plot must never lose the search's results
                warnings.warn(f"Could not draw the search's {name} plot ({type(error).__name__}: {error}).", UserWarning, stacklevel=4)
                continue
            path = output_dir / f"search_{name}.png"
            figure.savefig(path, dpi=100, bbox_inches="tight")
            show_inline(path)
            plt.close(figure)  # Optuna draws through pyplot: close, or every trial's figures stay in memory
            paths[name] = str(path)
    return paths

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

import torch
from torch import nn

from ..distributed import launched_by_torchrun
from ..engine import RunHooks
from ..metrics import safe_exp
from ..loss import check_token_bytes, unwrap
from ..outcome import OutcomeKind
from ..model import detect_pad_token_id, pad_is_eos
from ..previous_interface import DefaultInt, settings_from_call
from .objectives import (OBJECTIVES, canonical_objectives, cost_of, objective_values, pareto_columns, pareto_front,
                         trials_frame)
from .search_space import accepted, parse_model_space, parse_search_space, reference_point, suggest
from .search_study import (SETUP_ATTR, family_record, first_try_of, join_model, model_differences, model_record,
                           open_study, setup_record, shapes_fingerprint)
from ..settings import FineTuneSettings
from ..checkpoints import checkpoints_folder
from ..data import source_options, train_and_val_sources
from ..warn import caller_stacklevel

N_TRIALS_DEFAULT = DefaultInt(10)
# Points the model constraints refuse are not trained and not counted in n_trials; past this many in one call the
# search stops (the constraint refuses nearly everything TPE proposes).
MAX_REFUSED_POINTS = 100


class RefusedPoint(Exception):
    """Raised inside a trial whose model parameters ``model_constraints`` refuse: recorded as pruned, not trained."""


# ----------------------------------------------------------------------------------------------
# The call, once
# ----------------------------------------------------------------------------------------------
@dataclass
class SearchRequest:
    """One search call: built once from ``test_hyperparameter_search``'s arguments, read everywhere after."""

    new_model: object  # () -> a fresh model for one trial; with a model space: (model parameters dict) -> model
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
    model_space: dict = field(default_factory=dict)  # parsed: {name: (kind, args)}, passed to new_model
    model_constraints: object = None  # (model parameters dict) -> bool, or None
    objectives: tuple = ("val_loss",)  # all minimised
    token_bytes: object = None  # the caller's bytes per token id (bits per byte without a tokenizer that says)
    recorded_model: dict | None = field(default=None, repr=False)  # the study's model (family) record, once joined

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
        model_space = parse_model_space(arguments["model_space"], space)
        constraints = arguments["model_constraints"]
        if constraints is not None and (not callable(constraints) or not model_space):
            raise ValueError("model_constraints must be a function of the model_space parameters (a dict) returning "
                             "True for the points a model can be built from, and needs model_space.")
        if arguments["token_bytes"] is not None:
            check_token_bytes(arguments["token_bytes"])  # before any trial
        objectives = canonical_objectives(arguments["objectives"],
                                          bytes_known=arguments["tokenizer"] is not None
                                          or arguments["token_bytes"] is not None)
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
        if settings.distributed.fsdp or launched_by_torchrun():
            # Every process would draw its own trial and the collectives of two different trials would meet.
            raise ValueError("test_hyperparameter_search runs each trial in this one process, so it does not run "
                             "under torchrun or with fsdp=True. Search with fsdp=False in one process per GPU (several "
                             "processes may share one storage, see README), then train the best parameters with "
                             "test_fine_tuning under torchrun.")
        if model_space:
            reference_point(model_space, constraints)  # refuses constraints that accept nothing, before any trial
        return cls(new_model=model_source(arguments["model_factory"], arguments["model"], bool(model_space)),
                   config=arguments["config"], train_data=arguments["train_data"], val_data=val_data,
                   n_trials=int(n_trials), space=space, fixed=fixed, storage=arguments["storage"],
                   study_name=arguments["study_name"], timeout=arguments["timeout"], pruning=arguments["pruning"],
                   tokenizer=arguments["tokenizer"], model_space=model_space, model_constraints=constraints,
                   objectives=objectives, token_bytes=arguments["token_bytes"], **extras)

    @property
    def fixed_settings(self) -> FineTuneSettings:
        return settings_from_call(dict(self.fixed, progress=False))[0]

    def config_for(self, model_params: dict):
        """The config a trial trains with: a copy of ``config`` with the model parameters set on it (the config
        itself without a model space or config)."""
        if not model_params or self.config is None:
            return self.config
        trial_config = copy.deepcopy(self.config)
        for name, value in model_params.items():
            setattr(trial_config, name, value)
        return trial_config

    def build_model(self, model_params: dict):
        return self.new_model(dict(model_params)) if self.model_space else self.new_model()

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
        self.prepared = train_and_val_sources(self.train_data, self.val_data,
                                              source_options(settings.data, settings.run.random_seed, device,
                                                             pad_token_id, eos_is_pad))


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


def model_source(model_factory, model, from_params: bool = False):
    """A function returning a fresh model per trial; an instance is deep-copied, never trained itself. With a model
    space (``from_params``) the factory takes the trial's model parameters as one dict."""
    given = model if model is not None else model_factory
    if from_params:
        if isinstance(given, nn.Module) or not callable(given):
            raise TypeError("model_space needs model_factory: a function taking the trial's model parameters as a dict "
                            "and returning a fresh model built from them (an instance cannot be rebuilt with other "
                            "parameters), e.g. lambda p: GPT2LMHeadModel(GPT2Config(n_layer=p['n_layer'], ...)).")
        import inspect

        try:
            inspect.signature(given).bind({})
        except TypeError:
            raise TypeError(f"model_space is given, so model_factory is called with the trial's model parameters as "
                            f"one dict, but {getattr(given, '__qualname__', given)!r} does not take one argument. "
                            "Define it as def make_model(params): ... (params['n_layer'], ...).") from None
        except ValueError:  # no signature to read (a builtin): it will tell at the first trial
            pass
        return given
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
    if request.model_space:
        setup["model_space"] = {name: [kind, list(args)] for name, (kind, args) in request.model_space.items()}
    if request.objectives != ("val_loss",):  # a study of before the objectives were recorded has the default
        setup["objectives"] = list(request.objectives)
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # the bar shows progress; Optuna's info lines would repeat it
    try:
        study = open_study(request.storage, request.heartbeat_interval, request.study_name, _pruner(request),
                           request.fixed["random_seed"], setup, directions=len(request.objectives))
        _check_study_folder(request.output_dir / study.study_name, study)
        join_model(study, _first_model_record(request), request.storage)
        request.recorded_model = study.user_attrs[SETUP_ATTR]["model"]
        bar = _TrialBar(request.n_trials, enabled=bool(request.progress))
        refused = []
        try:
            _optimize(study, lambda trial: _objective(fine_tune, request, study, trial), request, bar, refused)
        except KeyboardInterrupt:
            warnings.warn("Search interrupted; returning the trials so far.",
                          UserWarning, stacklevel=caller_stacklevel())
        finally:
            bar.close()
    finally:
        optuna.logging.set_verbosity(verbosity)
    return _results(study, bar.finished - len(refused), request)


def _optimize(study, objective, request: SearchRequest, bar, refused: list) -> None:
    """``study.optimize`` for this call's trials, going on when a trial was taken from this process: on a shared
    storage another process's heartbeat check marks a trial failed when this process stalled past the grace period
    (a loaded machine, a Drive stall); Optuna then raises while recording the result, and the study retries the
    trial's parameters itself. Points the model constraints refuse are recorded but not counted (``refused``)."""
    import optuna

    started, begun = [], time.monotonic()

    def counted(trial):
        started.append(trial.number)
        try:
            return objective(trial)
        except RefusedPoint as point:
            started.remove(trial.number)
            refused.append(trial.number)
            raise optuna.TrialPruned(str(point)) from None

    while request.n_trials is None or len(started) < request.n_trials:
        timeout = None if request.timeout is None else request.timeout - (time.monotonic() - begun)
        if timeout is not None and timeout <= 0:
            return
        try:
            study.optimize(counted, n_trials=None if request.n_trials is None else request.n_trials - len(started),
                           timeout=timeout, catch=(Exception,), callbacks=[bar.update])
            if request.n_trials is None:
                return
            if len(refused) >= MAX_REFUSED_POINTS:
                warnings.warn(f"model_constraints refused {len(refused)} of the points the sampler proposed; the "
                              "search stops here. Narrow model_space to the points a model can be built from.",
                              UserWarning, stacklevel=caller_stacklevel())
                return
        except (optuna.exceptions.UpdateFinishedTrialError, ValueError):  # the two ways Optuna refuses the result
            taken = [t for t in study.get_trials(deepcopy=False) if t.number == started[-1]] if started else []
            if not taken or taken[0].state != optuna.trial.TrialState.FAIL:
                raise
            bar.update(study, taken[0])  # it ran in this call (Optuna skipped the callbacks)
            warnings.warn(f"Trial {started[-1]} was marked failed by another process while this one still ran it (its "
                          "heartbeat stalled past the grace period); the study retries its parameters. Going on.",
                          UserWarning, stacklevel=caller_stacklevel())


def _first_model_record(request: SearchRequest):
    """() -> the record of the study's model. Without a model space: the model the first trial trains (built once;
    that trial then takes this instance). With one: the family, from the model built at the reference point (the
    first point the constraints accept), which no trial takes."""
    made = {}

    def record() -> dict:
        if "record" in made:
            return made["record"]
        if request.model_space:
            point = reference_point(request.model_space, request.model_constraints)
            reference = request.build_model(point)
            made["record"] = family_record(request.new_model, point, reference, request.config_for(point))
            del reference
        else:
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
                     if checkpoints_folder(path).is_dir() and path.name[len("trial-"):] not in {str(n) for n in known})
    if foreign:
        raise ValueError(f"{folder} holds checkpoints of trials that study {study.study_name!r} does not have "
                         f"({', '.join(foreign[:3])}{' ...' if len(foreign) > 3 else ''}): they are from an earlier "
                         f"search of the same name. Pass another study_name (or none, in memory), or move {folder} "
                         "away.")


def _objective(fine_tune, request: SearchRequest, study, trial):
    params = {name: suggest(trial, name, kind, args) for name, (setting, kind, args) in request.space.items()}
    model_params = {name: suggest(trial, name, kind, args) for name, (kind, args) in request.model_space.items()}
    if not accepted(request.model_constraints, model_params):
        trial.set_user_attr("reason", f"model_constraints refuse {model_params}: not trained, not counted")
        raise RefusedPoint(f"model_constraints refuse {model_params}")
    first_try = first_try_of(study, trial)
    # Per study, so a second study never meets the first's checkpoints; a retried trial continues in the folder
    # of the trial it retries, from that trial's last checkpoint.
    folder = request.output_dir / study.study_name / f"trial-{trial.number if first_try is None else first_try}"
    settings, _ = settings_from_call(dict(
        request.fixed, **{request.space[name][0]: value for name, value in params.items()}, output_dir=str(folder),
        resume_from_checkpoint=first_try is not None and request.fixed_settings.checkpoints.writes_checkpoints,
        progress=request.progress == "all", wandb_group=study.study_name,
        wandb_run_name=f"{study.study_name}-trial-{trial.number}"))
    return _run_trial(fine_tune, (study, trial), request, settings, model_params)


def _pruner(request: SearchRequest):
    import optuna

    pruning = request.pruning
    if len(request.objectives) > 1:
        if pruning not in (True, False, None):
            warnings.warn("Optuna's pruners compare one value per step, so trials of a search with several "
                          "objectives are not pruned; the pruner passed is not used.", UserWarning,
                          stacklevel=caller_stacklevel())
        return optuna.pruners.NopPruner()
    if pruning is True:
        # Two finished trials are enough to call a trial hopeless on tiny searches (Optuna's default is 5).
        return optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=0)
    if pruning in (False, None):
        return optuna.pruners.NopPruner()
    return pruning  # an Optuna pruner instance


def _check_trial_model(request: SearchRequest, study, trial, model, record: dict, model_params: dict) -> None:
    """Refuse, at this trial, a model other than the study's (no model space) or other than its parameters describe:
    a config field that contradicts them, another class than the family's, or other shapes than the same parameters
    gave before."""
    recorded = request.recorded_model
    if not request.model_space:
        if record != recorded:
            raise ValueError(f"model_factory returned another model at trial {trial.number} than the study's "
                             f"({model_differences(recorded, record)}); a study compares one model. Make the factory "
                             "build the same model on every call, or search the model's parameters with model_space.")
        return
    if record["class"] != recorded["reference"]["class"]:
        raise ValueError(f"model_factory returned a {record['class']} for {model_params}, but the study's family is "
                         f"{recorded['reference']['class']}: one study searches one model family.")
    model_config = getattr(unwrap(model), "config", None)
    contradicted = [f"model.config.{name} is {getattr(model_config, name)!r}, the trial's parameter {value!r}"
                    for name, value in model_params.items()
                    if hasattr(model_config, name) and getattr(model_config, name) != value]
    if contradicted:
        raise ValueError(f"model_factory did not build the model its parameters describe: {'; '.join(contradicted)}. "
                         "Build the model from the params dict the factory is given.")
    fingerprint = shapes_fingerprint(record)
    same = [(recorded["reference"]["n_parameters"], shapes_fingerprint(recorded["reference"]), "the reference model")
            ] if model_params == recorded["reference_params"] else []
    same += [(t.user_attrs["n_parameters"], t.user_attrs["model_fingerprint"], f"trial {t.number}")
             for t in study.get_trials(deepcopy=False)
             if t.number != trial.number and "model_fingerprint" in t.user_attrs
             and {name: t.params.get(name) for name in model_params} == model_params]
    for n_parameters, other, where in same:
        if other != fingerprint:
            raise ValueError(f"model_factory built another model from the same parameters {model_params}: "
                             f"{record['n_parameters']:,} parameters (shapes {fingerprint}) at trial {trial.number}, "
                             f"{n_parameters:,} (shapes {other}) for {where}. The model must depend on its parameters "
                             "only (not on a counter, a global or the time).")


def _run_trial(fine_tune, study_trial, request: SearchRequest, settings: FineTuneSettings, model_params: dict):
    study, trial = study_trial

    def report(step, val_loss, final):
        trial.report(val_loss, step)
        if not final and trial.should_prune():  # a finished trial keeps its value
            return f"pruned by Optuna at optimizer step {step} (val loss excl. padding {val_loss:.4f})"
        return None

    model = None
    train, val = request.prepared
    trial_config = request.config_for(model_params)
    try:
        model = request.build_model(model_params)
        record = model_record(model, trial_config)
        _check_trial_model(request, study, trial, model, record, model_params)
        for key, value in (("model_class", record["class"]), ("n_parameters", record["n_parameters"]),
                           ("model_fingerprint", shapes_fingerprint(record))):
            trial.set_user_attr(key, value)
        hooks = RunHooks(on_evaluation=report if len(request.objectives) == 1 else None,
                         token_bytes=request.token_bytes)
        results = fine_tune(model, trial_config, train, val, settings, tokenizer=request.tokenizer,
                            device=request.device, hooks=hooks)
    except Exception as error:
        reason = f"{type(error).__name__}: {error}"
        if isinstance(error, torch.OutOfMemoryError):
            reason = f"out of GPU memory with batch_size={settings.data.batch_size}"
        trial.set_user_attr("reason", reason[:500])
        raise
    finally:
        del model  # trial k+1 must not inherit trial k's memory
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return _trial_value(trial, results, record["n_parameters"], request.objectives)


def _trial_value(trial, results: dict, n_parameters: int, objectives: tuple):
    """Record a trained trial's cost and outcome; its objective value(s), or raise how it ended (pruned, Ctrl-C)."""
    import optuna

    if results["resumed_from_step"] is not None:
        trial.set_user_attr("resumed_from_step", results["resumed_from_step"])
    for key, value in cost_of(results, n_parameters).items():
        trial.set_user_attr(key, value)
    outcome = results["outcome"]
    if outcome.kind is OutcomeKind.INTERRUPTED:
        raise KeyboardInterrupt
    if outcome.kind is OutcomeKind.PRUNED:
        trial.set_user_attr("reason", outcome.reason)
        raise optuna.TrialPruned(outcome.reason)
    loss = results["final_val_loss"]
    values = objective_values(results, n_parameters, objectives)
    failed = math.nan if len(values) == 1 else tuple(math.nan for _ in values)  # Optuna records a failed trial
    if outcome.kind is OutcomeKind.NON_FINITE or loss is None or not math.isfinite(loss):
        trial.set_user_attr("reason", f"non-finite loss: {results['stop_reason']}")
        return failed
    if any(value is None for value in values):
        trial.set_user_attr("reason", f"objective {objectives} not measured: {values}")
        return failed
    trial.set_user_attr("val_perplexity", results["val_perplexity"])
    return values[0] if len(values) == 1 else tuple(values)


def _first_value(trial):
    """A trial's (first) objective value, or None (multi-objective trials have no ``value``)."""
    values = trial.values
    return values[0] if values else None


class _TrialBar:
    """The progress bar, and the count of trials this call ran (other processes add theirs to the study)."""

    def __init__(self, total: int, enabled: bool):
        self.bar, self.finished = None, 0
        if enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc="search", unit="trial", dynamic_ncols=True)

    def update(self, study, trial) -> None:
        self.finished += 1
        if self.bar is None or "not counted" in str(trial.user_attrs.get("reason")):
            return
        self.bar.update(1)
        values = [_first_value(t) for t in study.trials]
        completed = [v for v in values if v is not None and math.isfinite(v)]
        if completed:
            self.bar.set_postfix(best=f"{min(completed):.4f}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _results(study, trials_run: int, request: SearchRequest) -> dict:
    import optuna

    frame = trials_frame(study, request.objectives)
    completed = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    best = min(completed, key=_first_value) if completed else None
    if best is None:
        warnings.warn("No trial of the search completed; see the 'reason' column of results['trials'].", UserWarning,
                      stacklevel=caller_stacklevel())
    best_loss = None if best is None else best.user_attrs.get("val_loss", _first_value(best))
    best_model_params = None if best is None else {name: best.params[name] for name in request.model_space}
    columns = pareto_columns(request.objectives)
    pareto = pareto_front(frame, columns)
    return {
        "best_params": None if best is None else {k: v for k, v in best.params.items() if k not in request.model_space},
        "best_model_params": best_model_params,
        "best_config": None if best is None else request.config_for(best_model_params),
        "best_value": _first_value(best) if best else None,
        "best_val_perplexity": safe_exp(best_loss) if best else None,
        "best_trial_number": best.number if best else None,
        "objectives": request.objectives, "pareto": pareto, "pareto_objectives": columns,
        "trials": frame, "trials_df": frame, "study": study, "study_name": study.study_name,
        "n_trials": trials_run, "n_trials_in_study": len(study.trials),
        "n_completed_in_study": len(completed),
        "all_trials": [{"number": t.number, "value": _first_value(t), "params": dict(t.params)} for t in study.trials],
        "plot_paths": _plots(study, len(completed), request.output_dir, (frame, pareto, columns, OBJECTIVES)),
    }


def _plots(study, n_completed: int, output_dir: Path, front: tuple) -> dict[str, str]:
    """The search's figures (``plots.search_figures``): trial values and best so far, each parameter against the
    objective, importances once enough trials completed, and the Pareto front of the costs against the loss."""
    if n_completed == 0:
        return {}
    from ..metrics import save_search_plots

    try:
        return save_search_plots(study, output_dir, front)
    except Exception as error:  # noqa: BLE001 - a plot must never lose the search's results
        warnings.warn(f"Could not draw the search's plots ({type(error).__name__}: {error}).", UserWarning,
                      stacklevel=caller_stacklevel())
        return {}

"""The Optuna side of the search: storages, opening a study safely, its recorded set-up, sampler seeds, retries.

Storages as Optuna recommends them (measured in tests/test_search.py): SQLite (``*.db`` or ``sqlite:///``) for one
process at a time; a journal file (``*.log``) for several processes on one machine or a shared disk; a database
server URL (PostgreSQL, MySQL) for several machines. Database storages get a heartbeat, so a trial of a killed
process is failed and retried; the journal backend has none (such a trial stays RUNNING).
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import socket
import time
import uuid
import warnings
from pathlib import Path

from ..loss import unwrap
from ..settings import FineTuneSettings
from ..warn import caller_stacklevel

SETUP_ATTR = "tier3_setup"
DEFAULT_SHARED_STUDY = "tier3-search"
CREATION_TRIES = 8
# Settings that do not change a trial's value: where it writes, what it logs or shows, how often it checkpoints,
# which weights the model holds at the end (declared in the settings groups). Every other resolved setting is part of a
# study's set-up.
NOT_IN_SETUP = set(FineTuneSettings.names_where(setup=False))


# ----------------------------------------------------------------------------------------------
# Storages
# ----------------------------------------------------------------------------------------------
def is_shared(storage) -> bool:
    """Whether other processes (or a later call) can hold trials of the same study."""
    import optuna

    return storage is not None and not isinstance(storage, optuna.storages.InMemoryStorage)


def open_storage(storage, heartbeat_interval: int):
    """None: in memory. ``*.db`` or a URL: RDB with a heartbeat, whose stale trials are retried. ``*.log``: a
    journal file."""
    import optuna

    if storage is None:
        return optuna.storages.InMemoryStorage()
    if isinstance(storage, optuna.storages.BaseStorage):
        return storage
    location = str(storage)
    if location.endswith(".log"):
        from optuna.storages.journal import JournalFileBackend

        Path(location).parent.mkdir(parents=True, exist_ok=True)
        return optuna.storages.JournalStorage(JournalFileBackend(location))
    if "://" not in location and location.endswith(".db"):
        location = f"sqlite:///{location}"
    if "://" in location:
        location = database_url(location)
        if location.startswith("sqlite:///"):
            Path(location[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
        # Optuna 4.9 renamed the callback (the old name warns); use whichever the installed version has.
        retry_class = (getattr(optuna.storages, "RetryHeartbeatStaleTrialCallback", None)
                       or optuna.storages.RetryFailedTrialCallback)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Optuna marks heartbeats "experimental" since 2.8
            retry = retry_class(max_retry=3)
            return optuna.storages.RDBStorage(location, heartbeat_interval=heartbeat_interval,
                                              grace_period=2 * heartbeat_interval, **{_stale_callback_keyword(): retry})
    raise ValueError(f"storage={storage!r} is neither a database URL (e.g. 'postgresql://user@host/db'), an SQLite "
                     "file ending in '.db' nor a journal file path ending in '.log'.")


# A bare postgresql:// takes SQLAlchemy's default driver, which 2.1 changed from psycopg2 to psycopg (3): the URL the
# README shows, with the driver it says to install, then failed with "Failed to import DB access module".
POSTGRES_DRIVERS = (("psycopg", "postgresql+psycopg://"), ("psycopg2", "postgresql+psycopg2://"))


def database_url(location: str) -> str:
    """``postgresql://`` (or ``postgres://``) with the PostgreSQL driver that is installed named in it, psycopg (3)
    first; any other URL as given."""
    import importlib.util

    scheme, rest = location.split("://", 1)
    if scheme not in ("postgresql", "postgres"):
        return location
    for module, prefix in POSTGRES_DRIVERS:
        if importlib.util.find_spec(module) is not None:
            return prefix + rest
    raise ValueError("A postgresql:// storage needs a PostgreSQL driver and none is installed: pip install "
                     "psycopg2-binary (or 'psycopg[binary]'); the URL then works as it is. A URL may also name its "
                     "driver: postgresql+psycopg2://user:password@host/db.")


def _stale_callback_keyword() -> str:
    import inspect

    import optuna

    parameters = inspect.signature(optuna.storages.RDBStorage.__init__).parameters
    # Optuna 5 renamed failed_trial_callback; use whichever the installed version has.
    return ("heartbeat_stale_trial_callback" if "heartbeat_stale_trial_callback" in parameters
            else "failed_trial_callback")


# ----------------------------------------------------------------------------------------------
# Opening a study
# ----------------------------------------------------------------------------------------------
def open_study(storage, heartbeat_interval: int, study_name: str | None, pruner, seed: int, setup: dict, *,
               directions: int = 1):
    """Create or join the study (``directions`` objectives, all minimised), refuse another set-up, then sample with
    a seed of this process's own."""
    import optuna

    shared = is_shared(storage)
    name = study_name or (DEFAULT_SHARED_STUDY if shared
                          else f"search-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}")
    opened = {}

    def create():
        opened["storage"] = open_storage(storage, heartbeat_interval)
        return optuna.create_study(storage=opened["storage"], study_name=name,
                                   directions=["minimize"] * directions, load_if_exists=True)

    study = _retry_concurrent_creation(create)
    join_setup(study, setup, storage)
    sampler = _sampler(sampler_seed(seed, len(study.get_trials(deepcopy=False)), shared), shared)
    return optuna.load_study(study_name=name, storage=opened["storage"], sampler=sampler, pruner=pruner)


def _retry_concurrent_creation(create):
    """Two processes creating one new SQLite study at once race on its tables ("table ... already exists",
    "UNIQUE constraint failed: alembic_version"); the one that lost finds them made when it tries again."""
    import optuna
    import sqlalchemy.exc

    jitter = random.Random()  # not the global generator: training seeds it identically in every process
    for attempt in range(CREATION_TRIES):
        try:
            return create()
        except (sqlalchemy.exc.SQLAlchemyError, optuna.exceptions.StorageInternalError):
            if attempt == CREATION_TRIES - 1:
                raise
            time.sleep(jitter.uniform(0.05, 0.25) * (attempt + 1))


def sampler_seed(random_seed: int, trials_at_join: int, shared: bool) -> int:
    """In memory: ``random_seed`` (the same call gives the same parameters). Shared: one seed per process and
    join, so a rerun or a parallel process samples new points instead of replaying the first one's."""
    if not shared:
        return random_seed
    token = f"{random_seed}/{trials_at_join}/{socket.gethostname()}/{os.getpid()}/{uuid.uuid4().hex}"
    return int.from_bytes(hashlib.sha256(token.encode()).digest()[:4], "little")


def _sampler(seed: int, shared: bool):
    import optuna

    if not shared:
        return optuna.samplers.TPESampler(seed=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # experimental in some Optuna versions
        # Running trials of other processes count as bad guesses, so parallel workers spread out.
        return optuna.samplers.TPESampler(seed=seed, constant_liar=True)


# ----------------------------------------------------------------------------------------------
# The study's set-up: what makes its trials' values comparable
# ----------------------------------------------------------------------------------------------
def setup_record(fixed_settings, space: dict, train, val) -> dict:
    """Everything but the searched parameters that decides a trial's value, as JSON."""
    searched = {setting for setting, _, _ in space.values()}
    record = {name: value for name, value in fixed_settings.as_dict().items() if name not in NOT_IN_SETUP | searched}
    synthetic = "synthetic (from config.vocab_size and random_seed)"
    record["train data"] = train.fingerprint() if train is not None else synthetic
    record["validation data"] = (val.fingerprint() if hasattr(val, "fingerprint")
                                 else ("split from " + synthetic if val is None else "given"))
    record["search_space"] = {name: [setting, kind, list(args)] for name, (setting, kind, args) in space.items()}
    return json.loads(json.dumps(record, default=repr))


def join_setup(study, setup: dict, storage) -> None:
    """Record the set-up in a new study; refuse to add trials to a study made under another one. The model is
    compared afterwards (:func:`join_model`): reading it builds a model."""
    recorded = study.user_attrs.get(SETUP_ATTR)
    if recorded is None:  # a new study, or one made by Optuna directly: this call's set-up becomes its own
        study.set_user_attr(SETUP_ATTR, setup)
        recorded = study.user_attrs[SETUP_ATTR]  # re-read: another process may have recorded its own first
    differences = [f"{key}: study {_short(recorded.get(key, '(not recorded)'))}, "
                   f"this call {_short(setup.get(key, '(none)'))}"
                   for key in sorted(set(recorded) | set(setup))
                   if key != "model" and recorded.get(key) != setup.get(key)]
    if differences:
        _refuse(study, storage, differences)


def join_model(study, model, storage) -> None:
    """Record the model (or, with a model space, the model family) in the study's set-up, or refuse another one
    before any trial, naming what differs.

    ``model``: () -> this call's :func:`model_record` or :func:`family_record`. A study with trials but no recorded
    model was recorded before the model was part of the set-up: it adopts this call's, with a warning (its trials
    cannot tell).
    """
    recorded = study.user_attrs[SETUP_ATTR]
    this = model()
    if "model" not in recorded:
        if study.get_trials(deepcopy=False):
            described = this.get("reference", this)
            warnings.warn(f"Study {study.study_name!r} in {_where(storage)} was recorded before its set-up included "
                          f"the model; this call's model ({described['class']}, {described['n_parameters']:,} "
                          "parameters) is recorded now, and its earlier trials are taken to have used the same. If "
                          "they did not, pass another study_name.", UserWarning, stacklevel=caller_stacklevel())
        study.set_user_attr(SETUP_ATTR, dict(recorded, model=this))
        recorded = study.user_attrs[SETUP_ATTR]  # re-read: another process may have recorded its model first
    if recorded["model"] != this:
        _refuse(study, storage, [family_differences(recorded["model"], this)])


def _refuse(study, storage, differences: list) -> None:
    raise ValueError(
        f"Study {study.study_name!r} in {_where(storage)} was run with another set-up, so its trials' values are not "
        f"comparable with this call's ({'; '.join(differences)}). Pass another study_name to start a new study, or "
        "call with the study's set-up to add trials to it.")


# Config fields that do not define the model (bookkeeping, outputs asked of the forward, the tokenizer object).
NOT_MODEL_FIELDS = {"transformers_version", "torch_dtype", "dtype", "architectures", "use_cache",
                    "output_hidden_states", "output_attentions", "return_dict", "tokenizer", "name_or_path",
                    "torchscript"}


def model_record(model, config) -> dict:
    """What the study's values depend on in the model: its class, every parameter's name and shape, and the
    config's fields (JSON values only: an object's repr would differ from run to run)."""
    model = unwrap(model)
    config = config if config is not None else getattr(model, "config", None)
    fields = config.to_dict() if callable(getattr(config, "to_dict", None)) else dict(getattr(config, "__dict__", {}))
    kinds = (int, float, str, bool, type(None))
    fields = {name: value for name, value in sorted(fields.items())
              if not name.startswith("_") and name not in NOT_MODEL_FIELDS
              and (isinstance(value, kinds)
                   or (isinstance(value, (list, tuple)) and all(isinstance(v, kinds) for v in value)))}
    parameters = [[name, list(parameter.shape)] for name, parameter in model.named_parameters()]
    # The class by name: a notebook's __main__.MyLM is the same model when later imported from a file.
    return json.loads(json.dumps({"class": type(model).__qualname__,
                                  "n_parameters": sum(p.numel() for p in model.parameters()),
                                  "parameters": parameters, "config": fields}))


def shapes_fingerprint(record: dict) -> str:
    """16 hex digits of sha256 over a model record's parameter names and shapes."""
    return hashlib.sha256(json.dumps(record["parameters"]).encode()).hexdigest()[:16]


def family_record(factory, reference_params: dict, model, config) -> dict:
    """A model family's record: the factory (by qualified name, as classes are), and the model it builds from the
    reference parameters with the config they fill (its class, shapes and fixed config fields)."""
    return json.loads(json.dumps({"factory": getattr(factory, "__qualname__", type(factory).__qualname__),
                                  "reference_params": reference_params,
                                  "reference": model_record(model, config)}))


def family_differences(recorded: dict, this: dict) -> str:
    """What differs between two recorded models or model families, in a few words each."""
    if "reference" not in recorded or "reference" not in this:
        if "reference" in recorded or "reference" in this:
            searched = "the study" if "reference" in recorded else "this call"
            return (f"model family: {searched} searches the model's parameters (model_space) and the other does not; "
                    "one study holds one kind of search")
        return model_differences(recorded, this)
    parts = []
    if recorded["factory"] != this["factory"]:
        parts.append(f"model_factory {recorded['factory']} vs {this['factory']}")
    if recorded["reference_params"] != this["reference_params"]:
        parts.append(f"reference point {recorded['reference_params']} vs {this['reference_params']}")
    if recorded["reference"] != this["reference"]:
        parts.append(model_differences(recorded["reference"], this["reference"]).replace(
            "model differs (study vs this call)", f"the model built from {this['reference_params']} differs"))
    return "model family differs (study vs this call): " + "; ".join(parts or ["another family"])


def model_differences(recorded: dict, this: dict) -> str:
    """What differs between two model records, in a few words each."""
    parts = []
    if recorded["class"] != this["class"]:
        parts.append(f"class {recorded['class']} vs {this['class']}")
    config_a, config_b = recorded["config"], this["config"]
    changed = [f"config.{name} {config_a.get(name, '(none)')!r} vs {config_b.get(name, '(none)')!r}"
               for name in sorted(set(config_a) | set(config_b)) if config_a.get(name) != config_b.get(name)]
    parts += changed[:4] + ([f"{len(changed) - 4} more config fields"] if len(changed) > 4 else [])
    if recorded["parameters"] != this["parameters"]:
        first = next(((a, b) for a, b in zip(recorded["parameters"], this["parameters"]) if a != b), None)
        where = "" if first is None else (f"; the first that differs: {first[0][0]} {first[0][1]} vs {first[1][1]}"
                                          if first[0][0] == first[1][0]
                                          else f"; the first that differs: {first[0]} vs {first[1]}")
        parts.append(f"parameters {len(recorded['parameters'])} tensors, {recorded['n_parameters']:,} values vs "
                     f"{len(this['parameters'])}, {this['n_parameters']:,}{where}")
    return "model differs (study vs this call): " + "; ".join(parts or ["another model"])


def _where(storage) -> str:
    import re

    return "memory" if storage is None else re.sub(r"://[^@/]*@", "://", str(storage))  # never print a password


def _short(value):
    text = json.dumps(value)
    return (value[:12] + "…" if isinstance(value, str) and len(value) == 64
            else (text if len(text) < 200 else text[:200] + "…"))


# ----------------------------------------------------------------------------------------------
# Trials
# ----------------------------------------------------------------------------------------------
def first_try_of(study, trial) -> int | None:
    """The number of the trial this one retries (the first of a chain of retries); None for a new trial."""
    import optuna

    retry_class = (getattr(optuna.storages, "RetryHeartbeatStaleTrialCallback", None)
                   or optuna.storages.RetryFailedTrialCallback)
    running = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
    frozen = next((t for t in running if t.number == trial.number), None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # retry_history is marked experimental
        history = retry_class.retry_history(frozen) if frozen is not None else []
    return history[0] if history else None

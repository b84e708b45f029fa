"""All keywords of ``test_fine_tuning`` in one object, made of small groups: the one place the keywords are
gathered, checked together and logged whole.

Each group is a dataclass declared in the subpackage (or top-level module) that uses it, every field with its
rules beside its default (:func:`setting_rules.setting`: check, resume rule, study set-up, searchable):
``run`` (here: how long the run goes, its seed, when it validates and stops), ``optimisation`` (optim.py),
``numerics`` (precision.py), ``data`` (data/), ``model`` (model/), ``distributed`` (distributed/),
``checkpoints`` (checkpoints/), ``logging`` (metrics/). A component is handed only its group
(``RunCheckpoints(settings.checkpoints, ...)``); the engine and the Trainer hold the whole and read through the
groups (``settings.data.batch_size``). ``validate()``, the resume comparison (checkpoints/resume.py), the per-process
rule (sharded_checkpoint.py), the searchable set and a study's set-up (search/) are derived from the declarations.

One keyword per concept: the previous module's aliases (``use_amp``, ``mixed_precision``, ``use_lr_schedule``,
``gradient_clip_norm``) are resolved into ``precision``, ``lr_schedule``/``warmup_steps`` and ``max_grad_norm``
by :mod:`utils.training.previous_interface` before settings are built.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

from .checkpoints import CheckpointSettings
from .data import DataSettings
from .distributed import DistributedSettings
from .metrics import LoggingSettings
from .model import ModelSettings
from .optim import OptimisationSettings
from .precision import NumericsSettings
from .setting_rules import FREE, MATCH, POSITIVE, POSITIVE_OR_NONE, RAISE, Rules, SettingsGroup, check_int, setting

MAX_SEED = 2**32 - 1


def _check_seed(name, value):
    check_int(name, value, minimum=0)
    if value > MAX_SEED:
        raise ValueError(f"{name} must be <= 2**32 - 1 (numpy's limit), got {value}.")


@dataclass
class RunSettings(SettingsGroup):
    """The run group: how long the run goes, its seed, when it validates and when it stops early."""

    # n_epochs / max_steps may be raised: the schedule is rebuilt for the new total (not below what was trained).
    n_epochs: int = setting(3, check=POSITIVE, resume=RAISE, setup=True, search=True)
    random_seed: int = setting(42, check=_check_seed, resume=MATCH, setup=True, search=True)
    # Also validate every N optimizer steps inside an epoch. Free on resume: when the run looks, not what it trains
    # (a validation pass draws no random number and moves no training state).
    eval_every: int | None = setting(None, check=POSITIVE_OR_NONE, resume=FREE, setup=True, search=True)
    # Free on resume: it decides where the run ends, not what a step computes (a lower one stops at the next
    # validation; the epochs without improvement are in the checkpoint).
    early_stopping_patience: int | None = setting(None, check=POSITIVE_OR_NONE, resume=FREE, setup=True, search=True)
    # Stop after this many optimizer steps (HF's name); the schedule spans them. Needed for streamed data.
    max_steps: int | None = setting(None, check=POSITIVE_OR_NONE, resume=RAISE, setup=True, search=True)


# The keywords in their flat order: the previous module's positional order (test_fine_tuning keeps it), then the
# newer ones. results["settings"], the W&B config and a checkpoint's metadata list them in this order
# (tests/test_settings_rules.py checks that it names every group's every field once).
KEYWORD_ORDER = (
    "n_epochs", "learning_rate", "weight_decay", "batch_size", "use_wandb", "gradient_accumulation_steps",
    "max_grad_norm", "random_seed", "deterministic", "log_grad_dist_every", "log_grad_histogram",
    "lr_schedule", "warmup_ratio", "warmup_steps", "shuffle", "group_by_length", "max_tokens_per_batch",
    "pad_to_multiple_of", "precision", "compile", "loss_path", "fsdp", "process_timeout_minutes", "val_fraction",
    "eval_every", "output_dir", "checkpoint_every", "keep_checkpoints", "checkpoint_every_minutes",
    "checkpoint_staging_dir", "async_checkpoints", "resume_from_checkpoint", "early_stopping_patience",
    "load_best_model_at_end", "wandb_project", "wandb_run_name", "wandb_group", "wandb_mode", "progress",
    "log_every", "save_plots", "max_steps", "stream_buffer_size", "bad_examples", "skip_model_checks")


@dataclass(init=False)
class FineTuneSettings:
    """Built from the flat keywords (``FineTuneSettings(batch_size=8)``, :meth:`from_keywords`); read by group."""

    run: RunSettings = field(default_factory=RunSettings)
    optimisation: OptimisationSettings = field(default_factory=OptimisationSettings)
    data: DataSettings = field(default_factory=DataSettings)
    numerics: NumericsSettings = field(default_factory=NumericsSettings)
    model: ModelSettings = field(default_factory=ModelSettings)
    distributed: DistributedSettings = field(default_factory=DistributedSettings)
    checkpoints: CheckpointSettings = field(default_factory=CheckpointSettings)
    logging: LoggingSettings = field(default_factory=LoggingSettings)

    def __init__(self, **keywords):
        unknown = set(keywords) - self.keyword_names()
        if unknown:
            raise TypeError(f"FineTuneSettings got unknown keyword(s) {sorted(unknown)}.")
        for name, group in self.group_types().items():
            own = {key: value for key, value in keywords.items() if key in group.rules()}
            setattr(self, name, group(**own))

    @classmethod
    def group_types(cls) -> dict[str, type[SettingsGroup]]:
        """Each group's name (the attribute) and its dataclass."""
        return {f.name: f.default_factory for f in fields(cls)}

    @classmethod
    def group_of(cls, name: str) -> str:
        """The group a keyword belongs to."""
        return next(group for group, kind in cls.group_types().items() if name in kind.rules())

    @classmethod
    def default(cls, name: str):
        kind = cls.group_types()[cls.group_of(name)]
        return next(f.default for f in fields(kind) if f.name == name)

    @classmethod
    def keyword_names(cls) -> set[str]:
        return set(cls.rules())

    @classmethod
    def from_keywords(cls, keywords: dict, known_extra=()) -> "FineTuneSettings":
        """Checked settings from keywords; an unknown keyword raises ``TypeError`` listing the known ones."""
        unknown = set(keywords) - cls.keyword_names()
        if unknown:
            raise TypeError(f"test_fine_tuning() got unknown keyword(s) {sorted(unknown)}; "
                            f"known: {sorted(cls.keyword_names() | set(known_extra))}.")
        settings = cls(**keywords)
        settings.validate()
        return settings

    def as_dict(self) -> dict:
        """Every keyword and its value, flat, in :data:`KEYWORD_ORDER`."""
        values = {}
        for name in self.group_types():
            values.update(asdict(getattr(self, name)))
        return {name: values[name] for name in KEYWORD_ORDER}

    @classmethod
    def rules(cls) -> dict[str, Rules]:
        """Every setting's declared rules, flat, in :data:`KEYWORD_ORDER`."""
        declared = {}
        for kind in cls.group_types().values():
            declared.update(kind.rules())
        return {name: declared[name] for name in KEYWORD_ORDER}

    @classmethod
    def names_where(cls, **wanted) -> tuple[str, ...]:
        """The settings whose declared rules have these values, e.g. ``names_where(search=False)``."""
        return tuple(name for name, rules in cls.rules().items()
                     if all(getattr(rules, key) == value for key, value in wanted.items()))

    def validate(self) -> None:
        """Raise on a setting that cannot work, naming it and the fix, before any work is done: each setting's
        declared check (in keyword order), then the checks inside each group, then the checks between groups."""
        values = self.as_dict()
        for name, rules in self.rules().items():
            rules.check(name, values[name])
        if self.distributed.fsdp and self.numerics.compile:
            raise ValueError("compile=True with fsdp=True is not supported (untested together): pass one of them.")
        for name in self.group_types():
            getattr(self, name).check_together()

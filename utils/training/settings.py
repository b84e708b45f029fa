"""All keywords of ``test_fine_tuning`` in one object: the one place for defaults and checks, logged whole.

Every setting declares next to its default (:func:`setting`): its check, its resume rule (``MATCH``: a resume
with another value is refused; ``RAISE``: may be raised, not below what was trained; ``PER_PROCESS``: must match,
or keep its product with the number of processes when that changes; ``FREE``: may change), whether it belongs to
a study's set-up (it changes a trial's value) and whether it can be searched, and the group it belongs to.
``validate()``, the resume comparison (checkpoints/resume.py), the per-process rule (sharded_checkpoint.py), the
searchable set and a study's set-up (search/) are derived from these declarations; a field without them fails
tests/test_settings.py.

One keyword per concept: the previous module's aliases (``use_amp``, ``mixed_precision``, ``use_lr_schedule``,
``gradient_clip_norm``) are resolved into ``precision``, ``lr_schedule``/``warmup_steps`` and ``max_grad_norm``
by :mod:`utils.training.previous_interface` before settings are built.
"""
from __future__ import annotations

import hashlib
import math
import os
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from functools import partial
from pathlib import Path

LR_SCHEDULES = ("cosine", "constant", "linear")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
GROUPINGS = ("auto", "tokens", "lines", True, False)
BAD_EXAMPLES = ("error", "skip", "truncate")  # what a stream's row that fails its checks does (data/subsets.py)
LOSS_PATHS = ("auto", "linear", "chunked")  # utils/training/loss/loss_path.py
MODEL_CHECKS = ("examples", "causal", "padding")  # the start-up probes of the model's behaviour (model/probes.py)
MAX_SEED = 2**32 - 1
FLOAT32_MAX = 3.4028234663852886e38
GOOGLE_DRIVE_MOUNT = Path("/content/drive")  # where Colab mounts Google Drive (drive.mount)



# Resume rules (what a resume may do with a setting; checkpoints/resume.py applies them).
MATCH, RAISE, PER_PROCESS, FREE = "must match", "may be raised", "per process", "free to change"
RESUME_RULES = (MATCH, RAISE, PER_PROCESS, FREE)
# Where a MATCH rule applies only while the setting is used: "stream" (training or validation data is a stream),
# "held_out" (validation is held out of train_data by val_fraction). Elsewhere the setting is unused: free.
RESUME_CONDITIONS = (None, "stream", "held_out")
GROUPS = ("run", "optimisation", "data", "numerics", "model", "distributed", "checkpoints", "logging")
_RULES = "tier3_rules"


@dataclass(frozen=True)
class Rules:
    """One setting's declared rules."""

    check: Callable[[str, object], None]  # (name, value) -> None; raises naming the setting and the fix
    resume: str  # one of RESUME_RULES
    setup: bool  # part of a study's recorded set-up (it changes what a trial measures)
    search: bool  # may be named in a search space
    group: str  # one of GROUPS
    when: str | None = None  # one of RESUME_CONDITIONS


def setting(default, *, check, resume: str, setup: bool, search: bool, group: str, when: str | None = None):
    """A settings field with its rules declared next to its default."""
    return field(default=default, metadata={_RULES: Rules(check, resume, setup, search, group, when)})


def _whole(minimum: int, optional: bool = False):
    return partial(_check_int, minimum=minimum, optional=optional)


def _number(low: float, **bounds):
    return partial(_check_float, low=low, **bounds)


def _one_of(choices):
    return partial(_check_choice, choices=choices)


def _check_seed(name, value):
    _check_int(name, value, minimum=0)
    if value > MAX_SEED:
        raise ValueError(f"{name} must be <= 2**32 - 1 (numpy's limit), got {value}.")


def _check_learning_rate(name, value):
    _check_float(name, value, low=0.0, hint=" Typical fine-tuning values are 1e-5 to 5e-4.")
    if value > FLOAT32_MAX:
        raise ValueError(f"{name} must be finite in float32 (<= {FLOAT32_MAX:.3g}), got {value:g}: the first update "
                         "would make every weight inf. Typical fine-tuning values are 1e-5 to 5e-4.")


def _check_padding_multiple(name, value):
    if value not in (None, "auto"):
        _check_int(name, value, minimum=1)


def _check_progress(name, value):
    if value not in (True, False, "all"):
        raise ValueError(f"{name} must be True, False or 'all', got {value!r}.")


def _check_resume_target(name, value):
    if not isinstance(value, (bool, str, os.PathLike)):
        raise TypeError(f"{name} must be True/False or a checkpoint folder path, got {type(value).__name__}.")


def _check_output_dir(name, value):
    if Path(value).exists() and not Path(value).is_dir():
        raise ValueError(f"{name}={value!r} is a file, not a folder. Pass a folder path (it is created if missing).")


def _check_staging_dir(name, value):
    if value is not None and value != "auto" and not isinstance(value, (str, os.PathLike)):
        raise TypeError(f"{name} must be a folder path, 'auto' or None, got {type(value).__name__}.")


def _check_skip_model_checks(name, value):
    names = (value,) if isinstance(value, str) else value
    if isinstance(names, bool):
        return
    if not isinstance(names, (tuple, list, set, frozenset)) or any(probe not in MODEL_CHECKS for probe in names):
        raise ValueError(f"{name}={value!r}: pass a tuple of probe names from {MODEL_CHECKS} (e.g. "
                         f"{name}=('causal',) for a prefix LM), True to skip all of them, or () to run them all.")


def _check_optional_text(name, value):
    if value is not None and not isinstance(value, str):
        raise TypeError(f"{name} must be a string or None, got {type(value).__name__} ({value!r}).")


def _check_int(name, value, *, minimum, optional=False):
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int{' or None' if optional else ''}, "
                        f"got {type(value).__name__} ({value!r}).")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}{' or None' if optional else ''}, got {value}.")


def _check_float(name, value, *, low, high=None, low_open=False, optional=False, hint=""):
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__} ({value!r}).{hint}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}.{hint}")
    too_low = value <= low if low_open else value < low
    if too_low or (high is not None and value >= high):
        bounds = f"{'(' if low_open else '['}{low}, {high if high is not None else 'inf'})"
        raise ValueError(f"{name} must be in {bounds}, got {value}.{hint}")


def _check_bool(name, value):
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {type(value).__name__} ({value!r}).")


def _check_choice(name, value, choices):
    if not any(value is choice or (type(value) is type(choice) and value == choice) for choice in choices):
        raise ValueError(f"Unknown {name} {value!r}; choose one of {', '.join(map(repr, choices))}.")


_POSITIVE, _POSITIVE_OR_NONE = _whole(1), _whole(1, optional=True)

@dataclass
class FineTuneSettings:
    # The previous module's keywords, in its positional order (test_fine_tuning keeps that order).
    # n_epochs / max_steps may be raised: the schedule is rebuilt for the new total (not below what was trained).
    n_epochs: int = setting(3, check=_POSITIVE, resume=RAISE, setup=True, search=True, group="run")
    learning_rate: float = setting(5e-5, check=_check_learning_rate, resume=MATCH, setup=True, search=True,
                                   group="optimisation")
    weight_decay: float = setting(0.01, check=_number(0.0), resume=MATCH, setup=True, search=True,
                                  group="optimisation")
    # Per process: resumed on another number of processes, batch_size x processes must stay (sharded_checkpoint.py).
    batch_size: int = setting(4, check=_POSITIVE, resume=PER_PROCESS, setup=True, search=True, group="data")
    use_wandb: bool = setting(False, check=_check_bool, resume=FREE, setup=False, search=True, group="logging")
    gradient_accumulation_steps: int = setting(1, check=_POSITIVE, resume=MATCH, setup=True, search=True,
                                               group="optimisation")
    # The previous gradient_clip_norm; None disables clipping.
    max_grad_norm: float | None = setting(1.0, check=_number(0.0, low_open=True, optional=True,
                                                             hint=" Use None to turn clipping off."),
                                          resume=MATCH, setup=True, search=True, group="optimisation")
    random_seed: int = setting(42, check=_check_seed, resume=MATCH, setup=True, search=True, group="run")
    # Deterministic algorithms for the duration of the call. Free on resume: it picks kernels for the same
    # arithmetic (on CUDA; nothing changes on CPU), as a resume on another GPU does.
    deterministic: bool = setting(False, check=_check_bool, resume=FREE, setup=True, search=True, group="numerics")
    # With W&B: per-layer gradient norms every N optimizer steps, and gradient histograms at the same steps.
    log_grad_dist_every: int = setting(5, check=_POSITIVE, resume=FREE, setup=False, search=True, group="logging")
    log_grad_histogram: bool = setting(False, check=_check_bool, resume=FREE, setup=False, search=True,
                                       group="logging")
    # Newer keywords.
    lr_schedule: str = setting("cosine", check=_one_of(LR_SCHEDULES), resume=MATCH, setup=True, search=True,
                               group="optimisation")
    warmup_ratio: float = setting(0.1, check=_number(0.0, high=1.0), resume=MATCH, setup=True, search=True,
                                  group="optimisation")
    # Overrides warmup_ratio when set.
    warmup_steps: int | None = setting(None, check=_whole(0, optional=True), resume=MATCH, setup=True, search=True,
                                       group="optimisation")
    shuffle: bool = setting(True, check=_check_bool, resume=MATCH, setup=True, search=True, group="data")
    # "auto": token-budget steps inside length groups when shuffling, the given order when not (CLAUDE.md).
    group_by_length: bool | str = setting("auto", check=_one_of(GROUPINGS), resume=MATCH, setup=True, search=True,
                                          group="data")
    # Padded tokens per micro-batch; None: batch_size x mean length. Per process, as batch_size.
    max_tokens_per_batch: int | None = setting(None, check=_POSITIVE_OR_NONE, resume=PER_PROCESS, setup=True,
                                               search=True, group="data")
    # "auto": 64 on CUDA (bounded shapes), exact lengths on CPU. Free on resume: plans are made on real lengths and
    # padding is masked, so only the shapes change (a GPU checkpoint resumed on a CPU keeps its plan).
    pad_to_multiple_of: int | str | None = setting("auto", check=_check_padding_multiple, resume=FREE, setup=True,
                                                   search=True, group="data")
    # "auto": bf16 autocast on GPUs that support it, fp16 + GradScaler on those that do not (T4, V100), fp32 on CPU.
    precision: str = setting("auto", check=_one_of(PRECISIONS), resume=MATCH, setup=True, search=True,
                             group="numerics")
    # torch.compile the model once. Must match on resume: compiled code draws dropout's random numbers by its own
    # generator, so a toggled resume would not continue the run it resumes.
    compile: bool = setting(False, check=_check_bool, resume=MATCH, setup=True, search=True, group="numerics")
    # "auto": hidden states x head weight (no full logits) where that is the model's own loss and saves memory
    # (CLAUDE.md); "linear": wherever it is the model's own loss; "chunked": always the model's own forward.
    # Must match on resume: the paths compute the loss and its gradient with other operations.
    loss_path: str = setting("auto", check=_one_of(LOSS_PATHS), resume=MATCH, setup=True, search=True,
                             group="numerics")
    # Under torchrun: shard parameters, gradients and optimizer state across the processes (FSDP2) instead of DDP.
    # Free on resume: a sharded checkpoint loads into an unsharded model and back (DCP reshards); the world-size
    # rule (sharded_checkpoint.py) decides whether the steps stay the same.
    fsdp: bool = setting(False, check=_check_bool, resume=FREE, setup=True, search=True, group="distributed")
    # Under torchrun: a process that gives no sign of life (heartbeat) for this many minutes stops the run, named
    # with its rank and step, instead of the others waiting silently in a collective (torch's default: 30 min on
    # gloo). Also the process group's timeout when the package starts the group (utils/training/distributed/watch.py).
    # Free on resume: a watch's limit, not part of what is trained.
    process_timeout_minutes: float = setting(
        10.0, check=_number(0.0, low_open=True, hint=" Pass minutes as a number, e.g. process_timeout_minutes=10 "
                            "(or 0.5 for 30 seconds)."),
        resume=FREE, setup=False, search=True, group="distributed")
    # Held out of train_data when val_data is None: another fraction is other training data (must match then).
    val_fraction: float = setting(0.2, check=_number(0.0, high=1.0, low_open=True), resume=MATCH, setup=True,
                                  search=True, group="data", when="held_out")
    # Also validate every N optimizer steps inside an epoch. Free on resume: when the run looks, not what it trains
    # (a validation pass draws no random number and moves no training state).
    eval_every: int | None = setting(None, check=_POSITIVE_OR_NONE, resume=FREE, setup=True, search=True,
                                     group="run")
    output_dir: str | None = setting(None, check=_check_output_dir, resume=FREE, setup=False, search=False,
                                     group="checkpoints")
    checkpoint_every: int | None = setting(None, check=_POSITIVE_OR_NONE, resume=FREE, setup=False, search=True,
                                           group="checkpoints")
    keep_checkpoints: int = setting(2, check=_POSITIVE, resume=FREE, setup=False, search=True, group="checkpoints")
    # Also a checkpoint when this many minutes of wall time passed since the last one (a float; with or without
    # checkpoint_every): a Colab VM can disconnect at any time.
    checkpoint_every_minutes: float | None = setting(
        None, check=_number(0.0, low_open=True, optional=True, hint=" Pass minutes as a number, e.g. "
                            "checkpoint_every_minutes=30 (or 0.5 for 30 seconds)."),
        resume=FREE, setup=False, search=True, group="checkpoints")
    # Checkpoints are written here first and copied into output_dir in the background. "auto": a local temporary
    # folder when output_dir is on Google Drive (/content/drive), else None (written into output_dir directly).
    checkpoint_staging_dir: str | None = setting("auto", check=_check_staging_dir, resume=FREE, setup=False,
                                                 search=True, group="checkpoints")
    # False: training waits for each checkpoint write (as before).
    async_checkpoints: bool = setting(True, check=_check_bool, resume=FREE, setup=False, search=True,
                                      group="checkpoints")
    resume_from_checkpoint: bool | str = setting(False, check=_check_resume_target, resume=FREE, setup=False,
                                                 search=False, group="checkpoints")
    # Free on resume: it decides where the run ends, not what a step computes (a lower one stops at the next
    # validation; the epochs without improvement are in the checkpoint).
    early_stopping_patience: int | None = setting(None, check=_POSITIVE_OR_NONE, resume=FREE, setup=True,
                                                  search=True, group="run")
    load_best_model_at_end: bool = setting(False, check=_check_bool, resume=FREE, setup=False, search=True,
                                           group="checkpoints")
    wandb_project: str | None = setting(None, check=_check_optional_text, resume=FREE, setup=False, search=True,
                                        group="logging")
    wandb_run_name: str | None = setting(None, check=_check_optional_text, resume=FREE, setup=False, search=False,
                                         group="logging")
    wandb_group: str | None = setting(None, check=_check_optional_text, resume=FREE, setup=False, search=False,
                                      group="logging")
    wandb_mode: str | None = setting(None, check=_check_optional_text, resume=FREE, setup=False, search=True,
                                     group="logging")
    progress: bool = setting(True, check=_check_progress, resume=FREE, setup=False, search=False, group="logging")
    # Optimizer steps between host reads of the step rows (progress bar, W&B, the stop flag).
    log_every: int = setting(10, check=_POSITIVE, resume=FREE, setup=False, search=True, group="logging")
    save_plots: bool = setting(True, check=_check_bool, resume=FREE, setup=False, search=True, group="logging")
    # Stop after this many optimizer steps (HF's name); the schedule spans them. Needed for streamed data.
    max_steps: int | None = setting(None, check=_POSITIVE_OR_NONE, resume=RAISE, setup=True, search=True, group="run")
    # Streamed data: examples shuffled and grouped by length together in a buffer of this many. Must match on a
    # stream's resume: another buffer makes other steps of the same rows.
    stream_buffer_size: int = setting(4096, check=_POSITIVE, resume=MATCH, setup=True, search=True, group="data",
                                      when="stream")
    # Streamed data, checked as it is read: a too-long row or one with ids outside the vocabulary stops the run
    # ("error", naming the row), is gone past ("skip") or cut to the model's positions ("truncate"); counted in
    # results["bad_examples"]. Must match on a stream's resume: another choice keeps other rows (or stops).
    bad_examples: str = setting("error", check=_one_of(BAD_EXAMPLES), resume=MATCH, setup=True, search=True,
                                group="data", when="stream")
    # Start-up probes of the model's behaviour to leave out, by name ("examples", "causal", "padding"), or True for
    # all: for a model meant to differ (a prefix LM sees ahead). Every other model is probed (model/probes.py). Free
    # on resume: the probes run before any step and change nothing.
    skip_model_checks: tuple | bool = setting((), check=_check_skip_model_checks, resume=FREE, setup=False,
                                              search=True, group="model")

    def __post_init__(self):
        self.output_dir = str(Path(self.output_dir or os.path.join(os.getcwd(), "outputs", "fine_tuning")))

    @classmethod
    def default(cls, name: str):
        return next(f.default for f in fields(cls) if f.name == name)

    @classmethod
    def keyword_names(cls) -> set[str]:
        return {f.name for f in fields(cls)}

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
        return asdict(self)

    @classmethod
    def rules(cls) -> dict[str, Rules]:
        """Every setting's declared rules, in declaration order."""
        return {f.name: f.metadata[_RULES] for f in fields(cls)}

    @classmethod
    def names_where(cls, **wanted) -> tuple[str, ...]:
        """The settings whose declared rules have these values, e.g. ``names_where(search=False)``."""
        return tuple(name for name, rules in cls.rules().items()
                     if all(getattr(rules, key) == value for key, value in wanted.items()))

    def validate(self) -> None:
        """Raise on a setting that cannot work, naming it and the fix, before any work is done: each setting's
        declared check, then the checks between settings."""
        for name, rules in self.rules().items():
            rules.check(name, getattr(self, name))
        if self.fsdp and self.compile:
            raise ValueError("compile=True with fsdp=True is not supported (untested together): pass one of them.")
        self._check_staging_outside_output()
        if not isinstance(self.skip_model_checks, bool):  # one form from here on: a tuple of probe names
            names = self.skip_model_checks
            self.skip_model_checks = (names,) if isinstance(names, str) else tuple(names)

    # Not a keyword: set by previous_interface when use_amp/mixed_precision asked for the precision. Those keep
    # the previous module's meaning (autocast on CUDA only; float32 with a warning elsewhere), so an old caller's
    # CPU run does not turn into a slower half-precision one. precision= itself applies on CPU too.
    precision_from_previous_keyword = False

    def _check_staging_outside_output(self) -> None:
        value = self.checkpoint_staging_dir
        if value is None or value == "auto":
            return
        staging, output = Path(value).resolve(), Path(self.output_dir).resolve()
        if staging == output or output in staging.parents or staging in output.parents:
            raise ValueError(f"checkpoint_staging_dir={str(value)!r} overlaps output_dir={self.output_dir!r}: it is a "
                             "local folder that checkpoints are written to before they are copied into output_dir. "
                             "Pass a folder outside output_dir on a local disk (e.g. /tmp/staging), or None.")

    def checkpoint_staging_folder(self) -> Path | None:
        """This run's staging folder (one per output_dir, so two runs never share one), or None: no staging."""
        value = self.checkpoint_staging_dir
        if value == "auto":
            output = Path(self.output_dir).resolve()
            if output != GOOGLE_DRIVE_MOUNT and GOOGLE_DRIVE_MOUNT not in output.parents:
                return None
            value = Path(tempfile.gettempdir()) / "tier3-checkpoint-staging"
        if value is None:
            return None
        return Path(value) / hashlib.sha1(str(Path(self.output_dir).resolve()).encode()).hexdigest()[:12]

    @property
    def requested_precision(self) -> str | None:
        """An autocast dtype asked for explicitly (``precision="bf16"``/``"fp16"``, or a previous keyword)."""
        return self.precision if self.precision in ("bf16", "fp16") else None

    def autocast_dtype(self, device) -> str | None:
        """The autocast dtype this run uses on ``device``; None is float32 (decisions table in CLAUDE.md)."""
        if self.precision == "fp32":
            return None
        if self.requested_precision:
            runs_here = device.type == "cuda" or (device.type == "cpu" and not self.precision_from_previous_keyword)
            return self.requested_precision if runs_here else None
        if device.type != "cuda":
            return None  # "auto": float32 off CUDA (CPU half-precision kernels are slower than float32 on most CPUs)
        import torch

        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"

    @property
    def writes_checkpoints(self) -> bool:
        """Checkpoints only when asked for, or implied by wanting to resume or to get the best model back."""
        return bool(self.checkpoint_every or self.checkpoint_every_minutes or self.resume_from_checkpoint
                    or self.load_best_model_at_end)

    def warmup_steps_for(self, total_steps: int) -> int:
        """``warmup_steps``, else ``warmup_ratio`` of the run's steps."""
        return self.warmup_steps if self.warmup_steps is not None else int(math.ceil(total_steps * self.warmup_ratio))

    def padding_multiple(self, device) -> int | None:
        """On CUDA every new batch shape costs time the first time it runs; a multiple of 64 bounds the shapes."""
        if self.pad_to_multiple_of == "auto":
            return 64 if device.type == "cuda" else None
        return self.pad_to_multiple_of

"""All keywords of ``test_fine_tuning`` in one object: the one place for defaults and checks, logged whole.

One keyword per concept: the previous module's aliases (``use_amp``, ``mixed_precision``, ``use_lr_schedule``,
``gradient_clip_norm``) are resolved into ``precision``, ``lr_schedule``/``warmup_steps`` and ``max_grad_norm``
by :mod:`utils.training.previous_interface` before settings are built.
"""
from __future__ import annotations

import hashlib
import math
import os
import tempfile
from dataclasses import asdict, dataclass, fields
from pathlib import Path

LR_SCHEDULES = ("cosine", "constant", "linear")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
GROUPINGS = ("auto", "tokens", "lines", True, False)
BAD_EXAMPLES = ("error", "skip", "truncate")  # what a stream's row that fails its checks does (example_checks)
LOSS_PATHS = ("auto", "linear", "chunked")  # utils/training/loss/loss_path.py
MODEL_CHECKS = ("examples", "causal", "padding")  # the start-up probes of the model's behaviour (model/probes.py)
MAX_SEED = 2**32 - 1
FLOAT32_MAX = 3.4028234663852886e38
GOOGLE_DRIVE_MOUNT = Path("/content/drive")  # where Colab mounts Google Drive (drive.mount)


@dataclass
class FineTuneSettings:
    # The previous module's keywords, in its positional order (test_fine_tuning keeps that order).
    n_epochs: int = 3
    learning_rate: float = 5e-5
    weight_decay: float = 0.01
    batch_size: int = 4
    use_wandb: bool = False
    gradient_accumulation_steps: int = 1
    max_grad_norm: float | None = 1.0  # the previous gradient_clip_norm; None disables clipping
    random_seed: int = 42
    deterministic: bool = False  # deterministic algorithms for the duration of the call
    log_grad_dist_every: int = 5  # with W&B: per-layer gradient norms every N optimizer steps
    log_grad_histogram: bool = False  # with W&B: gradient histograms at the same steps
    # Newer keywords.
    lr_schedule: str = "cosine"
    warmup_ratio: float = 0.1
    warmup_steps: int | None = None  # overrides warmup_ratio when set
    shuffle: bool = True
    # "auto": token-budget steps inside length groups when shuffling, the given order when not (CLAUDE.md).
    group_by_length: bool | str = "auto"
    max_tokens_per_batch: int | None = None  # padded tokens per micro-batch; None: batch_size x mean length
    pad_to_multiple_of: int | str | None = "auto"  # "auto": 64 on CUDA (bounded shapes), exact lengths on CPU
    # "auto": bf16 autocast on GPUs that support it, fp16 + GradScaler on those that do not (T4, V100), fp32 on CPU.
    precision: str = "auto"
    compile: bool = False  # torch.compile the model once
    # "auto": hidden states x head weight (no full logits) where that is the model's own loss and saves memory
    # (CLAUDE.md); "linear": wherever it is the model's own loss; "chunked": always the model's own forward.
    loss_path: str = "auto"
    # Under torchrun: shard parameters, gradients and optimizer state across the processes (FSDP2) instead of DDP.
    fsdp: bool = False
    # Under torchrun: a process that gives no sign of life (heartbeat) for this many minutes stops the run, named
    # with its rank and step, instead of the others waiting silently in a collective (torch's default: 30 min on
    # gloo). Also the process group's timeout when the package starts the group (utils/training/distributed/watch.py).
    process_timeout_minutes: float = 10.0
    val_fraction: float = 0.2
    eval_every: int | None = None  # also validate every N optimizer steps inside an epoch
    output_dir: str | None = None
    checkpoint_every: int | None = None
    keep_checkpoints: int = 2
    # Also a checkpoint when this many minutes of wall time passed since the last one (a float; with or without
    # checkpoint_every): a Colab VM can disconnect at any time.
    checkpoint_every_minutes: float | None = None
    # Checkpoints are written here first and copied into output_dir in the background. "auto": a local temporary
    # folder when output_dir is on Google Drive (/content/drive), else None (written into output_dir directly).
    checkpoint_staging_dir: str | None = "auto"
    async_checkpoints: bool = True  # False: training waits for each checkpoint write (as before)
    resume_from_checkpoint: bool | str = False
    early_stopping_patience: int | None = None
    load_best_model_at_end: bool = False
    wandb_project: str | None = None
    wandb_run_name: str | None = None
    wandb_group: str | None = None
    wandb_mode: str | None = None
    progress: bool = True
    log_every: int = 10  # optimizer steps between host reads of the step rows (progress bar, W&B, the stop flag)
    save_plots: bool = True
    # Stop after this many optimizer steps (HF's name); the schedule spans them. Needed for streamed data.
    max_steps: int | None = None
    stream_buffer_size: int = 4096  # streamed data: examples shuffled and grouped by length together
    # Streamed data, checked as it is read: a too-long row or one with ids outside the vocabulary stops the run
    # ("error", naming the row), is gone past ("skip") or cut to the model's positions ("truncate"); counted in
    # results["bad_examples"].
    bad_examples: str = "error"
    # Start-up probes of the model's behaviour to leave out, by name ("examples", "causal", "padding"), or True for
    # all: for a model meant to differ (a prefix LM sees ahead). Every other model is probed (model/probes.py).
    skip_model_checks: tuple | bool = ()

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

    def validate(self) -> None:
        """Raise on a setting that cannot work, naming it and the fix, before any work is done."""
        for name in ("n_epochs", "batch_size", "gradient_accumulation_steps", "log_every", "log_grad_dist_every",
                     "keep_checkpoints"):
            _check_int(name, getattr(self, name), minimum=1)
        for name in ("warmup_steps",):
            _check_int(name, getattr(self, name), minimum=0, optional=True)
        _check_int("stream_buffer_size", self.stream_buffer_size, minimum=1)
        for name in ("checkpoint_every", "early_stopping_patience", "eval_every", "max_tokens_per_batch", "max_steps"):
            _check_int(name, getattr(self, name), minimum=1, optional=True)
        _check_int("random_seed", self.random_seed, minimum=0)
        if self.random_seed > MAX_SEED:
            raise ValueError(f"random_seed must be <= 2**32 - 1 (numpy's limit), got {self.random_seed}.")
        _check_float("learning_rate", self.learning_rate, low=0.0, hint=" Typical fine-tuning values are 1e-5 to 5e-4.")
        if self.learning_rate > FLOAT32_MAX:
            raise ValueError(f"learning_rate must be finite in float32 (<= {FLOAT32_MAX:.3g}), got "
                             f"{self.learning_rate:g}: the first update would make every weight inf. Typical "
                             "fine-tuning values are 1e-5 to 5e-4.")
        _check_float("weight_decay", self.weight_decay, low=0.0)
        _check_float("max_grad_norm", self.max_grad_norm, low=0.0, low_open=True, optional=True,
                     hint=" Use None to turn clipping off.")
        _check_float("warmup_ratio", self.warmup_ratio, low=0.0, high=1.0)
        _check_float("val_fraction", self.val_fraction, low=0.0, high=1.0, low_open=True)
        _check_float("checkpoint_every_minutes", self.checkpoint_every_minutes, low=0.0, low_open=True, optional=True,
                     hint=" Pass minutes as a number, e.g. checkpoint_every_minutes=30 (or 0.5 for 30 seconds).")
        _check_float("process_timeout_minutes", self.process_timeout_minutes, low=0.0, low_open=True,
                     hint=" Pass minutes as a number, e.g. process_timeout_minutes=10 (or 0.5 for 30 seconds).")
        self._check_staging_dir()
        for name in ("shuffle", "use_wandb", "deterministic", "log_grad_histogram", "load_best_model_at_end",
                     "save_plots", "async_checkpoints"):
            _check_bool(name, getattr(self, name))
        _check_choice("lr_schedule", self.lr_schedule, LR_SCHEDULES)
        _check_choice("precision", self.precision, PRECISIONS)
        _check_bool("compile", self.compile)
        _check_choice("loss_path", self.loss_path, LOSS_PATHS)
        _check_bool("fsdp", self.fsdp)
        if self.fsdp and self.compile:
            raise ValueError("compile=True with fsdp=True is not supported (untested together): pass one of them.")
        _check_choice("group_by_length", self.group_by_length, GROUPINGS)
        _check_choice("bad_examples", self.bad_examples, BAD_EXAMPLES)
        self._check_skip_model_checks()
        if self.progress not in (True, False, "all"):
            raise ValueError(f"progress must be True, False or 'all', got {self.progress!r}.")
        if self.pad_to_multiple_of not in (None, "auto"):
            _check_int("pad_to_multiple_of", self.pad_to_multiple_of, minimum=1)
        if not isinstance(self.resume_from_checkpoint, (bool, str, os.PathLike)):
            raise TypeError("resume_from_checkpoint must be True/False or a checkpoint folder path, got "
                            f"{type(self.resume_from_checkpoint).__name__}.")
        if Path(self.output_dir).exists() and not Path(self.output_dir).is_dir():
            raise ValueError(f"output_dir={self.output_dir!r} is a file, not a folder. Pass a folder path "
                             "(it is created if missing).")

    # Not a keyword: set by previous_interface when use_amp/mixed_precision asked for the precision. Those keep
    # the previous module's meaning (autocast on CUDA only; float32 with a warning elsewhere), so an old caller's
    # CPU run does not turn into a slower half-precision one. precision= itself applies on CPU too.
    precision_from_previous_keyword = False

    def _check_skip_model_checks(self) -> None:
        value = self.skip_model_checks
        if isinstance(value, str):
            value = (value,)
        if isinstance(value, bool):
            return
        if not isinstance(value, (tuple, list, set, frozenset)) or any(name not in MODEL_CHECKS for name in value):
            raise ValueError(f"skip_model_checks={self.skip_model_checks!r}: pass a tuple of probe names from "
                             f"{MODEL_CHECKS} (e.g. skip_model_checks=('causal',) for a prefix LM), True to skip all "
                             "of them, or () to run them all.")
        self.skip_model_checks = tuple(value)

    def _check_staging_dir(self) -> None:
        value = self.checkpoint_staging_dir
        if value is None or value == "auto":
            return
        if not isinstance(value, (str, os.PathLike)):
            raise TypeError("checkpoint_staging_dir must be a folder path, 'auto' or None, "
                            f"got {type(value).__name__}.")
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

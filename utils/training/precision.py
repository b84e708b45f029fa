"""Mixed precision for one run: the autocast context, the GradScaler and the guarded optimizer update.

The device type is a parameter, not a branch: ``Precision("fp16", "cpu")`` runs the same lines as
``Precision("fp16", "cuda")`` (CPU autocast and ``torch.amp.GradScaler("cpu")``), so CI on a CPU executes the
code every GPU user runs. ``name`` is ``"bf16"``, ``"fp16"`` or None (float32); which one a run gets is
``NumericsSettings.autocast_dtype``'s decision (the numerics group of the settings, declared here).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from .setting_rules import FREE, MATCH, SettingsGroup, check_bool, one_of, setting

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
LOSS_PATHS = ("auto", "linear", "chunked")  # utils/training/loss/loss_path.py


@dataclass
class NumericsSettings(SettingsGroup):
    # Deterministic algorithms for the duration of the call. Free on resume: it picks kernels for the same
    # arithmetic (on CUDA; nothing changes on CPU), as a resume on another GPU does.
    deterministic: bool = setting(False, check=check_bool, resume=FREE, setup=True, search=True)
    # "auto": bf16 autocast on GPUs that support it, fp16 + GradScaler on those that do not (T4, V100), fp32 on CPU.
    precision: str = setting("auto", check=one_of(PRECISIONS), resume=MATCH, setup=True, search=True)
    # torch.compile the model once. Must match on resume: compiled code draws dropout's random numbers by its own
    # generator, so a toggled resume would not continue the run it resumes.
    compile: bool = setting(False, check=check_bool, resume=MATCH, setup=True, search=True)
    # "auto": hidden states x head weight (no full logits) where that is the model's own loss and saves memory
    # (CLAUDE.md); "linear": wherever it is the model's own loss; "chunked": always the model's own forward.
    # Must match on resume: the paths compute the loss and its gradient with other operations.
    loss_path: str = setting("auto", check=one_of(LOSS_PATHS), resume=MATCH, setup=True, search=True)

    # Not a keyword: set by previous_interface when use_amp/mixed_precision asked for the precision. Those keep
    # the previous module's meaning (autocast on CUDA only; float32 with a warning elsewhere), so an old caller's
    # CPU run does not turn into a slower half-precision one. precision= itself applies on CPU too.
    precision_from_previous_keyword = False

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
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


class Precision:
    def __init__(self, name: str | None, device_type: str, *, use_autocast: bool = True, **scaler_options):
        if name not in (None, *DTYPES):
            raise ValueError(f"Unknown precision {name!r}; choose one of None (float32), 'bf16', 'fp16'.")
        self.name, self.device_type = name, device_type
        self.use_autocast = use_autocast  # False where the model casts itself (FSDP's MixedPrecisionPolicy)
        # fp16 only: its 5 exponent bits underflow small gradients unless the loss is scaled up. bf16 has float32's
        # range and needs no scaler. A disabled scaler's methods are no-ops, so the update below has one form.
        self.scaler = torch.amp.GradScaler(device_type, enabled=name == "fp16", **scaler_options)
        self.scale_at_stop = None  # the scale of the last applied step, once a non-finite step stopped the run

    @property
    def used(self) -> str:
        """What ran, as ``results["precision_used"]`` names it."""
        return self.name or "fp32"

    def autocast(self):
        if self.name is None or not self.use_autocast:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=DTYPES[self.name])

    def unscale_(self, optimizer) -> None:
        """Gradients back to their true size (before clipping and their norm are computed)."""
        self.scaler.unscale_(optimizer)

    def skip_update(self, stop_flag: torch.Tensor, grad_norm: torch.Tensor) -> torch.Tensor:
        """1 where this step's update must not be applied: the run's sticky stop flag, and under fp16 also an
        overflowed gradient (the scaler then lowers its scale and training goes on, as GradScaler does)."""
        if not self.scaler.is_enabled():
            return stop_flag
        return torch.maximum(stop_flag, (~torch.isfinite(grad_norm)).to(stop_flag.dtype))

    def step(self, optimizer, skip: torch.Tensor) -> None:
        """The optimizer update unless ``skip`` (a 0-dim device tensor) is 1, then the scaler's update.

        Fused AdamW takes ``skip`` as its ``found_inf`` (the kernel returns early; its step counter is not
        advanced), so no host read is needed; this is also how GradScaler drives a fused optimizer. Without a
        fused kernel the flag is read on the host first (one sync per step).
        """
        if optimizer.defaults.get("fused"):
            optimizer.found_inf = skip
            try:
                optimizer.step()
            finally:
                del optimizer.found_inf
        elif not bool(skip):  # host read (sync) only where no fused kernel exists for these parameters
            optimizer.step()
        # Halves the scale after an overflow recorded by unscale_, doubles it after growth_interval clean steps.
        self.scaler.update()

    def scale_in_effect(self) -> torch.Tensor | None:
        """A device copy of the scale this step runs with (no host read), kept with the step's row: a run stopped at
        a non-finite step reports the scale the last applied step left, however many steps ran before the rows
        were read (each further NaN step halves the scaler's own)."""
        scale = getattr(self.scaler, "_scale", None) if self.scaler.is_enabled() else None  # torch's device tensor
        return None if scale is None else scale.detach().clone()

    def loss_scale(self) -> float | None:
        if not self.scaler.is_enabled():
            return None
        if self.scale_at_stop is not None:
            return float(self.scale_at_stop)  # a host read: only for results
        return self.scaler.get_scale()

    def state_dict(self) -> dict:
        return self.scaler.state_dict()  # empty when disabled (bf16, fp32)

    def load_state_dict(self, state: dict) -> None:
        if state and self.scaler.is_enabled():  # empty from a bf16/fp32 run ("auto" on another GPU)
            self.scaler.load_state_dict(state)

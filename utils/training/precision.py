"""Mixed precision for one run: the autocast context, the GradScaler and the guarded optimizer update.

The device type is a parameter, not a branch: ``Precision("fp16", "cpu")`` runs the same lines as
``Precision("fp16", "cuda")`` (CPU autocast and ``torch.amp.GradScaler("cpu")``), so CI on a CPU executes the
code every GPU user runs. ``name`` is ``"bf16"``, ``"fp16"`` or None (float32); which one a run gets is
``FineTuneSettings.autocast_dtype``'s decision.
"""
from __future__ import annotations

import contextlib

import torch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


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

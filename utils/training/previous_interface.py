"""The previous module's interface mapped onto today's settings and results (a drop-in for its callers).

Callers written for the module this package replaces pass ``gradient_clip_norm``, ``use_amp``,
``use_lr_schedule`` ... and read ``final_loss``, ``initial_loss`` ...; this is the one place their
aliases are resolved into one keyword per concept, and their result keys derived. Nothing here
computes anything new.
"""
from __future__ import annotations

from .settings import FineTuneSettings


class DefaultFloat(float):
    """A default told apart from the same number passed explicitly (compared with ``is``)."""


class DefaultInt(int):
    """A default told apart from the same number passed explicitly (compared with ``is``)."""


CLIP_NORM_DEFAULT = DefaultFloat(FineTuneSettings.default("max_grad_norm"))
# The previous keywords that are aliases of today's: their defaults mean "not asked for".
PREVIOUS_DEFAULTS = {"use_amp": False, "mixed_precision": None, "use_lr_schedule": True}
MIXED_PRECISION = (None, "bf16", "fp16")


def settings_from_call(keywords: dict, *, gradient_clip_norm=CLIP_NORM_DEFAULT) -> tuple[FineTuneSettings, dict]:
    """Checked settings from an entry point's keywords, aliases resolved; also the previous keywords as given
    (shown in ``results["settings"]`` so a caller sees what it passed)."""
    keywords = dict(keywords)
    given = {name: keywords.pop(name, default) for name, default in PREVIOUS_DEFAULTS.items()}
    if "gradient_clip_norm" in keywords:  # the search passes every keyword by name
        gradient_clip_norm = keywords.pop("gradient_clip_norm")
    if gradient_clip_norm is not CLIP_NORM_DEFAULT:
        given["gradient_clip_norm"] = gradient_clip_norm
        if "max_grad_norm" in keywords and keywords["max_grad_norm"] != gradient_clip_norm:
            raise ValueError(f"gradient_clip_norm={gradient_clip_norm} and max_grad_norm={keywords['max_grad_norm']} "
                             "name the same setting with different values; pass only one of them.")
        keywords["max_grad_norm"] = gradient_clip_norm
    from_previous_keyword = _resolve_precision(keywords, given)
    _resolve_schedule(keywords, given)
    settings = FineTuneSettings.from_keywords(keywords, known_extra=set(PREVIOUS_DEFAULTS) | {"gradient_clip_norm",
                                                                                               "tokenizer", "device"})
    settings.numerics.precision_from_previous_keyword = from_previous_keyword
    return settings, given


def _resolve_precision(keywords: dict, given: dict) -> bool:
    """``use_amp``/``mixed_precision`` into ``precision``; True when they, not ``precision=``, asked for it."""
    use_amp, mixed = given["use_amp"], given["mixed_precision"]
    if not isinstance(use_amp, bool):
        raise TypeError(f"use_amp must be True or False, got {type(use_amp).__name__} ({use_amp!r}).")
    if not any(mixed is choice or (type(mixed) is type(choice) and mixed == choice) for choice in MIXED_PRECISION):
        raise ValueError(f"Unknown mixed_precision {mixed!r}; choose one of None, 'bf16', 'fp16' (or use precision=).")
    if use_amp and mixed not in (None, "fp16"):
        raise ValueError(f"use_amp=True means fp16 autocast but mixed_precision={mixed!r}; pass only one of them.")
    asked = mixed or ("fp16" if use_amp else None)
    if asked is None:
        return False
    precision = keywords.get("precision", "auto")
    if precision not in ("auto", asked):
        raise ValueError(f"precision={precision!r} but mixed_precision={mixed!r}/use_amp={use_amp} ask for {asked!r}; "
                         "pass only one of them.")
    keywords["precision"] = asked
    return precision == "auto"  # precision= given as well: the explicit request, which applies on CPU too


def _resolve_schedule(keywords: dict, given: dict) -> None:
    """``use_lr_schedule=False`` was a constant learning rate without warmup."""
    use_schedule = given["use_lr_schedule"]
    if not isinstance(use_schedule, bool):
        raise TypeError(f"use_lr_schedule must be True or False, got {type(use_schedule).__name__} ({use_schedule!r}).")
    if use_schedule:
        return
    if keywords.get("lr_schedule", "constant") != "constant":
        raise ValueError(f"use_lr_schedule=False asks for a constant learning rate but lr_schedule="
                         f"{keywords['lr_schedule']!r}; pass only one of them.")
    keywords.update(lr_schedule="constant", warmup_steps=0)


def previous_result_keys(steps_frame, *, training_seconds: float, sequences: int, amp_enabled: bool,
                         loss_scale) -> dict:
    """The previous module's result keys, derived from today's per-step records."""
    losses = steps_frame["train/step_loss_excl_padding"].tolist()
    return {
        "final_loss": losses[-1] if losses else None,  # the last optimizer step's loss, excl. padding
        "initial_loss": losses[0] if losses else None,
        "training_time_seconds": training_seconds,
        "samples_per_second": sequences / training_seconds if training_seconds > 0 else 0.0,
        "grad_norm_history": steps_frame["train/grad_norm"].tolist(),
        "amp_enabled": amp_enabled,
        "final_loss_scale": loss_scale,
    }

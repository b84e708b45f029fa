"""The previous module's interface mapped onto today's settings and results (a drop-in for its callers).

Callers written for the module this package replaces pass ``gradient_clip_norm``, ``use_amp``,
``deterministic`` ... and read ``final_loss``, ``initial_loss`` ...; nothing here computes
anything new: it renames and derives.
"""
from __future__ import annotations

import contextlib

import torch

from .settings import FineTuneSettings


class DefaultFloat(float):
    """A default told apart from the same number passed explicitly (compared with ``is``)."""


class DefaultInt(int):
    """A default told apart from the same number passed explicitly (compared with ``is``)."""


CLIP_NORM_DEFAULT = DefaultFloat(FineTuneSettings.default("max_grad_norm"))


def build_settings(call_keywords: dict, options: dict, *, gradient_clip_norm) -> FineTuneSettings:
    """Settings from the entry point's named keywords plus ``**options``; unknown keywords raise ``TypeError``."""
    unknown = set(options) - FineTuneSettings.keyword_names()
    if unknown:
        raise TypeError(f"test_fine_tuning() got unknown keyword(s) {sorted(unknown)}; "
                        f"known: {sorted(FineTuneSettings.keyword_names() | {'gradient_clip_norm', 'tokenizer', 'device'})}.")
    keywords = dict(call_keywords, **options)
    if gradient_clip_norm is not CLIP_NORM_DEFAULT:
        if "max_grad_norm" in options and options["max_grad_norm"] != gradient_clip_norm:
            raise ValueError(f"gradient_clip_norm={gradient_clip_norm} and max_grad_norm={options['max_grad_norm']} name the "
                             "same setting with different values; pass only one of them.")
        keywords["max_grad_norm"] = gradient_clip_norm
    if not keywords.get("use_lr_schedule", True) and options.get("lr_schedule", "constant") != "constant":
        raise ValueError(f"use_lr_schedule=False asks for a constant learning rate but lr_schedule={options['lr_schedule']!r}; "
                         "pass only one of them.")
    settings = FineTuneSettings(**keywords)
    settings.validate()
    return settings


@contextlib.contextmanager
def deterministic_algorithms(enabled: bool):
    """``torch.use_deterministic_algorithms`` for the duration of a call, then the caller's setting again."""
    if not enabled:
        yield
        return
    previous = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
                torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    # warn_only: an op without a deterministic kernel warns instead of stopping a fine-tuning run.
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = previous[2], previous[3]


def legacy_result_keys(steps_frame, *, training_seconds: float, sequences: int, amp_enabled: bool, loss_scale) -> dict:
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

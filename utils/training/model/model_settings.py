"""The model group of the settings: which start-up probes of the model's behaviour run (model/probes.py)."""
from __future__ import annotations

from dataclasses import dataclass

from ..setting_rules import FREE, SettingsGroup, setting

MODEL_CHECKS = ("examples", "causal", "padding")  # the start-up probes of the model's behaviour (probes.py)


def _check_skip_model_checks(name, value):
    names = (value,) if isinstance(value, str) else value
    if isinstance(names, bool):
        return
    if not isinstance(names, (tuple, list, set, frozenset)) or any(probe not in MODEL_CHECKS for probe in names):
        raise ValueError(f"{name}={value!r}: pass a tuple of probe names from {MODEL_CHECKS} (e.g. "
                         f"{name}=('causal',) for a prefix LM), True to skip all of them, or () to run them all.")


@dataclass
class ModelSettings(SettingsGroup):
    # Start-up probes of the model's behaviour to leave out, by name ("examples", "causal", "padding"), or True for
    # all: for a model meant to differ (a prefix LM sees ahead). Every other model is probed (model/probes.py). Free
    # on resume: the probes run before any step and change nothing.
    skip_model_checks: tuple | bool = setting((), check=_check_skip_model_checks, resume=FREE, setup=False,
                                              search=True)

    def check_together(self) -> None:
        if not isinstance(self.skip_model_checks, bool):  # one form from here on: a tuple of probe names
            names = self.skip_model_checks
            self.skip_model_checks = (names,) if isinstance(names, str) else tuple(names)

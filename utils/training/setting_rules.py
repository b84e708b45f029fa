"""How a setting declares its rules, shared by every settings group (``FineTuneSettings`` is made of groups, each
declared in the subpackage that uses it). A leaf: it imports nothing of the package, so any group can import it.

Every setting declares next to its default (:func:`setting`): its check, its resume rule (``MATCH``: a resume
with another value is refused; ``RAISE``: may be raised, not below what was trained; ``PER_PROCESS``: must match,
or keep its product with the number of processes when that changes; ``FREE``: may change), whether it belongs to
a study's set-up (it changes a trial's value) and whether it can be searched. The group is the dataclass that
declares it.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from functools import partial

# Resume rules (what a resume may do with a setting; checkpoints/resume.py applies them).
MATCH, RAISE, PER_PROCESS, FREE = "must match", "may be raised", "per process", "free to change"
RESUME_RULES = (MATCH, RAISE, PER_PROCESS, FREE)
# Where a MATCH rule applies only while the setting is used: "stream" (training or validation data is a stream),
# "held_out" (validation is held out of train_data by val_fraction). Elsewhere the setting is unused: free.
RESUME_CONDITIONS = (None, "stream", "held_out")
RULES_KEY = "tier3_rules"  # where a field's Rules sit in its dataclass metadata


@dataclass(frozen=True)
class Rules:
    """One setting's declared rules."""

    check: Callable[[str, object], None]  # (name, value) -> None; raises naming the setting and the fix
    resume: str  # one of RESUME_RULES
    setup: bool  # part of a study's recorded set-up (it changes what a trial measures)
    search: bool  # may be named in a search space
    when: str | None = None  # one of RESUME_CONDITIONS


def setting(default, *, check, resume: str, setup: bool, search: bool, when: str | None = None):
    """A settings field with its rules declared next to its default."""
    return field(default=default, metadata={RULES_KEY: Rules(check, resume, setup, search, when)})


class SettingsGroup:
    """Base of a settings group (a dataclass of :func:`setting` fields): its rules and its checks."""

    @classmethod
    def rules(cls) -> dict[str, Rules]:
        """Every field's declared rules, in declaration order (KeyError: a field declared without them)."""
        return {f.name: f.metadata[RULES_KEY] for f in fields(cls)}

    def check_together(self) -> None:
        """Checks between this group's fields (after every field's own check); a group may add them."""


# -- the shared checks: each takes (name, value) and raises naming the setting and the fix ------------------------
def check_int(name, value, *, minimum, optional=False):
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int{' or None' if optional else ''}, "
                        f"got {type(value).__name__} ({value!r}).")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}{' or None' if optional else ''}, got {value}.")


def check_float(name, value, *, low, high=None, low_open=False, optional=False, hint=""):
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


def check_bool(name, value):
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {type(value).__name__} ({value!r}).")


def check_choice(name, value, choices):
    if not any(value is choice or (type(value) is type(choice) and value == choice) for choice in choices):
        raise ValueError(f"Unknown {name} {value!r}; choose one of {', '.join(map(repr, choices))}.")


def check_optional_text(name, value):
    if value is not None and not isinstance(value, str):
        raise TypeError(f"{name} must be a string or None, got {type(value).__name__} ({value!r}).")


def whole(minimum: int, optional: bool = False):
    """An int >= ``minimum`` (or None when ``optional``)."""
    return partial(check_int, minimum=minimum, optional=optional)


def number(low: float, **bounds):
    """A finite number from ``low`` (``high=``, ``low_open=``, ``optional=``, ``hint=`` as :func:`check_float`)."""
    return partial(check_float, low=low, **bounds)


def one_of(choices):
    return partial(check_choice, choices=choices)


POSITIVE, POSITIVE_OR_NONE = whole(1), whole(1, optional=True)
